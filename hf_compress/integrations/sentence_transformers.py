"""sentence-transformers support: compress the transformers model inside a ``SentenceTransformer``, keep its pooling.

A ``SentenceTransformer`` is an ``nn.Sequential`` whose first module (``Transformer``) holds a transformers model in
``auto_model``; pooling, normalisation and dense modules follow. hf_compress works on that inner model:

* [`~hf_compress.PruningCallback`] goes into a ``SentenceTransformerTrainer`` like into any ``Trainer``
  (:func:`hf_compress.models.families.unwrap` finds the inner model); ``trainer.save_model()`` saves the small model.
* :func:`make_sentence_student`, :func:`prune_sentence_vocabulary` and :func:`quantize_sentence_transformer` apply
  ``make_student``, ``prune_vocabulary`` and ``quantize_model`` to the inner model (and its tokenizer). The
  top-level ``hf_compress.make_student`` / ``prune_vocabulary`` / ``quantize_model`` / ``save_pretrained`` /
  ``from_pretrained`` call them when given a ``SentenceTransformer`` (or its folder), see :mod:`hf_compress.api`.
* :func:`save_sentence_transformer` / :func:`load_sentence_transformer` round-trip any compressed model. Plain
  ``SentenceTransformer(folder)`` also loads the folder whenever the transformers config can express its shapes:
  dropped layers, a uniform FFN width, a pruned vocabulary, fewer heads in the Llama family. BERT, RoBERTa,
  DistilBERT and GPT-2 derive the head width from ``hidden_size / num_attention_heads``, so fewer heads per layer
  cannot be written in their config; such folders (and int8 ones) need ``hf_compress.from_pretrained(folder)``, which
  calls :func:`load_sentence_transformer` on the folder (or, for a Hub repo id with a ``modules.json``, on its
  snapshot: :func:`sentence_transformer_folder`).
* :class:`~hf_compress.integrations.sentence_distillation.EmbeddingDistillationLoss` (in ``sentence_distillation``) is
  a sentence-transformers loss: student embeddings regress the teacher's (MSE or cosine), through a learned projection
  when the widths differ.
* :func:`evaluate_pairs` / :func:`evaluate_mrpc` run sentence-transformers' ``BinaryClassificationEvaluator``
  (cosine-similarity accuracy and average precision) on sentence pairs, by default the MRPC test set in ``data/mrpc``.

sentence-transformers is an optional dependency (``pip install hf_compress[sentence-transformers]``): it is imported
only inside the functions that need it, so importing this module never requires it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import transformers
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from torch import nn

from hf_compress.distillation.student import make_student
from hf_compress.loading import from_pretrained, needs_loader
from hf_compress.models.hub_ids import hub_id
from hf_compress.models.sentence import (
    is_sentence_transformer,
    is_sentence_transformer_folder,
    transformer_folder,
    transformer_module,
)
from hf_compress.pruning.surgery import record_structure
from hf_compress.quantization.quantize import quantize_model
from hf_compress.vocabulary.prune import prune_vocabulary

logger = logging.getLogger(__name__)

MRPC_DIR = Path(__file__).resolve().parents[2] / "data" / "mrpc"  # the source checkout's shipped data
MRPC_FILES = {"train": "msr_paraphrase_train.txt", "test": "msr_paraphrase_test.txt"}


def make_sentence_student(teacher: nn.Module, num_layers: int | None = None, layers: list[int] | None = None):
    """A copy of the ``SentenceTransformer`` ``teacher`` whose transformer keeps only some blocks (pooling kept).

    Args:
        teacher (`SentenceTransformer`): left unchanged.
        num_layers (`int`, *optional*) / layers (`list[int]`, *optional*): as in [`~hf_compress.make_student`].

    Returns:
        A new `SentenceTransformer`.

    Example:

    >>> student = make_sentence_student(teacher, num_layers=3)  # doctest: +SKIP
    >>> student[0].auto_model.config.hf_compress["teacher_layers"]  # doctest: +SKIP
    [0, 2, 5]
    """
    module = transformer_module(teacher)
    inner = module.auto_model
    student_inner = make_student(inner, num_layers=num_layers, layers=layers)
    module.model = None  # copy the wrapper without a second copy of the (large) inner model
    try:
        student = copy.deepcopy(teacher)
    finally:
        module.model = inner
    transformer_module(student).model = student_inner
    return student


def prune_sentence_vocabulary(model: nn.Module, corpus_or_ids: Iterable, **kwargs: Any):
    """[`~hf_compress.prune_vocabulary`] on a ``SentenceTransformer``: embeddings and tokenizer, in place.

    Args:
        model (`SentenceTransformer`): modified in place (its transformer's model and tokenizer) and returned.
        corpus_or_ids (`Iterable`): texts or token ids the model must keep, as in `prune_vocabulary`.
        kwargs: forwarded to `prune_vocabulary` (`min_count`, `extra_ids`, ...).

    Returns:
        `tuple`: ``(model, report)`` with ``report`` a [`~hf_compress.vocabulary.prune.VocabularyReport`].
    """
    module = transformer_module(model)
    _, tokenizer, report = prune_vocabulary(module.auto_model, module.tokenizer, corpus_or_ids, **kwargs)
    module.processor = tokenizer
    return model, report


def quantize_sentence_transformer(model: nn.Module, **kwargs: Any) -> nn.Module:
    """[`~hf_compress.quantize_model`] on the transformer of a ``SentenceTransformer``, in place; returns ``model``.

    The int8 record goes into the transformer's config, so :func:`load_sentence_transformer` rebuilds the int8 modules
    (plain ``SentenceTransformer(folder)`` cannot). ``kwargs`` are forwarded to `quantize_model`.
    """
    quantize_model(transformer_module(model).auto_model, **kwargs)
    return model


def save_sentence_transformer(model: nn.Module, path: str | os.PathLike) -> bool:
    """Record the per-layer structure of the transformer, then ``model.save(path)``.

    Returns:
        `bool`: whether plain ``SentenceTransformer(path)`` loads the folder; when it does not (fewer heads in a
        BERT-like family, per-layer differences, int8), a warning says to load it with ``hf_compress.from_pretrained``.
    """
    inner = transformer_module(model).auto_model
    record_structure(inner)
    model.save(os.fspath(path))
    plain = not needs_loader(inner.config.to_dict())
    if not plain:
        logger.warning(
            f"{os.fspath(path)!r} holds shapes its {inner.config.model_type} config cannot express (fewer heads "
            f"per layer, per-layer sizes or int8 weights); load it with "
            f"`hf_compress.from_pretrained({os.fspath(path)!r})` (a SentenceTransformer), not `SentenceTransformer`."
        )
    return plain


def sentence_transformer_folder(path: Any, **hub_kwargs: Any) -> Path | None:
    """The local sentence-transformers folder that ``path`` names, or ``None`` when it names none.

    A local folder with a ``modules.json`` is returned as is; a Hub repo id whose repo has a ``modules.json`` is
    downloaded (``snapshot_download``) and its snapshot returned. Anything else (a transformers folder or repo, an
    unreachable or missing repo) gives ``None``, so that the transformers loader reports on it.

    Args:
        path (`str` or `os.PathLike`): a folder or a Hub repo id.
        hub_kwargs: forwarded to ``hf_hub_download`` / ``snapshot_download`` (`revision`, `token`, `cache_dir`, ...).
    """
    if is_sentence_transformer_folder(path):
        return Path(path)
    repo = hub_id(path) if isinstance(path, str) else None
    if repo is None:
        return None
    try:
        hf_hub_download(repo, "modules.json", **hub_kwargs)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None  # not a sentence-transformers repo, or not reachable: the transformers loader says which
    return Path(snapshot_download(repo, **hub_kwargs))


def load_sentence_transformer(path: str | os.PathLike, **kwargs: Any):
    """Load a ``SentenceTransformer`` folder hf_compress compressed (pruned, layer-dropped, int8 or plain).

    Folders whose shapes the transformers config expresses go straight to ``SentenceTransformer(path)``. Otherwise
    the other modules (pooling, normalisation ...) are loaded by sentence-transformers and the transformer's model is
    rebuilt by [`~hf_compress.from_pretrained`] (recorded per-layer shapes, int8 modules, strict weights).

    Args:
        path (`str` or `os.PathLike`): a local folder written by `model.save` / :func:`save_sentence_transformer`.
        kwargs: forwarded to `SentenceTransformer` (e.g. `device`).

    Returns:
        The `SentenceTransformer`, in eval mode, with the embeddings it had when saved.

    Example:

    >>> from hf_compress.integrations.sentence_transformers import load_sentence_transformer
    >>> model = load_sentence_transformer("minilm-compressed")  # doctest: +SKIP
    """
    from sentence_transformers import SentenceTransformer  # heavy optional dependency

    path = Path(path)
    inner_dir = transformer_folder(path)
    config = json.loads((inner_dir / "config.json").read_text())
    if not needs_loader(config):
        return SentenceTransformer(str(path), **kwargs).eval()
    # sentence-transformers builds the float skeleton from the config's original sizes; its weights are replaced below
    model_kwargs = {**kwargs.pop("model_kwargs", {}), "ignore_mismatched_sizes": True}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the skeleton's size-mismatch report is expected, not a problem
    try:
        model = SentenceTransformer(str(path), model_kwargs=model_kwargs, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    transformer_module(model).model = from_pretrained(inner_dir).to(model.device)
    return model.eval()


# ---- evaluation ---------------------------------------------------------------------------------------------------


def read_mrpc(
    split: Literal["train", "test"] = "test", limit: int | None = None, path: str | os.PathLike | None = None
) -> tuple[list[str], list[str], list[int]]:
    """``(sentences1, sentences2, labels)`` of an MRPC split (label 1 = paraphrase), the first ``limit`` pairs.

    Args:
        split (`str`, *optional*, defaults to `"test"`): `"train"` (4,076 pairs) or `"test"` (1,725 pairs).
        limit (`int`, *optional*): keep only the first pairs.
        path (`str`, *optional*): the MRPC folder; defaults to the repository's `data/mrpc`.
    """
    if split not in MRPC_FILES:
        raise ValueError(f"`split` must be one of {list(MRPC_FILES)}, got {split!r}.")
    file = Path(path or MRPC_DIR) / MRPC_FILES[split]
    if not file.is_file():
        raise FileNotFoundError(f"`path` has no {MRPC_FILES[split]} (looked for {str(file)!r}); pass the MRPC folder.")
    first, second, labels = [], [], []
    with open(file, encoding="utf-8-sig") as f:  # UTF-8 with BOM, tab-separated, quotes are literal text
        next(f)  # header: Quality, #1 ID, #2 ID, #1 String, #2 String
        for line in f:
            quality, _, _, one, two = line.rstrip("\r\n").split("\t")
            first.append(one)
            second.append(two)
            labels.append(int(quality))
            if limit is not None and len(labels) >= limit:
                break
    return first, second, labels


def evaluate_pairs(
    model: nn.Module,
    sentences1: Sequence[str],
    sentences2: Sequence[str],
    labels: Sequence[int],
    batch_size: int = 32,
) -> dict[str, float]:
    """Cosine-similarity metrics of sentence pairs with sentence-transformers' ``BinaryClassificationEvaluator``.

    Returns:
        `dict`: ``cosine_accuracy``, ``cosine_ap`` (average precision), ``cosine_f1``, ``cosine_precision``,
        ``cosine_recall``, ``cosine_mcc`` and the thresholds the evaluator picked, as floats.
    """
    # heavy optional dependency
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator

    if not len(sentences1) == len(sentences2) == len(labels) or not labels:
        raise ValueError(
            f"`sentences1`, `sentences2` and `labels` must have the same non-zero length, got {len(sentences1)}, "
            f"{len(sentences2)} and {len(labels)}."
        )
    if set(labels) - {0, 1}:
        raise ValueError(f"`labels` must be 0 or 1, got {sorted(set(labels) - {0, 1})[:5]}.")
    evaluator = BinaryClassificationEvaluator(
        list(sentences1),
        list(sentences2),
        list(labels),
        name="pairs",
        batch_size=batch_size,
        write_csv=False,
        similarity_fn_names=["cosine"],
    )
    return {key.removeprefix("pairs_"): float(value) for key, value in evaluator(model).items()}


def evaluate_mrpc(
    model: nn.Module, split: Literal["train", "test"] = "test", limit: int | None = None, batch_size: int = 32
) -> dict[str, float]:
    """:func:`evaluate_pairs` on MRPC (``data/mrpc``): ``cosine_accuracy``, ``cosine_ap`` ...

    Example:

    >>> evaluate_mrpc(model)["cosine_ap"]  # doctest: +SKIP
    0.83
    """
    return evaluate_pairs(model, *read_mrpc(split, limit), batch_size=batch_size)


__all__ = [
    "evaluate_mrpc",
    "evaluate_pairs",
    "is_sentence_transformer",
    "is_sentence_transformer_folder",
    "load_sentence_transformer",
    "make_sentence_student",
    "prune_sentence_vocabulary",
    "quantize_sentence_transformer",
    "read_mrpc",
    "save_sentence_transformer",
    "sentence_transformer_folder",
    "transformer_folder",
    "transformer_module",
]
