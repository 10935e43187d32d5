"""Pruning rules that need the run or the model, shared by the callback, the surgery and the recipes.

* :func:`check_schedule`: a schedule that starts or ends past the last training step would leave the model (partly)
  unpruned while the run looks fine, so it is refused in `on_train_begin`, before any step;
* :func:`check_complete_checkpoint`: a checkpoint that a crash cut short (no masks / pruning state) is never
  resumed from as if it were whole;
* :func:`check_hidden_supported`: hidden-size pruning (the `hidden` target, a `budget`) is refused up front for the
  families whose table entry says why (`Family.hidden_refused`), before the model is touched;
* :func:`check_keeps_one`: neither every head nor every FFN neuron of a layer may go (one rule for both: remove the
  whole block with `drop_layers` instead).
"""

from __future__ import annotations

import os

from hf_compress.checks import last_complete_checkpoint
from hf_compress.models.table import FAMILIES


def check_schedule(start_step: int, end_step: int | None, max_steps: int) -> None:
    """Raise a `ValueError` when `start_step` or `end_step` lies beyond `max_steps` (the run's last step).

    Args:
        start_step (`int`): First pruning step of the config.
        end_step (`int`, *optional*): Step reaching the final sparsity (`None`: the last step, always reachable).
        max_steps (`int`): The Trainer's `state.max_steps`.
    """
    if max_steps <= 0:
        return
    for name, value in (("start_step", start_step), ("end_step", end_step)):
        if value is not None and value > max_steps:
            raise ValueError(
                f"`{name}` is {value} but training ends at step {max_steps} (`max_steps` / epochs), so the final "
                f"sparsity would never be reached; set `{name}` <= {max_steps} or train longer."
            )


def check_keeps_one(name: str, layer: int, removed: int, total: int, unit: str, fix: str) -> None:
    """Raise a `ValueError` when `removed` covers all `total` units (`unit`: e.g. "FFN neurons") of `layer`."""
    if total > 0 and removed >= total:
        raise ValueError(
            f"`{name}[{layer}]` removes all {total} {unit} of layer {layer}; keep at least one, or {fix}."
        )


def check_complete_checkpoint(folder: str, required: tuple[str, ...]) -> None:
    """Raise a `ValueError` when the checkpoint `folder` exists but lacks one of `required` (a save cut short)."""
    if not os.path.isdir(folder):
        return
    missing = [name for name in required if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        previous = last_complete_checkpoint(os.path.dirname(folder), ("trainer_state.json", *required))
        raise ValueError(
            f"`resume_from_checkpoint` {folder!r} is incomplete (no {', '.join(missing)}: the run stopped while "
            f"saving it); resume from {previous!r} instead"
            + (", e.g. `resume_from_checkpoint=last_complete_checkpoint(output_dir)`." if previous else ".")
        )


def check_hidden_supported(model_type: str | None, parameter: str) -> None:
    """Raise a `ValueError` when `model_type`'s family refuses hidden-size pruning, which `parameter` asks for.

    Args:
        model_type (`str`): The model's `config.model_type`.
        parameter (`str`): What asks for hidden pruning, named in the error (e.g. "channels", "targets", "budget").

    Example:

    >>> check_hidden_supported("llama", "channels")
    >>> check_hidden_supported("vit", "channels")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `channels` asks to prune the hidden size of a 'vit' model, which hf_compress cannot do: its patch ...
    """
    family = FAMILIES.get(model_type)
    if family is not None and family.hidden_refused is not None:
        raise ValueError(
            f"`{parameter}` asks to prune the hidden size of a {model_type!r} model, which hf_compress cannot do: "
            f"{family.hidden_refused}."
        )
