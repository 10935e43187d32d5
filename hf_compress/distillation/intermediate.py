"""Hidden-state and attention transfer of [`DistillationTrainer`]: which layers are matched, and their losses.

Plain functions on the models' configs and outputs, so that the trainer keeps only the Trainer glue:
[`resolve_layer_map`] checks the options against both models and returns the student → teacher layer map (switching
both models to eager attention when attention maps are needed), [`projection_widths`] says whether the student's
states need a [`~hf_compress.distillation.callbacks.HiddenProjection`], [`output_flags`] names the extra outputs the
forward passes must return, and [`mapped_hidden_loss`] / [`mapped_attention_loss`] average the per-layer terms of
[`~hf_compress.distillation.losses`] over the layer map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from hf_compress.distillation.checks import check_layer_map
from hf_compress.distillation.config import default_layer_map
from hf_compress.distillation.losses import HiddenLoss, attention_loss, hidden_state_loss

logger = logging.get_logger(__name__)


def resolve_layer_map(options: dict[str, Any], student: nn.Module, teacher: nn.Module | None, head: str) -> dict:
    """
    The student → teacher layer map read by the hidden-state and attention losses (`{}` when both weights are 0).

    Raises a `ValueError` for a `layer_map` out of range, an intermediate loss with cached teacher outputs (`teacher`
    is `None`) or an encoder-decoder student, and an attention loss between models with different head counts.
    Switches `student` and `teacher` to eager attention when an attention loss needs their attention maps.

    Args:
        options (`dict`): The distillation options (see [`~hf_compress.distillation.config.distillation_options`]).
        student (`nn.Module`): The (unwrapped) student.
        teacher (`nn.Module`, *optional*): The teacher, or `None` when the training set holds cached teacher outputs.
        head (`str`): The student's head, one of `DISTILLED_HEADS`.
    """
    if teacher is not None and options["layer_map"]:  # checked whether or not a hidden / attention loss reads it
        check_layer_map(options["layer_map"], student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    if options["hidden_loss_weight"] == 0 and options["attention_loss_weight"] == 0:
        return {}
    if teacher is None:
        raise ValueError(
            "`hidden_loss_weight` and `attention_loss_weight` must be 0 with cached teacher outputs (no teacher "
            f"states are stored), got {options['hidden_loss_weight']} and {options['attention_loss_weight']}."
        )
    if head == "seq2seq_lm":
        raise ValueError(
            "`hidden_loss_weight` and `attention_loss_weight` must be 0 for encoder-decoder students, got "
            f"{options['hidden_loss_weight']} and {options['attention_loss_weight']}."
        )
    n_student, n_teacher = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    layer_map = options["layer_map"] or default_layer_map(n_student, n_teacher)
    if options["attention_loss_weight"] > 0:
        heads = (student.config.num_attention_heads, teacher.config.num_attention_heads)
        if heads[0] != heads[1]:
            raise ValueError(
                f"`attention_loss_weight` needs equal head counts, got student {heads[0]} and teacher "
                f"{heads[1]}; set `attention_loss_weight=0`."
            )
        for m in (student, teacher):
            if m.config._attn_implementation != "eager":
                logger.info(f"Switching {type(m).__name__} to eager attention to return attention maps.")
                m.set_attn_implementation("eager")
    return layer_map


def projection_widths(options: dict[str, Any], student: nn.Module, teacher: nn.Module) -> tuple[int, int] | None:
    """`(student, teacher)` hidden sizes when a hidden-state loss needs a projection between them, else `None`."""
    widths = (student.config.hidden_size, teacher.config.hidden_size)
    return widths if options["hidden_loss_weight"] > 0 and widths[0] != widths[1] else None


def output_flags(options: dict[str, Any]) -> dict[str, bool]:
    """The `output_hidden_states` / `output_attentions` keyword arguments the intermediate losses need.

    >>> output_flags({"hidden_loss_weight": 1.0, "attention_loss_weight": 0.0})
    {'output_hidden_states': True}
    """
    flags = {}
    if options["hidden_loss_weight"] > 0:
        flags["output_hidden_states"] = True
    if options["attention_loss_weight"] > 0:
        flags["output_attentions"] = True
    return flags


def mapped_hidden_loss(
    outputs: Any,
    teacher_outputs: Any,
    layer_map: dict[int, int],
    kind: HiddenLoss,
    mask: torch.Tensor | None = None,
    projection: nn.Module | None = None,
) -> torch.Tensor:
    """
    [`hidden_state_loss`] averaged over the `layer_map` pairs of transformer layers (`hidden_states[i + 1]`: index 0
    is the embedding output), with the student states passed through `projection` first when given.
    """
    student_states = [outputs.hidden_states[s + 1] for s in layer_map]
    teacher_states = [teacher_outputs.hidden_states[t + 1] for t in layer_map.values()]
    if projection is not None:
        student_states = projection(student_states)
    losses = [hidden_state_loss(s, t, kind, mask) for s, t in zip(student_states, teacher_states)]
    return torch.stack(losses).mean()


def mapped_attention_loss(
    outputs: Any, teacher_outputs: Any, layer_map: dict[int, int], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[`attention_loss`] averaged over the `layer_map` pairs of attention maps."""
    student_maps, teacher_maps = outputs.attentions, teacher_outputs.attentions
    losses = [attention_loss(student_maps[s], teacher_maps[t], mask) for s, t in layer_map.items()]
    return torch.stack(losses).mean()
