"""Checks of [`DistillationTrainer`] inputs and losses, one rule per concept and the same for every head.

* :func:`check_input_vocabulary`: teacher and student read the same `input_ids`, so both embedding tables (and the
  tokenizer, when known) must cover them: sequence / token classification and QA included, not only LM heads;
* :func:`check_layer_map`: `layer_map` indices are in range for both models, whether or not a hidden / attention
  loss uses them;
* :func:`check_labels`: class / token labels lie in `[0, num_classes)` or are `-100`, checked on each batch before
  the loss kernel (which would fail with an opaque `IndexError` or a device-side assert); a batch whose labels are
  all `-100` is warned about once;
* :func:`check_finite_components`: the first non-finite loss component (soft / hard / hidden / attention) stops
  training in `compute_loss`, before `backward()` and the optimizer step could write NaN into the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import logging

from hf_compress.checks import NonFiniteError

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

# Likely cause of a non-finite loss component, by component name.
CAUSES = {
    "loss_soft": "non-finite teacher logits (check the teacher or its cached outputs) or an overflow at this "
    "`temperature` in half precision",
    "loss_hard": "non-finite student logits: lower `learning_rate`, or check the inputs and labels",
    "loss_hidden": "non-finite hidden states of the teacher or student (overflow in half precision?)",
    "loss_attention": "non-finite attention maps of the teacher or student (overflow in half precision?)",
}


def embedding_rows(model: nn.Module) -> int | None:
    """Rows of the input embedding table of `model` (`None` when it has none)."""
    model = unwrap_peft_model(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return None if weight is None else int(weight.shape[0])


def check_input_vocabulary(student: nn.Module, teacher: nn.Module, processing_class: Any = None) -> None:
    """Raise a `ValueError` when `student` and `teacher` cannot read the same token ids, for every head type.

    The teacher's table may be larger (padding rows); a smaller one means another tokenizer, and the teacher would
    fail on ids the student accepts. With a tokenizer (`processing_class` with a length), every one of its ids must
    fit both tables.
    """
    rows = {"student": embedding_rows(student), "teacher": embedding_rows(teacher)}
    if rows["student"] is None or rows["teacher"] is None:
        return
    if rows["teacher"] < rows["student"]:
        raise ValueError(
            f"`teacher_model` input vocabulary ({rows['teacher']} rows) is smaller than the student's "
            f"({rows['student']}); use a teacher and student that share the tokenizer."
        )
    tokens = len(processing_class) if hasattr(processing_class, "__len__") else None
    if tokens is not None and tokens > rows["student"]:
        raise ValueError(
            f"`processing_class` has {tokens} tokens but the student embeds only {rows['student']}; pass the "
            "tokenizer of the student (or resize its embeddings)."
        )


def check_layer_map(layer_map: dict[int, int] | None, num_student_layers: int, num_teacher_layers: int) -> None:
    """Raise a `ValueError` for a `layer_map` entry outside `[0, layers)` of the student (key) or teacher (value)."""
    for s, t in (layer_map or {}).items():
        if not (0 <= s < num_student_layers and 0 <= t < num_teacher_layers):
            raise ValueError(
                f"`layer_map` entry {s}: {t} is out of range for a {num_student_layers}-layer student and "
                f"{num_teacher_layers}-layer teacher; use 0-based layer indices."
            )


def label_classes(model: nn.Module, head: str) -> int | None:
    """How many values a label may take for `head` (classes, or vocabulary rows for LM heads), or `None`."""
    model = unwrap_peft_model(model)
    if head in ("seq_cls", "token_cls"):
        if getattr(model.config, "problem_type", None) in ("regression", "multi_label_classification"):
            return None
        return int(model.config.num_labels)
    if head in ("causal_lm", "masked_lm", "seq2seq_lm"):
        embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)
    return None  # QA positions are clamped to the sequence, as the models do


class LabelChecker:
    """Check the labels of each batch against `num_classes`; warn once when a batch has no label to learn from.

    Args:
        num_classes (`int`, *optional*): Valid labels are `[0, num_classes)` and `-100`; `None` skips the range check.
    """

    def __init__(self, num_classes: int | None):
        self.num_classes = num_classes
        self.warned = False

    def __call__(self, labels: torch.Tensor | None, step: int, hard_weight: float) -> None:
        if labels is None or labels.is_floating_point():
            return
        valid = labels != IGNORE_INDEX
        count, low, high = torch.stack(
            [valid.sum(), labels.masked_fill(~valid, 0).min(), labels.masked_fill(~valid, 0).max()]
        ).tolist()  # one host sync for the three numbers
        if count and self.num_classes is not None and (low < 0 or high >= self.num_classes):
            bad = low if low < 0 else high
            raise ValueError(
                f"`labels` must be in [0, {self.num_classes}) or {IGNORE_INDEX}, got {bad} in the batch of step "
                f"{step}; fix the label column or `num_labels` of the model."
            )
        if not count and not self.warned:
            self.warned = True
            logger.warning(
                f"Every label of the batch at step {step} is {IGNORE_INDEX} (ignored): the label loss"
                + (f" (weight {hard_weight:g})" if hard_weight else "")
                + " and every token-level term are 0 for it; check the label column / label masking."
            )


def check_finite_components(components: dict[str, torch.Tensor], step: int) -> None:
    """Raise a [`NonFiniteError`] naming `step` and the first non-finite loss component, with its likely cause.

    Called before `backward()`, so the optimizer never steps on a NaN gradient and checkpoints stay as they were.
    One host sync for all components.
    """
    names = [name for name in CAUSES if name in components]
    if not names:
        return
    values = torch.stack([components[name].detach().float().reshape(()) for name in names])
    if bool(torch.isfinite(values).all()):
        return
    for name, value in zip(names, values.tolist()):
        if not torch.isfinite(torch.tensor(value)):
            raise NonFiniteError(
                f"`{name}` is {value} at step {step}, so training stops before the optimizer step corrupts the "
                f"weights; likely cause: {CAUSES[name]}. The last saved checkpoint is intact."
            )
