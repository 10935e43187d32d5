"""The top-level calls, for transformers models and sentence-transformers models alike.

``hf_compress.make_student``, ``prune_vocabulary``, ``quantize_model``, ``save_pretrained`` and ``from_pretrained``
take a transformers model (or folder) as in their home modules, or a ``SentenceTransformer`` (or a folder saved by
sentence-transformers, one with ``modules.json``): the call then applies to the transformers model inside its first
module and keeps pooling, normalisation and dense modules (:mod:`hf_compress.integrations.sentence_transformers`).

The dispatch lives here, above ``distillation/``, ``vocabulary/``, ``quantization/`` and ``loading``, so that none
of them imports ``integrations/``. A ``SentenceTransformer`` is recognised by duck typing
(:func:`~hf_compress.integrations.sentence_transformers.is_sentence_transformer`): sentence-transformers, an optional
dependency, is imported only to load a sentence-transformers folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from hf_compress import loading
from hf_compress.distillation import student as students
from hf_compress.integrations.sentence_transformers import (
    is_sentence_transformer,
    load_sentence_transformer,
    make_sentence_student,
    prune_sentence_vocabulary,
    quantize_sentence_transformer,
    save_sentence_transformer,
    sentence_transformer_folder,
    transformer_module,
)
from hf_compress.quantization.quantize import quantize_model as quantize_transformers_model
from hf_compress.vocabulary.prune import prune_vocabulary as prune_transformers_vocabulary


def make_student(teacher: nn.Module, num_layers: int | None = None, layers: list[int] | None = None) -> nn.Module:
    """A copy of ``teacher`` that keeps only some of its transformer blocks (DistilBERT-style initialisation).

    See [`hf_compress.distillation.student.make_student`] for the arguments. A ``SentenceTransformer`` teacher gives
    a ``SentenceTransformer`` student with the same pooling and other modules.

    Example:

    >>> from hf_compress import make_student
    >>> student = make_student(teacher, num_layers=6)  # doctest: +SKIP
    >>> student.config.hf_compress["teacher_layers"]  # doctest: +SKIP
    [0, 2, 4, 7, 9, 11]
    """
    if is_sentence_transformer(teacher):
        return make_sentence_student(teacher, num_layers=num_layers, layers=layers)
    return students.make_student(teacher, num_layers=num_layers, layers=layers)


def prune_vocabulary(model: nn.Module, tokenizer, corpus_or_ids: Iterable, **kwargs: Any):
    """Restrict ``model`` and ``tokenizer`` to the token ids a corpus uses.

    See [`hf_compress.vocabulary.prune.prune_vocabulary`] for the arguments. For a ``SentenceTransformer``, pass
    ``tokenizer=None`` (or its own ``model.tokenizer``): its transformer's embeddings are sliced in place and the
    pruned tokenizer is installed in it, so ``model.save(folder)`` writes a consistent folder.

    Returns:
        `tuple`: ``(model, tokenizer, report)``, the (same) model, the pruned tokenizer and a `VocabularyReport`.

    Example:

    >>> st_model, tokenizer, report = prune_vocabulary(st_model, None, train_sentences)  # doctest: +SKIP
    >>> st_model.tokenizer is tokenizer  # doctest: +SKIP
    True
    """
    if is_sentence_transformer(model):
        own = transformer_module(model).tokenizer
        if tokenizer is not None and tokenizer is not own:
            raise ValueError(
                f"`tokenizer` must be None or the SentenceTransformer's own `model.tokenizer` for a "
                f"SentenceTransformer, got a separate {type(tokenizer).__name__}; pass `tokenizer=None`."
            )
        model, report = prune_sentence_vocabulary(model, corpus_or_ids, **kwargs)
        return model, transformer_module(model).tokenizer, report
    return prune_transformers_vocabulary(model, tokenizer, corpus_or_ids, **kwargs)


def quantize_model(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Quantise ``model`` in place for CPU inference (int8 Linear layers, int8 or 4-bit embeddings); returns it.

    See [`hf_compress.quantization.quantize.quantize_model`] for the arguments. For a ``SentenceTransformer`` the
    transformer inside it is quantised (module names are relative to it); reload the saved folder with
    [`from_pretrained`].

    Example:

    >>> from hf_compress import quantize_model
    >>> quantize_model(st_model, embedding_bits=4)  # doctest: +SKIP
    """
    if is_sentence_transformer(model):
        return quantize_sentence_transformer(model, **kwargs)
    return quantize_transformers_model(model, **kwargs)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Record the per-layer structure of ``model`` in its config and save it.

    See [`hf_compress.loading.save_pretrained`]; a ``SentenceTransformer`` is saved with ``model.save`` (every
    module, the structure recorded in its transformer's config). ``kwargs`` apply to transformers models only.

    Example:

    >>> from hf_compress import save_pretrained
    >>> save_pretrained(st_model, "minilm-compressed")  # doctest: +SKIP
    """
    if is_sentence_transformer(model):
        if kwargs:
            raise ValueError(f"`kwargs` {sorted(kwargs)} apply to transformers models only; remove them.")
        save_sentence_transformer(model, save_directory)
        return
    loading.save_pretrained(model, save_directory, **kwargs)


def from_pretrained(path: str | os.PathLike, trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """Load any folder hf_compress saved (pruned, layer-dropped, quantised or plain).

    See [`hf_compress.loading.from_pretrained`]. A sentence-transformers folder (one with ``modules.json``), or a Hub
    repo id whose repo has one (downloaded), gives a ``SentenceTransformer`` whose transformer is loaded by
    hf_compress's loader, its pooling and other modules kept (``kwargs`` then go to ``SentenceTransformer``, e.g.
    ``device``; `revision`, `token`, `cache_dir`, `local_files_only` and `force_download` to the download).

    Example:

    >>> import hf_compress
    >>> model = hf_compress.from_pretrained("minilm-compressed")  # doctest: +SKIP
    >>> model.encode(["A sentence."]).shape  # doctest: +SKIP
    (1, 384)
    """
    hub = {key: kwargs[key] for key in loading.HUB_KWARGS if key in kwargs}
    folder = sentence_transformer_folder(path, **hub)
    if folder is None:
        return loading.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    kwargs = {key: value for key, value in kwargs.items() if key not in hub}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    return load_sentence_transformer(folder, **kwargs)


__all__ = ["from_pretrained", "make_student", "prune_vocabulary", "quantize_model", "save_pretrained"]
