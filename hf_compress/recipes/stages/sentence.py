"""What the stages of a ``sentence-embedding`` recipe do differently: every model is a ``SentenceTransformer`` folder.

The teacher is a sentence-transformers folder (``builtin:all-MiniLM-L6-v2``, a saved folder or a Hub id) and the data
are sentence pairs with a 0/1 label (:func:`hf_compress.recipes.data.load_text_dataset`). Students regress the
teacher's sentence embeddings (:class:`~hf_compress.integrations.sentence_distillation.EmbeddingDistillationLoss`,
``training.hidden_loss``: ``mse`` or ``cosine``, a learned projection when the widths differ) in a
``SentenceTransformerTrainer``; pruning puts ``PruningCallback`` into that run; every model is measured with
sentence-transformers' own pair evaluator (:func:`~hf_compress.integrations.sentence_transformers.evaluate_pairs`).
sentence-transformers is imported only when such a recipe runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from hf_compress.distillation.config import DistillationConfig
from hf_compress.integrations.sentence_distillation import EmbeddingDistillationLoss
from hf_compress.integrations.sentence_transformers import (
    evaluate_pairs,
    load_sentence_transformer,
    save_sentence_transformer,
    transformer_module,
)
from hf_compress.models.builtin import resolve_model_path
from hf_compress.recipes.data import PAIR_COLUMNS
from hf_compress.reporting.measure import model_report

TASK = "sentence-embedding"
PAIR_METRICS = ("cosine_accuracy", "cosine_ap", "cosine_f1")  # the evaluator's thresholds are not quality metrics
# DistillationConfig fields an embedding stage reads; the others (logit losses, hidden-state maps) do not apply
EMBEDDING_DISTILLATION_KEYS = ("hidden_loss",)
TRAINING_DEFAULTS = {"report_to": "none", "save_strategy": "no", "eval_strategy": "no", "logging_steps": 50}


def distillation_only_keys() -> set[str]:
    """The ``DistillationConfig`` fields that are not ``TrainingArguments`` ones (and not read here)."""
    own = {f.name for f in dataclasses.fields(DistillationConfig)} - {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    return own - set(EMBEDDING_DISTILLATION_KEYS)


def load(path: str | Path, device: str | None = None):
    """The ``SentenceTransformer`` of a stage folder, the teacher folder, a ``builtin:`` name or a Hub id."""
    folder = resolve_model_path(path)
    if Path(folder).is_dir():
        return load_sentence_transformer(folder, device=device)
    from sentence_transformers import SentenceTransformer  # heavy optional dependency; a Hub id

    return SentenceTransformer(folder, device=device).eval()


def save(model, out_dir: Path) -> None:
    """Save every module of ``model`` (the transformer's per-layer structure recorded)."""
    save_sentence_transformer(model, out_dir)


def pair_metrics(model, pairs) -> dict[str, float]:
    """:data:`PAIR_METRICS` of ``model`` on a pair dataset (``sentence1``, ``sentence2``, ``label``)."""
    first, second = PAIR_COLUMNS
    metrics = evaluate_pairs(model, pairs[first], pairs[second], [int(v) for v in pairs["label"]])
    return {key: metrics[key] for key in PAIR_METRICS}


def latency_inputs(model, pairs, rows: int = 32) -> dict[str, torch.Tensor] | None:
    """Token ids of real eval sentences (as the model tokenises them), to time its transformer."""
    if pairs is None or len(pairs) == 0:
        return None
    features = model.preprocess(list(pairs[PAIR_COLUMNS[0]][:rows]))
    return {k: v for k, v in features.items() if isinstance(v, torch.Tensor) and k in ("input_ids", "attention_mask")}


def report(model, folder: Path | None, pairs, timed: bool = False, metrics: bool = True) -> dict[str, Any]:
    """Size of the transformer inside ``model``, its pair metrics on ``pairs`` (unless ``metrics=False``) and, when
    ``timed``, its CPU latency at batch 1 and 32 on real eval sentences."""
    inner = transformer_module(model).auto_model
    inputs = latency_inputs(model, pairs) if timed else None
    out = model_report(inner, folder, latency_inputs=inputs, batch_sizes=(1, 32) if inputs is not None else ())
    if metrics and pairs is not None:
        out["metrics"] = pair_metrics(model, pairs)
    return out


def training_args(training: dict[str, Any], out_dir: Path, seed: int):
    """``SentenceTransformerTrainingArguments`` of a validated ``training`` section (``hidden_loss`` left out)."""
    from sentence_transformers import SentenceTransformerTrainingArguments  # heavy optional dependency

    kwargs = {k: v for k, v in training.items() if k not in EMBEDDING_DISTILLATION_KEYS}
    return SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), **{"seed": seed, **TRAINING_DEFAULTS, **kwargs}
    )


def trainer(model, teacher, training: dict[str, Any], out_dir: Path, seed: int, train_pairs, callbacks=()):
    """A ``SentenceTransformerTrainer``: embedding distillation from ``teacher``, or (``teacher=None``) fine-tuning
    on the pair labels with ``CosineSimilarityLoss``."""
    from sentence_transformers import SentenceTransformerTrainer  # heavy optional dependency
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    if teacher is not None:
        kind = training.get("hidden_loss", "mse")
        loss = EmbeddingDistillationLoss(model, teacher, kind=kind)
        dataset = train_pairs.select_columns(list(PAIR_COLUMNS))  # targets: the teacher's embeddings, online
    else:
        loss = CosineSimilarityLoss(model)
        dataset = train_pairs.map(lambda row: {"label": float(row["label"])})
    return SentenceTransformerTrainer(
        model=model,
        args=training_args(training, out_dir, seed),
        train_dataset=dataset,
        loss=loss,
        callbacks=list(callbacks),
    )


__all__ = [
    "EMBEDDING_DISTILLATION_KEYS",
    "PAIR_METRICS",
    "TASK",
    "distillation_only_keys",
    "load",
    "pair_metrics",
    "report",
    "save",
    "trainer",
    "training_args",
]
