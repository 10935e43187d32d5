"""Push a saved, carded model folder to the Hugging Face Hub, after checking that it reloads.

:func:`push_folder` only reads the folder: it checks the files (config, weights, ``README.md`` card), runs a reload
check (:func:`reload_check` by default: load with transformers or the hf_compress loader and run a fixed dummy input,
comparing logits with an in-memory ``reference_model`` when given), then calls ``HfApi.create_repo`` and
``HfApi.upload_folder`` with :data:`IGNORE_PATTERNS` (hidden files, ``checkpoint-*/``, ``runs/``), the patterns
:func:`files_to_upload` lists the files with. An ONNX export (``onnx/``, the transformers.js layout) goes up with the
model by default: the folder's own ``onnx/``, or the ``onnx/`` of another folder (a recipe's ``export_onnx`` stage).
The token is passed to ``HfApi`` and never logged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from torch import nn
from transformers.utils import logging

from hf_compress.loading import from_pretrained
from hf_compress.models.hub_ids import is_repo_id
from hf_compress.reporting.measure import dummy_inputs

logger = logging.get_logger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# `upload_folder` patterns (fnmatch, `*` crosses `/`): hidden files and folders, Trainer checkpoints, TensorBoard logs
IGNORE_PATTERNS = [".*", "*/.*", "checkpoint-*/", "runs/"]
ONNX_DIR = "onnx"  # where `export_onnx` writes its graphs, and where the Hub repo keeps them (transformers.js layout)


def files_to_upload(folder: str | Path, ignore_patterns: list[str] | None = None) -> list[str]:
    """The relative paths :func:`push_folder` uploads: all files but hidden ones, ``checkpoint-*/`` and ``runs/``
    (``ignore_patterns`` defaults to :data:`IGNORE_PATTERNS`)."""
    folder = Path(folder)
    files = sorted(file.relative_to(folder).as_posix() for file in folder.rglob("*") if file.is_file())
    return list(
        filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns)
    )


def check_onnx_folder(onnx: str | Path) -> Path:
    """``onnx`` as a folder holding ``.onnx`` graphs, else a one-sentence ``FileNotFoundError``."""
    onnx = Path(onnx)
    if not onnx.is_dir() or not any(onnx.glob("*.onnx")):
        raise FileNotFoundError(
            f"`onnx` {str(onnx)!r} is not a folder of .onnx graphs; pass the `onnx/` folder that `export_onnx` wrote."
        )
    return onnx


def check_folder(folder: str | Path) -> dict:
    """Check that ``folder`` is a complete model folder (config.json, weights, README.md); returns its config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"`folder` must be an existing model folder, got {str(folder)!r}.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"`folder` {str(folder)!r} has no config.json; save the model with `save_pretrained`.")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise FileNotFoundError(f"`folder` {str(folder)!r} has no model weights (*.safetensors or pytorch_model.bin).")
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"`folder` {str(folder)!r} has no README.md; write one with `cards.write_card`.")
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"`folder` {str(folder)!r} has an unreadable config.json ({err.msg}).") from err


def check_repo_id(repo_id: str) -> None:
    """Raise a one-sentence ``ValueError`` unless ``repo_id`` is a valid ``name`` or ``namespace/name`` Hub id."""
    if not isinstance(repo_id, str):
        raise ValueError(f"`repo_id` must be a string like 'user/model-name', got {type(repo_id).__name__}.")
    if not is_repo_id(repo_id):
        raise ValueError(
            f"`repo_id` must look like 'user/model-name' (letters, digits, '-', '_', '.'), got {repo_id!r}."
        )


def load_folder(folder: str | Path) -> nn.Module:
    """Load a saved folder the way its card says, with :func:`hf_compress.loading.from_pretrained`."""
    return from_pretrained(folder).eval()


def _first_tensor(outputs) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    return outputs[0]


def reload_check(folder: str | Path, reference_model: nn.Module | None = None, atol: float = 1e-4) -> None:
    """Reload ``folder`` and run a fixed dummy input; raise ``ValueError`` on non-finite outputs or, when
    ``reference_model`` is given, on outputs further than ``atol`` from it."""
    folder = Path(folder)
    vocab = json.loads((folder / "config.json").read_text()).get("vocab_size")
    if not vocab:
        raise ValueError(
            "`config.json` has no `vocab_size`, so the default reload check cannot build inputs; pass "
            "`verify=` a callable or `verify=False`."
        )
    inputs = dummy_inputs(vocab, batch_size=2)
    model = load_folder(folder)
    with torch.no_grad():
        out = _first_tensor(model(**inputs)).float()
        if not torch.isfinite(out).all():
            raise ValueError(f"The model reloaded from {str(folder)!r} produces non-finite outputs.")
        if reference_model is not None:
            was_training = reference_model.training
            ref = _first_tensor(reference_model.eval()(**inputs)).float()
            reference_model.train(was_training)
            diff = (out - ref).abs().max().item() if out.shape == ref.shape else float("inf")
            if diff > atol:
                raise ValueError(
                    f"The model reloaded from {str(folder)!r} differs from `reference_model` (max abs "
                    f"diff {diff:.3g} > `atol` {atol}); re-save the folder."
                )


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload model compressed with hf_compress",
    verify: bool | Callable[[Path], object] = True,
    reference_model: nn.Module | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    onnx: bool | str | Path = True,
):
    """Check ``folder`` and upload it to the Hub repo ``repo_id`` (created when missing); returns the commit info.

    Args:
        folder (`str` or `Path`): a saved model folder with config.json, weights and a README.md card.
        repo_id (`str`): ``user/model-name`` (or ``model-name`` for the token's own namespace).
        private (`bool`, *optional*, defaults to `False`): create the repo as private.
        token (`str`, *optional*): Hub token; defaults to the locally saved login. Never logged.
        commit_message (`str`, *optional*): message of the upload commit.
        verify (`bool` or `Callable[[Path], object]`, *optional*, defaults to `True`): `True` runs
            :func:`reload_check`; a callable is called with the folder and must raise (or return `False`) on a bad
            folder; `False` skips the check.
        reference_model (`nn.Module`, *optional*): the in-memory model whose outputs the reloaded folder must match.
        revision (`str`, *optional*), create_pr (`bool`, *optional*): forwarded to ``upload_folder``.
        onnx (`bool`, `str` or `Path`, *optional*, defaults to `True`): `True` uploads the folder's own ``onnx/``
            when it has one; a path uploads that folder of ``.onnx`` graphs as ``onnx/`` in the repo (a second
            commit, after the model's); `False` leaves ``onnx/`` out.

    Example:

    >>> from hf_compress.reporting.hub import push_folder
    >>> push_folder("out/student", "my-user/bert-tiny-sst2-int8", private=True)  # doctest: +SKIP
    """
    folder = Path(folder)
    check_folder(folder)
    check_repo_id(repo_id)
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError(f"`commit_message` must be a non-empty string, got {commit_message!r}.")
    if verify is True:
        reload_check(folder, reference_model)
    elif callable(verify):
        if verify(folder) is False:
            raise ValueError(f"`verify` returned False for {str(folder)!r}; the folder was not pushed.")
    elif verify is not False:
        raise ValueError(f"`verify` must be True, False or a callable taking the folder, got {verify!r}.")
    if not isinstance(onnx, bool | str | Path):
        raise ValueError(f"`onnx` must be True, False or the path of an `onnx/` folder, got {onnx!r}.")
    external = None if isinstance(onnx, bool) else check_onnx_folder(onnx)
    ignore = IGNORE_PATTERNS + ([] if onnx is True else [f"{ONNX_DIR}/"])
    files = files_to_upload(folder, ignore)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo = getattr(url, "repo_id", None) or repo_id
    common = dict(repo_id=repo, repo_type="model", revision=revision, create_pr=create_pr)
    logger.info(f"Uploading {len(files)} files from {folder} to {repo_id}")
    commit = api.upload_folder(
        folder_path=str(folder), commit_message=commit_message, ignore_patterns=ignore, **common
    )
    if external is not None:
        logger.info(f"Uploading the ONNX graphs of {external} to {repo_id}/{ONNX_DIR}")
        commit = api.upload_folder(
            folder_path=str(external),
            path_in_repo=ONNX_DIR,
            commit_message=f"{commit_message} (ONNX export)",
            ignore_patterns=IGNORE_PATTERNS,
            **common,
        )
    logger.info(f"Pushed {folder} to {repo_id}")
    return commit
