"""The one test of "is this a Hugging Face Hub repo id?", shared by the loader, the model cards and the Hub push.

[`is_repo_id`] checks the syntax only (``name`` or ``namespace/name``, as ``huggingface_hub`` validates it);
[`hub_id`] also rules out local paths, so that a folder on disk is never mistaken for a repo to download or to link.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id


def is_repo_id(name: object) -> bool:
    """Whether `name` is a syntactically valid Hub repo id (`"name"` or `"namespace/name"`).

    >>> is_repo_id("google-bert/bert-base-uncased"), is_repo_id("a/b/c"), is_repo_id(3)
    (True, False, False)
    """
    if not isinstance(name, str):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id and not a local path (existing, absolute, or starting with `.` / `~`), else
    `None`.

    >>> hub_id("google-bert/bert-base-uncased"), hub_id("/tmp"), hub_id("./model"), hub_id(None)
    ('google-bert/bert-base-uncased', None, None, None)
    """
    if not name or not isinstance(name, str):
        return None
    if name.startswith((".", "~")) or Path(name).is_absolute() or Path(name).exists():
        return None
    return name if is_repo_id(name) else None
