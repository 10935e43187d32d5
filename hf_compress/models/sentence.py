"""The layout of a sentence-transformers model, known without importing sentence-transformers.

A ``SentenceTransformer`` is an ``nn.Sequential`` whose first module (``Transformer``) holds a transformers model in
``auto_model``; its saved folder lists its modules in ``modules.json``, the ``Transformer`` first, in a subfolder
(usually the folder itself) with the transformers ``config.json``, weights and tokenizer. What hf_compress does with
such models is in :mod:`hf_compress.integrations.sentence_transformers`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn


def is_sentence_transformer(model: Any) -> bool:
    """Whether ``model`` looks like a ``SentenceTransformer`` (duck typing: no import of sentence-transformers)."""
    return isinstance(model, nn.Sequential) and len(model) > 0 and hasattr(model[0], "auto_model")


def transformer_module(model: nn.Module) -> nn.Module:
    """The sentence-transformers ``Transformer`` module of ``model`` (its first module, owner of ``auto_model``)."""
    if not is_sentence_transformer(model):
        raise TypeError(
            f"`model` must be a SentenceTransformer whose first module is a `Transformer`, got "
            f"{type(model).__name__}; pass a transformers model to the plain hf_compress function instead."
        )
    return model[0]


def is_sentence_transformer_folder(path: Any) -> bool:
    """Whether ``path`` is a local folder saved by sentence-transformers (it has a ``modules.json``)."""
    return isinstance(path, str | os.PathLike) and (Path(path) / "modules.json").is_file()


def transformer_folder(path: str | os.PathLike) -> Path:
    """The folder of a sentence-transformers folder's ``Transformer`` module (its config, weights and tokenizer)."""
    return Path(path) / _transformer_entry(Path(path))["path"]


def _transformer_entry(path: Path) -> dict:
    modules = path / "modules.json"
    if not modules.is_file():
        raise FileNotFoundError(f"`path` {str(path)!r} has no modules.json; save the model with `model.save(path)`.")
    entries = json.loads(modules.read_text())
    entry = next((e for e in entries if e["type"].rpartition(".")[2] == "Transformer"), None)
    if entry is None or int(entry["idx"]) != 0:
        raise ValueError(f"`path` {str(path)!r} has no `Transformer` first module in modules.json, got {entries}.")
    return entry


__all__ = ["is_sentence_transformer", "is_sentence_transformer_folder", "transformer_folder", "transformer_module"]
