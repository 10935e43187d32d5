"""What one pruning step scores and removes: plain functions on a model and its masks, wired to Trainer events by
:class:`~hf_compress.pruning.callback.PruningCallback`.

* :func:`step_scores`: one score per unit of a target (head group, FFN neuron, hidden channel, block) for the
  configured importance (magnitude, Taylor sums, activations, block influence);
* :func:`add_taylor_scores`: add one step's ``sum |w * grad|`` per unit to the running sums;
* :func:`removes_more_units` / :func:`select_heads`: whether a sparsity removes another unit, and which head groups go;
* :func:`hidden_step_sparsity`: the hidden sparsity moved to a kept size the config can save;
* :func:`budget_masks` / :func:`masks_from_weights`: masks from a parameter-budget search, or rebuilt from the exact
  zeros that removed structure leaves in the weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hf_compress.models.families import unwrap
from hf_compress.models.hidden_sizes import hidden_multiple
from hf_compress.pruning.activations import activation_scores, block_skip_scores, hidden_weight_scores
from hf_compress.pruning.budget import search_budget
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.importance import (
    block_influence_scores,
    head_groups,
    layer_scores,
    layer_unit_scores,
    unit_scores,
)
from hf_compress.pruning.masks import PruningMasks
from hf_compress.pruning.ranking import removes_more, select_units
from hf_compress.pruning.schedules import kept_hidden_size
from hf_compress.pruning.unstructured import prunable_weights


def uniform_heads(masks: PruningMasks) -> int | None:
    """Query heads every kept block keeps under ``masks`` (what surgery writes to the config), ``None`` if they differ
    or heads are not pruned (the config's count stays)."""
    kept = range(len(masks.heads)) if masks.layers is None else masks.layers.nonzero().flatten().tolist()
    counts = {int(masks.heads[layer].sum()) for layer in kept if layer in masks.heads}
    return counts.pop() if len(counts) == 1 else None


def hidden_step_sparsity(model: nn.Module, masks: PruningMasks, sparsity: float) -> float:
    """``sparsity`` of the hidden target moved so that the kept size is one the config can save (see
    :func:`~hf_compress.pruning.schedules.kept_hidden_size`), for the head count surgery will write."""
    size = masks.hidden.numel()
    multiple = hidden_multiple(unwrap(model).config, uniform_heads(masks))
    return (size - kept_hidden_size(size, sparsity, multiple, int(masks.hidden.sum()))) / size


def add_taylor_scores(sums: dict[str, torch.Tensor], model: nn.Module, target: str, layout: dict | None) -> None:
    """Add this step's ``sum |w * grad|`` of every unit of ``target`` to ``sums`` (keys ``"layers"``, ``"hidden"``,
    ``"<target>.<layer>"``), on the model's device (no host sync). ``layout`` is the ``unit_layout`` of heads and FFN
    neurons."""
    if target == "layers":
        scores = {"layers": layer_scores(model, "taylor")}
    elif target == "hidden":
        scores = {"hidden": hidden_weight_scores(model, "taylor")}
    else:
        scores = {f"{target}.{i}": layer_unit_scores(n, rows, "taylor") for i, (n, rows) in layout.items()}
    for key, value in scores.items():
        total = sums.get(key)
        sums[key] = value if total is None else total.to(value.device) + value


def step_scores(
    model: nn.Module,
    target: str,
    importance: str,
    taylor: dict[str, torch.Tensor],
    batches: Iterable[dict],
    layout: dict | None = None,
) -> dict[int, torch.Tensor]:
    """Scores of the units of ``target`` by ``importance``, per layer (``{0: scores}`` for layers and hidden).

    ``taylor`` holds the sums of :func:`add_taylor_scores`; ``batches`` (calibration data) is read only by the
    activation and block-influence importances; ``layout`` is the ``unit_layout`` of heads and FFN neurons.
    """
    if target == "layers":
        if importance == "activation":  # the damage of skipping each block
            return {0: block_skip_scores(model, batches)}
        if importance == "block_influence":
            # ShortGPT removes the blocks that change their input the least: low influence = low importance.
            return {0: block_influence_scores(model, batches)}
        return {0: taylor["layers"] if importance == "taylor" else layer_scores(model, "magnitude")}
    if target == "hidden":
        if importance == "activation":
            return {0: activation_scores(model, batches).hidden}
        return {0: taylor["hidden"] if importance == "taylor" else hidden_weight_scores(model)}
    if importance == "activation":
        found = activation_scores(model, batches)
        return found.head_group_scores(unwrap(model)) if target == "heads" else found.ffn_neurons
    if importance == "taylor":
        return {int(k.split(".")[1]): v for k, v in taylor.items() if k.startswith(f"{target}.")}
    return unit_scores(model, target, "magnitude", layout=layout)


def removes_more_units(
    masks: PruningMasks, target: str, sparsity: float, scope: str, head_layout: dict | None = None
) -> bool:
    """Whether ``sparsity`` removes another unit of ``target`` beyond ``masks`` (heads count in whole groups of
    ``head_layout``, the ``unit_layout`` of heads)."""
    if target == "unstructured":
        return removes_more(masks.weights, sparsity, scope)
    if target in ("layers", "hidden"):
        return removes_more({0: getattr(masks, target)}, sparsity, "local")
    if target == "ffn_neurons":
        return removes_more(masks.ffn_neurons, sparsity, scope)
    # the unit is a head group: `view(groups, -1)` of a layer's heads
    groups = {layer: keep.view(head_layout[layer][0], -1).all(1) for layer, keep in masks.heads.items()}
    return removes_more(groups, sparsity, scope)


def select_heads(
    heads: dict[int, torch.Tensor],
    scores: dict[int, torch.Tensor],
    head_layout: dict,
    sparsity: float,
    scope: str,
    min_heads_per_layer: int,
) -> dict[int, torch.Tensor]:
    """New head masks removing whole head groups (single heads without GQA) by ``scores``, from the kept ``heads``;
    ``min_heads_per_layer`` is rounded up to groups. ``head_layout``: layer -> (number of groups, ...), a group being
    consecutive heads."""
    keep = {layer: heads[layer].view(head_layout[layer][0], -1).all(1) for layer in scores}
    sizes = {layer: heads[layer].numel() // head_layout[layer][0] for layer in scores}
    size = sizes[0]
    min_groups = -(-min_heads_per_layer // size)
    new = select_units(scores, keep, sparsity, scope, min_keep=min_groups)
    return {layer: new[layer].repeat_interleave(size) for layer in scores}


def budget_masks(
    model: nn.Module, config: PruningConfig, batches: list[dict], verbose: bool
) -> tuple[PruningMasks, list[dict]]:
    """Masks of the shape the budget search of ``config.budget`` picks, and its candidates table (printed when
    ``verbose``)."""
    count = config.budget_candidates
    result = search_budget(unwrap(model), config.budget, batches, max_candidates=count, verbose=verbose)
    masks = PruningMasks.full(model, list(config.targets))
    for target in ("heads", "ffn_neurons"):
        for layer, indices in result.removed[target].items():
            getattr(masks, target)[layer][indices] = False
    for target in ("hidden", "layers"):
        getattr(masks, target)[result.removed[target]] = False
    return masks, result.table


def masks_from_weights(model: nn.Module, masks: PruningMasks, targets: Iterable[str]) -> None:
    """Rebuild the head / neuron / hidden / weight masks of ``targets`` in ``masks`` from the weights, where removed
    structure is exactly zero (a checkpoint saved without its masks). In place."""
    targets = set(targets)
    for target in ("heads", "ffn_neurons"):
        if target in targets:
            alive = {layer: s > 0 for layer, s in unit_scores(model, target, "magnitude").items()}
            if target == "heads":
                alive = {k: v.repeat_interleave(len(head_groups(model, k)[0])) for k, v in alive.items()}
            setattr(masks, target, alive)
    if "hidden" in targets:
        masks.hidden = hidden_weight_scores(model) > 0
    weights = prunable_weights(model)
    masks.weights = {name: weights[name].detach().cpu() != 0 for name in masks.weights}
