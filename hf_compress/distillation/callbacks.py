"""The callbacks of [`~hf_compress.distillation.trainer.DistillationTrainer`]: the interface of its card writers and
the checkpointing of the trained hidden-state projection.

[`CardWriter`] is what the trainer asks of a model-card callback, so that `distillation/` never imports
`reporting/`; [`HiddenProjectionCheckpoint`] saves and restores [`HiddenProjection`] with the Trainer's public
callback events instead of overriding its private checkpoint methods.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from hf_compress.checks import check_finite_weights

logger = logging.get_logger(__name__)


class HiddenProjection(nn.Module):
    """Learned student-width -> teacher-width projections, one per mapped student layer."""

    def __init__(self, num_layers: int, student_width: int, teacher_width: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(num_layers))

    def forward(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p(h.to(p.weight.dtype)) for p, h in zip(self.proj, states)]


PROJECTION_FILE = "hidden_projection.safetensors"  # in checkpoints only


@runtime_checkable
class CardWriter(Protocol):
    """A trainer callback that writes the model card of the folders a trainer saves.

    [`~hf_compress.distillation.trainer.DistillationTrainer`] binds each of its callbacks that has these two methods
    (`set_trainer`, at the end of its `__init__`) and calls `write` from `save_model` (no callback event fires there)
    and `create_model_card` (called by `push_to_hub`); checkpoints are the callback's own business (`on_save`). The
    trainer gets one by default, so that every save has a card without `distillation/` depending on `reporting/`:
    `hf_compress/__init__.py` sets `DistillationTrainer.default_callbacks` to
    [`~hf_compress.reporting.card_callback.ModelCardCallback`].
    """

    def set_trainer(self, trainer: Trainer) -> None:
        """Bind the trainer whose run the card describes."""

    def write(self, folder: str, final: bool = True, **card_kwargs: Any) -> Any:
        """Write the card into `folder` (`card_kwargs`: `model_name`, `base_model`, `datasets`, `methods`, ...)."""


class FiniteWeightsCheck(TrainerCallback):
    """Refuse to write a checkpoint whose weights hold NaN or inf: checked at the end of a step that will save."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None:
            check_finite_weights(model, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class HiddenProjectionCheckpoint(TrainerCallback):
    """
    Save the trained hidden-state projection (not part of the model) into every checkpoint folder (`on_save`), and
    restore it when training resumes (`on_train_begin`, before the first step) from a checkpoint of `args.output_dir`
    or from `args.resume_from_checkpoint`.

    Args:
        projection (`nn.Module`): The unwrapped projection module.
    """

    def __init__(self, projection: nn.Module):
        self.projection = projection

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            state_dict = {k: v.detach().contiguous().cpu() for k, v in self.projection.state_dict().items()}
            save_file(state_dict, os.path.join(folder, PROJECTION_FILE))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # not resuming
            return
        # The Trainer does not tell callbacks which checkpoint it resumed: the step's folder in `output_dir`, or the
        # `args.resume_from_checkpoint` that example scripts pass on to `train()`.
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if isinstance(args.resume_from_checkpoint, str) and os.path.isdir(args.resume_from_checkpoint):
            checkpoint = args.resume_from_checkpoint
        path = os.path.join(checkpoint, PROJECTION_FILE)
        if not os.path.isfile(path):
            logger.warning(
                f"{checkpoint} has no {PROJECTION_FILE}: the hidden-state projection restarts from its initialisation."
            )
            return
        self.projection.load_state_dict(load_file(path))
