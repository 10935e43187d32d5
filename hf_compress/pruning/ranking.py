"""Which units a sparsity removes: the lowest-scored ones, never reviving a removed one (pure functions on tensors).

Used for heads, FFN neurons, hidden channels and experts' neurons alike (:mod:`~hf_compress.pruning.selection`,
:mod:`~hf_compress.pruning.experts`, :class:`~hf_compress.pruning.callback.PruningCallback`); the result is a
keep-mask per layer (``True`` = kept) for :class:`~hf_compress.pruning.masks.PruningMasks`.
"""

from __future__ import annotations

import torch

from hf_compress.pruning.importance import normalize_per_layer
from hf_compress.pruning.schedules import units_to_remove


def select_units(
    scores: dict[int, torch.Tensor],
    keep: dict[int, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    min_keep: int = 1,
) -> dict[int, torch.Tensor]:
    """New keep-masks removing the lowest-scored ``sparsity`` fraction of units, never reviving removed ones.

    Args:
        scores (`dict[int, torch.Tensor]`): Layer -> score of each unit (higher = more important).
        keep (`dict[int, torch.BoolTensor]`): Layer -> current keep-mask; removed units stay removed.
        sparsity (`float`): Fraction of all units (``"global"``) or of each layer's units (``"local"``) to remove.
        scope (`str`, *optional*, defaults to `"global"`): Global ranking uses scores normalised per layer.
        min_keep (`int`, *optional*, defaults to `1`): Units every layer keeps.

    Example:

    >>> select_units({0: torch.tensor([3.0, 1.0, 2.0])}, {0: torch.ones(3, dtype=torch.bool)}, 0.34)
    {0: tensor([ True, False,  True])}
    """
    layers = sorted(scores)
    if scope == "global":
        scores = normalize_per_layer(scores)
        groups = [layers]
    else:
        groups = [[layer] for layer in layers]
    new = {layer: keep[layer].clone() for layer in layers}
    for group in groups:
        # Walk the units from the lowest score up (removed units first, as -inf) and remove every unit whose layer
        # still has more than `min_keep` units, until `target` units are gone. Vectorised: a kept unit is eligible
        # when fewer than `kept - min_keep` kept units of its layer come before it; the first `budget` eligible go.
        alive = torch.cat([keep[lay] for lay in group])
        flat = torch.cat([torch.where(keep[lay], scores[lay].float(), -torch.inf) for lay in group])
        sizes = [len(scores[lay]) for lay in group]
        already = int((flat == -torch.inf).sum())
        budget = units_to_remove(sparsity, flat.numel()) - already
        if budget <= 0:
            continue
        order = torch.sort(flat, stable=True).indices
        owner = torch.repeat_interleave(torch.arange(len(group)), torch.tensor(sizes))[order]
        alive = alive[order]
        eligible = torch.zeros_like(alive)
        for position, lay in enumerate(group):
            mine = alive & (owner == position)
            eligible |= mine & (mine.cumsum(0) <= int(keep[lay].sum()) - min_keep)
        drop = torch.zeros_like(alive)
        drop[order[eligible & (eligible.cumsum(0) <= budget)]] = True
        for lay, part in zip(group, drop.split(sizes), strict=True):
            new[lay] &= ~part
    return new


def removes_more(keep: dict, sparsity: float, scope: str = "global") -> bool:
    """Whether selecting ``sparsity`` removes anything beyond the keep-masks ``keep`` (any keys).

    Selection (:func:`select_units`, ``unstructured.magnitude_masks``) is monotonic: it removes up to
    ``units_to_remove(sparsity, n)`` units of each group (all masks with ``"global"``, each with ``"local"``), counting
    those already removed, so when every group already has that many removed the scores cannot change the result.

    Example:

    >>> removes_more({0: torch.tensor([True, False, True, True])}, 0.25)
    False
    """
    groups = [list(keep.values())] if scope == "global" else [[mask] for mask in keep.values()]
    for group in groups:
        total = sum(mask.numel() for mask in group)
        if units_to_remove(sparsity, total) > total - sum(int(mask.sum()) for mask in group):
            return True
    return False
