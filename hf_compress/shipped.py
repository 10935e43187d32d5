"""Where the shipped recipes (`recipes/`) and model-card templates (`model_cards/`) are, installed or not.

Both folders live once, at the top of the repository; the wheel maps them into the packages
``hf_compress.shipped_recipes`` and ``hf_compress.shipped_model_cards`` (see ``pyproject.toml``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Literal

PACKAGES = {"recipes": "hf_compress.shipped_recipes", "model_cards": "hf_compress.shipped_model_cards"}


def shipped_path(folder: Literal["recipes", "model_cards"], name: str) -> Path:
    """The path of ``name`` in the shipped ``folder``: the installed package's copy, else the source checkout's.

    >>> shipped_path("recipes", "quickstart.yaml").name
    'quickstart.yaml'
    """
    if folder not in PACKAGES:
        raise ValueError(f"`folder` must be one of {list(PACKAGES)}, got {folder!r}.")
    try:
        base = Path(str(files(PACKAGES[folder])))
    except ModuleNotFoundError:  # a source checkout used without `pip install`
        base = Path(__file__).resolve().parent.parent / folder
    return base / name
