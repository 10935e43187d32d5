"""Sparsity schedules: pure functions from a training step to the fraction of a target that is removed.

Each schedule maps training progress ``p`` in [0, 1] (between ``start_step`` and ``end_step``) to the fraction of the
way from the initial to the final sparsity. ``"cubic"`` is the gradual magnitude pruning schedule of Zhu & Gupta
(2017), ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def one_shot(progress: float) -> float:
    """Everything at once: the final sparsity from ``start_step`` on."""
    return 1.0


def linear(progress: float) -> float:
    """Sparsity grows linearly from ``start_step`` to ``end_step``."""
    return progress


def cubic(progress: float) -> float:
    """Zhu & Gupta: fast pruning early (while the network is plastic), slow near the end."""
    return 1.0 - (1.0 - progress) ** 3


SCHEDULES: dict[str, Callable[[float], float]] = {"one_shot": one_shot, "linear": linear, "cubic": cubic}


def is_pruning_step(step: int, start_step: int, end_step: int, frequency: int = 1, schedule: str = "cubic") -> bool:
    """Whether masks are updated at ``step``: ``start_step``, every ``frequency`` steps after it, and ``end_step``.

    Example:

    >>> [s for s in range(12) if is_pruning_step(s, start_step=2, end_step=9, frequency=3)]
    [2, 5, 8, 9]
    """
    if schedule == "one_shot":
        return step == start_step
    if step < start_step or step > end_step:
        return False
    return (step - start_step) % frequency == 0 or step == end_step


def sparsity_at(
    step: int,
    sparsity: float,
    schedule: str = "cubic",
    start_step: int = 0,
    end_step: int | None = None,
    frequency: int = 1,
    initial_sparsity: float = 0.0,
) -> float:
    """Target sparsity after ``step`` optimizer steps.

    The value only changes on pruning steps (multiples of ``frequency`` after ``start_step``, and ``end_step``);
    it is 0 before ``start_step`` and ``sparsity`` from ``end_step`` on.

    Args:
        step (`int`): The training step (number of optimizer steps done).
        sparsity (`float`): Final sparsity ``s_f``, in [0, 1).
        schedule (`str`, *optional*, defaults to `"cubic"`): One of `"one_shot"`, `"linear"`, `"cubic"`.
        start_step (`int`, *optional*, defaults to `0`): Step ``t0`` of the first pruning.
        end_step (`int`, *optional*): Step ``t0 + n dt`` at which ``sparsity`` is reached; defaults to `start_step`.
        frequency (`int`, *optional*, defaults to `1`): Pruning interval ``dt``.
        initial_sparsity (`float`, *optional*, defaults to `0.0`): Sparsity ``s_i`` at ``start_step``.

    Example:

    >>> sparsity_at(5, 0.8, "linear", start_step=0, end_step=10)
    0.4
    >>> round(sparsity_at(5, 0.8, "cubic", start_step=0, end_step=10), 3)
    0.7
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {list(SCHEDULES)}, got {schedule!r}.")
    end_step = start_step if end_step is None else end_step
    if step < start_step:
        return 0.0
    if step >= end_step or schedule == "one_shot":
        return sparsity
    last = start_step + (step - start_step) // frequency * frequency  # the latest pruning step <= step
    progress = (last - start_step) / (end_step - start_step)
    value = initial_sparsity + (sparsity - initial_sparsity) * SCHEDULES[schedule](progress)
    return float(min(max(value, 0.0), sparsity))


def units_to_remove(sparsity: float, total: int) -> int:
    """How many of ``total`` units a sparsity removes (nearest integer, never all of them)."""
    return min(int(math.floor(sparsity * total + 0.5)), max(total - 1, 0))


def kept_hidden_size(size: int, sparsity: float, multiple: int, kept: int | None = None) -> int:
    """Hidden channels kept at ``sparsity`` of ``size``: the nearest positive multiple of ``multiple`` (ties keep
    more), never more than the ``kept`` channels still alive (masks only grow).

    Used by the ``hidden`` target of the PruningCallback at every pruning step and by the dry-run plan.

    >>> kept_hidden_size(16, 0.2, 4)  # 3 channels would leave 13: round to 12
    12
    >>> kept_hidden_size(16, 0.99, 4)  # never 0
    4
    >>> kept_hidden_size(16, 0.1, 4, kept=12)  # already at 12: nothing revives
    12
    """
    kept = size if kept is None else kept
    target = size - units_to_remove(sparsity, size)
    if target >= kept and kept % multiple == 0:
        return kept
    floor = kept // multiple * multiple
    if floor == 0:
        raise ValueError(
            f"`targets` left {kept} hidden channels alive, fewer than the {multiple} (num_attention_heads) that every "
            "saved hidden size must be a multiple of; lower the `hidden` sparsity."
        )
    return min(max(multiple, int(math.floor(target / multiple + 0.5)) * multiple), floor)
