"""The logit terms of [`DistillationTrainer`]: which outputs of a head are distilled against which targets.

Plain functions on the batch and the models' outputs: [`pop_targets`] takes a head's targets out of the batch (the
forward passes must not compute their own loss), and [`logit_terms`] mixes the soft and hard terms of
[`~hf_compress.distillation.losses`] over each distilled output (start and end logits averaged for QA).
"""

from __future__ import annotations

from typing import Any

import torch

from hf_compress.distillation.losses import distillation_loss, soft_loss

# Output logits -> the input key holding their targets.
TARGETS = {"qa": {"start_logits": "start_positions", "end_logits": "end_positions"}}


def head_targets(head: str) -> dict[str, str]:
    """The distilled outputs of `head` mapped to the input keys of their targets.

    >>> head_targets("qa"), head_targets("seq_cls")
    ({'start_logits': 'start_positions', 'end_logits': 'end_positions'}, {'logits': 'labels'})
    """
    return TARGETS.get(head, {"logits": "labels"})


def pop_targets(head: str, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Remove the targets of `head` from `inputs` (in place) and return them by input key.

    >>> inputs = {"input_ids": 0, "labels": 1}
    >>> pop_targets("seq_cls", inputs), inputs
    ({'labels': 1}, {'input_ids': 0})
    """
    return {key: inputs.pop(key) for key in list(head_targets(head).values()) if key in inputs}


def logit_terms(
    head: str,
    outputs: Any,
    teacher_outputs: Any,
    inputs: dict[str, Any],
    targets: dict[str, torch.Tensor],
    options: dict[str, Any],
    alpha: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """
    `alpha * soft + (1 - alpha) * hard` over the distilled logits of `head`, and its `loss_soft` / `loss_hard`
    components. Token-level logits without targets get the soft term only, over the non-padding positions.

    Args:
        head (`str`): The student's head, one of `DISTILLED_HEADS`.
        outputs, teacher_outputs: The student's and teacher's outputs (model outputs or dicts of logits).
        inputs (`dict`): The batch without its targets (its attention masks select the positions of the soft term).
        targets (`dict`): The targets of [`pop_targets`].
        options (`dict`): The distillation options (temperature, divergence, JSD beta, loss chunk size).
        alpha (`float`): Weight of the soft term.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): Normaliser of token sums (see [`distillation_loss`]).
        label_smoothing (`float`, *optional*, defaults to 0.0): Label smoothing of the hard term.
    """
    common = dict(
        temperature=options["temperature"],
        divergence=options["distillation_loss"],
        beta=options["jsd_beta"],
        chunk_size=options["loss_chunk_size"],
    )
    pairs = head_targets(head)
    total, soft, hard = 0.0, 0.0, 0.0
    for logits_key, target_key in pairs.items():
        student, teacher = (
            model_output(outputs, logits_key, "student"),
            model_output(teacher_outputs, logits_key, "teacher"),
        )
        labels = targets.get(target_key)
        if labels is not None and head == "qa":  # out-of-span positions are ignored, as in the model
            labels = labels.reshape(-1)
            labels = labels.clamp(0, student.shape[1]).masked_fill(labels >= student.shape[1], -100)
        if labels is None and student.dim() == 3:  # soft term only, over the non-padding positions
            mask = inputs.get("decoder_attention_mask" if head == "seq2seq_lm" else "attention_mask")
            part = soft_loss(student, teacher, None if mask is None else mask.bool(), **common)
            parts = {"soft": part, "hard": torch.zeros_like(part)}
        else:
            part, parts = distillation_loss(
                student,
                teacher,
                labels,
                alpha=alpha,
                shift_labels=head == "causal_lm",
                num_items_in_batch=num_items_in_batch,
                label_smoothing=label_smoothing,
                return_components=True,
                **common,
            )
        total, soft, hard = total + part, soft + parts["soft"], hard + parts["hard"]
    n = len(pairs)
    return total / n, {"loss_soft": soft / n, "loss_hard": hard / n}


def model_output(outputs: Any, key: str, who: str) -> torch.Tensor:
    """`outputs[key]`, or a `ValueError` naming `who` (`"student"` / `"teacher"`) when the model did not return it."""
    value = outputs.get(key) if hasattr(outputs, "get") else None
    if value is None:
        keys = list(outputs.keys()) if hasattr(outputs, "keys") else type(outputs).__name__
        raise ValueError(f"The {who} model must return `{key}` to be distilled, got outputs {keys}.")
    return value
