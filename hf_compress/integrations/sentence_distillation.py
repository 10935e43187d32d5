"""Embedding distillation for sentence-transformers: student sentence embeddings regress the teacher's.

:class:`EmbeddingDistillationLoss` is a sentence-transformers loss (``SentenceTransformerTrainer(loss=...)``);
:func:`embedding_distillation_loss` is its pure tensor math and :func:`add_teacher_embeddings` precomputes the targets
when the teacher cannot read the student's token ids (e.g. after vocabulary pruning). sentence-transformers itself is
never imported here: the loss only calls the models it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from hf_compress.integrations.sentence_transformers import transformer_module

EMBEDDING_LOSSES = {
    "mse": "mean squared error between student and teacher embeddings",
    "cosine": "1 - cosine similarity between student and teacher embeddings",
}


def embedding_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: Literal["mse", "cosine"] = "mse"
) -> torch.Tensor:
    """Distance between student and teacher embeddings ``[batch, dim]`` (same width): one of `EMBEDDING_LOSSES`."""
    if kind not in EMBEDDING_LOSSES:
        raise ValueError(f"`kind` must be one of {list(EMBEDDING_LOSSES)}, got {kind!r}.")
    teacher = teacher.to(student.device, student.dtype)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def _vocabulary(model: nn.Module) -> dict[str, int] | None:
    tokenizer = transformer_module(model).tokenizer
    return None if tokenizer is None else tokenizer.get_vocab()


class EmbeddingDistillationLoss(nn.Module):
    r"""
    A sentence-transformers loss: the student's sentence embeddings regress the teacher's (embedding distillation).

    Follows sentence-transformers' loss conventions (`model` attribute, `forward(sentence_features, labels)`), so it
    goes into `SentenceTransformerTrainer(loss=...)`. Each text column of the batch is embedded by the student and
    compared with the teacher's embedding of the same column. The teacher runs online when it tokenizes like the
    student; after vocabulary pruning it cannot read the student's token ids, so precompute its embeddings with
    :func:`add_teacher_embeddings` (a `label` column, as for sentence-transformers' `MSELoss`). When the widths
    differ, a learned `nn.Linear(student_dim, teacher_dim)` (`projection`, trained with the student, not saved with
    it) maps the student's embeddings first.

    Args:
        model (`SentenceTransformer`): the student, trained.
        teacher (`SentenceTransformer`): frozen and kept in eval mode.
        kind (`Literal["mse", "cosine"]`, *optional*, defaults to `"mse"`): one of `EMBEDDING_LOSSES`.

    Example:

    >>> from sentence_transformers import SentenceTransformerTrainer
    >>> loss = EmbeddingDistillationLoss(student, teacher, kind="cosine")  # doctest: +SKIP
    >>> SentenceTransformerTrainer(model=student, train_dataset=texts, loss=loss).train()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, kind: Literal["mse", "cosine"] = "mse"):
        super().__init__()
        if kind not in EMBEDDING_LOSSES:
            raise ValueError(f"`kind` must be one of {list(EMBEDDING_LOSSES)}, got {kind!r}.")
        self.model = model
        self.teacher = teacher.eval().requires_grad_(False)
        self.kind = kind
        student_dim, teacher_dim = model.get_embedding_dimension(), teacher.get_embedding_dimension()
        self.teacher_dim = teacher_dim
        self.projection = None
        if student_dim != teacher_dim:
            self.projection = nn.Linear(student_dim, teacher_dim, device=model.device)
        self.same_tokenizer = _vocabulary(model) == _vocabulary(teacher)

    def train(self, mode: bool = True) -> EmbeddingDistillationLoss:
        super().train(mode)
        self.teacher.eval()  # no dropout in the targets
        return self

    def _targets(self, features: list[dict], labels: torch.Tensor | None) -> list[torch.Tensor]:
        if isinstance(labels, torch.Tensor) and labels.ndim in (2, 3) and labels.shape[-1] == self.teacher_dim:
            labels = labels.detach()
            if labels.ndim == 3 and labels.shape[1] != len(features):
                raise ValueError(
                    f"`labels` holds teacher embeddings for {labels.shape[1]} columns but the batch has "
                    f"{len(features)} text columns; add one embedding per column (or a 2-d label for all)."
                )
            return [labels if labels.ndim == 2 else labels[:, i] for i in range(len(features))]
        if not self.same_tokenizer:
            raise ValueError(
                "`teacher` tokenizes differently from the student (e.g. after vocabulary pruning), so it cannot embed "
                "the student's token ids; add its embeddings as a `label` column with `add_teacher_embeddings`."
            )
        with torch.no_grad():  # the teacher reads a copy: sentence-transformers modules write into the dict
            return [self.teacher(dict(f))["sentence_embedding"] for f in features]

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: torch.Tensor | None = None):
        features = list(sentence_features)
        targets = self._targets(features, labels)
        losses = []
        for f, target in zip(features, targets):
            student = self.model(f)["sentence_embedding"]
            if self.projection is not None:
                student = self.projection(student)
            losses.append(embedding_distillation_loss(student, target, self.kind))
        return torch.stack(losses).mean()

    def get_config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "projection": self.projection is not None}


def add_teacher_embeddings(dataset, teacher: nn.Module, column: str, batch_size: int = 64, label: str = "label"):
    """``dataset`` (a `datasets.Dataset`) with the teacher's embeddings of ``column`` in a ``label`` column.

    For :class:`EmbeddingDistillationLoss` when the teacher cannot run online (different tokenizer), or to embed the
    training texts once instead of at every epoch.
    """
    if column not in dataset.column_names:
        raise ValueError(f"`column` must be one of {dataset.column_names}, got {column!r}.")

    def embed(batch):
        return {label: teacher.encode(batch[column], batch_size=batch_size, convert_to_numpy=True).tolist()}

    return dataset.map(embed, batched=True, batch_size=batch_size)


__all__ = ["EMBEDDING_LOSSES", "EmbeddingDistillationLoss", "add_teacher_embeddings", "embedding_distillation_loss"]
