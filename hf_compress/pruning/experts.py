"""Mixture-of-experts pruning: whole experts chosen by router statistics (:mod:`hf_compress.pruning.routing`), and
expert FFN neurons, given or chosen by their Minitron activations over the tokens routed to each expert.

transformers 5 fuses the routed experts of a sparse block into 3-D tensors (``gate_up_proj`` [experts, 2 * ffn,
hidden], ``down_proj`` [experts, hidden, ffn]) beside a router with one ``weight`` row per expert. Removing expert
``e`` keeps the complement along dimension 0 of the three; the router's softmax and top-k then run over the remaining
experts, which is exactly the original model with ``e``'s router logit at ``-inf`` (with or without
``norm_topk_prob``). Removing expert neurons keeps the complement along the FFN dimension: every expert of a block
keeps the same width (one fused tensor), and a multiple of :data:`WIDTH_MULTIPLE` (16-byte rows for ``grouped_mm``).

Shapes are recorded like every other surgery (:func:`~hf_compress.pruning.surgery.record_structure`): uniform expert
counts / widths go to the config (``num_experts`` / ``num_local_experts``, ``moe_intermediate_size`` /
``intermediate_size``), so plain ``from_pretrained`` reloads the model; per-layer differences go to
``config.hf_compress["layers"]`` for :func:`hf_compress.from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from hf_compress.models.families import expert_module, get_layers, num_experts, unwrap
from hf_compress.pruning.activations import activation_scores
from hf_compress.pruning.ranking import select_units
from hf_compress.pruning.routing import (  # re-exported: the MoE API lives in one module for users
    ExpertScore,
    RouterStatistics,
    expert_importance,
    router_module,
    router_statistics,
    routing_sums,
    sparse_layers,
)
from hf_compress.pruning.surgery import prune_ffn_neurons, record_structure

__all__ = [
    "WIDTH_MULTIPLE",
    "ExpertScore",
    "RouterStatistics",
    "expert_importance",
    "prune_expert_neurons",
    "prune_expert_neurons_by_activation",
    "prune_experts",
    "prune_experts_by_router",
    "router_statistics",
    "routing_sums",
    "select_expert_neurons",
    "select_experts",
]
WIDTH_MULTIPLE = 8  # expert widths the grouped_mm kernel accepts in 16-bit and 32-bit dtypes (16-byte rows)


def select_experts(scores: dict[int, torch.Tensor], sparsity: float, min_keep: int = 1) -> dict[int, list[int]]:
    """The lowest-scored ``sparsity`` fraction of the experts of every layer (nearest integer), as surgery input.

    Args:
        scores (`dict[int, torch.Tensor]`): Layer -> score of each expert (e.g. from `expert_importance`).
        sparsity (`float`): Fraction of each layer's experts to remove, in [0, 1).
        min_keep (`int`, *optional*, defaults to `1`): Experts every layer keeps (at least `num_experts_per_tok`).

    Example:

    >>> select_experts({0: torch.tensor([0.5, 0.1, 0.3, 0.2])}, 0.5, min_keep=2)
    {0: [1, 3]}
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r}.")
    keep = {layer: torch.ones(len(s), dtype=torch.bool) for layer, s in scores.items()}
    new = select_units(scores, keep, sparsity, "local", min_keep=min_keep)
    return {layer: (~mask).nonzero().flatten().tolist() for layer, mask in new.items() if not mask.all()}


def _check_layers(name: str, value: dict, model: nn.Module) -> None:
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a dict of layer index -> indices, got {type(value).__name__}.")
    num_layers = len(get_layers(model))
    for layer in value:
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"`{name}` has layer index {layer!r} outside [0, {num_layers}).")


def _indices(name: str, indices: Iterable, size: int) -> list[int]:
    indices = list(indices)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise TypeError(f"`{name}` must be a list of ints, got {indices!r}.")
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(f"`{name}` has indices {bad[:5]} outside [0, {size}).")
    return sorted(set(indices))


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _sync_experts(model: nn.Module, layer: int) -> None:
    """Write the current expert count / width into the runtime attributes of the block's MoE modules."""
    count, experts = num_experts(model, layer), expert_module(model, layer)
    experts.intermediate_dim = experts.down_proj.shape[2]
    for module in (experts, router_module(model, layer)):
        module.num_experts = count


def prune_experts(model: nn.Module, experts: dict[int, list[int]]) -> nn.Module:
    """Physically remove routed experts: their slices of the fused expert tensors and their router rows.

    The result computes exactly what the original model computes with those experts' router logits set to `-inf`
    (never chosen; top-k renormalisation then runs over the remaining experts, as before). Every layer must keep at
    least `num_experts_per_tok` experts. Uniform counts are written to `num_experts` / `num_local_experts` (plain
    `from_pretrained` reloads the model); per-layer counts are recorded for `hf_compress.from_pretrained`. Arguments
    are validated for all layers before anything changes.

    Args:
        model (`PreTrainedModel`):
            A Mixtral, Qwen2-MoE or Qwen3-MoE model, optionally wrapped by PEFT / DDP / `torch.compile`.
        experts (`dict[int, list[int]]`):
            Expert indices to remove, per layer index (indices refer to the current experts of that layer).

    Returns:
        The same `model`, modified in place.

    Example:

    >>> from hf_compress.pruning.experts import prune_experts
    >>> model = prune_experts(model, {0: [3, 5], 1: [0, 7]})  # doctest: +SKIP
    """
    inner = unwrap(model)
    _check_layers("experts", experts, inner)
    plan = {}
    for layer, indices in experts.items():
        if not indices:
            continue
        if expert_module(inner, layer) is None:
            raise ValueError(f"`experts` names layer {layer}, a dense block without experts; list sparse layers only.")
        total, top_k = num_experts(inner, layer), router_module(inner, layer).top_k
        indices = _indices(f"experts[{layer}]", indices, total)
        if total - len(indices) < top_k:
            raise ValueError(
                f"`experts[{layer}]` removes {len(indices)} of the {total} experts of layer {layer}, leaving fewer "
                f"than `num_experts_per_tok`={top_k}; keep at least {top_k} experts in every layer."
            )
        if indices:
            plan[layer] = indices
    with torch.no_grad():
        for layer, indices in plan.items():
            keep = torch.ones(num_experts(inner, layer), dtype=torch.bool)
            keep[indices] = False
            module, router = expert_module(inner, layer), router_module(inner, layer)
            for owner, name in ((module, "gate_up_proj"), (module, "down_proj"), (router, "weight")):
                param = getattr(owner, name)
                _replace(owner, name, param[keep.to(param.device)])
            if getattr(router, "bias", None) is not None:
                _replace(router, "bias", router.bias[keep.to(router.bias.device)])
            _sync_experts(inner, layer)
    record_structure(inner)
    counts = {num_experts(inner, layer) for layer in sparse_layers(inner)}
    if len(counts) == 1 and isinstance(getattr(inner, "num_experts", None), int):  # `*ForCausalLM` (aux loss)
        inner.num_experts = counts.pop()
    return model


def _expert_neuron_plan(layer: int, value: list[int] | dict[int, list[int]], total: int, size: int) -> list[list[int]]:
    """Per-expert neuron indices to remove in one sparse layer, validated (equal counts, an aligned width left)."""
    name = f"neurons[{layer}]"
    if isinstance(value, dict):
        bad = [e for e in value if not isinstance(e, int) or not 0 <= e < total]
        if bad:
            raise ValueError(f"`{name}` has expert indices {bad[:5]} outside [0, {total}).")
        plan = [_indices(f"{name}[{e}]", value.get(e, []), size) for e in range(total)]
    else:
        plan = [_indices(name, value, size)] * total
    counts = sorted({len(p) for p in plan})
    if len(counts) > 1:
        raise ValueError(
            f"`{name}` removes {counts} neurons from different experts of layer {layer}; the fused expert tensors "
            "need one width per layer, so remove the same number of neurons from every expert."
        )
    width = size - counts[0]
    if counts[0] and (width == 0 or width % WIDTH_MULTIPLE):
        raise ValueError(
            f"`{name}` leaves {width} neurons per expert in layer {layer}; transformers' grouped_mm expert kernel "
            f"needs 16-byte rows, so keep a positive multiple of {WIDTH_MULTIPLE} neurons per expert (or remove "
            "experts with `prune_experts`)."
        )
    return plan


def prune_expert_neurons(model: nn.Module, neurons: dict[int, list[int] | dict[int, list[int]]]) -> nn.Module:
    """Physically remove FFN neurons of the routed experts: ``gate_up_proj`` rows and ``down_proj`` columns.

    The result computes exactly what the original model computes with those neurons' ``down_proj`` columns zeroed.
    The fused expert tensors need one width for all experts of a layer, so every expert of a layer loses the same
    number of neurons: give one list (the same neurons in every expert) or ``{expert: [neurons]}`` with equal lengths
    for every expert. The width left must be a multiple of `WIDTH_MULTIPLE` (8), which the `grouped_mm` expert kernel
    of transformers needs. Dense blocks (``mlp_only_layers``) take a list and go through
    :func:`~hf_compress.pruning.surgery.prune_ffn_neurons`. Qwen2-MoE's shared expert is left whole.

    Args:
        model (`PreTrainedModel`):
            A Mixtral, Qwen2-MoE or Qwen3-MoE model, optionally wrapped by PEFT / DDP / `torch.compile`.
        neurons (`dict[int, list[int] | dict[int, list[int]]]`):
            Per layer index, the neuron indices to remove from every expert, or per expert index.

    Returns:
        The same `model`, modified in place.

    Example:

    >>> from hf_compress.pruning.experts import prune_expert_neurons
    >>> model = prune_expert_neurons(model, {0: list(range(256))})  # same 256 in every expert  # doctest: +SKIP
    >>> model = prune_expert_neurons(model, {1: {e: lowest[e][:256] for e in range(60)}})  # doctest: +SKIP
    """
    inner = unwrap(model)
    _check_layers("neurons", neurons, inner)
    sparse, dense = {}, {}
    for layer, value in neurons.items():
        if expert_module(inner, layer) is None:
            if isinstance(value, dict):
                raise TypeError(f"`neurons[{layer}]` must be a list for layer {layer}, a dense block without experts.")
            dense[layer] = value
            continue
        size = expert_module(inner, layer).down_proj.shape[2]
        plan = _expert_neuron_plan(layer, value, num_experts(inner, layer), size)
        if plan[0]:
            sparse[layer] = plan
    if dense:
        prune_ffn_neurons(inner, dense)
    with torch.no_grad():
        for layer, plan in sparse.items():
            module = expert_module(inner, layer)
            size = module.down_proj.shape[2]
            keep = torch.stack([_complement(removed, size) for removed in plan]).to(module.down_proj.device)
            gate, up = module.gate_up_proj.split(size, dim=1)
            rows = keep[:, :, None]
            gate_up = torch.cat([gate.take_along_dim(rows, dim=1), up.take_along_dim(rows, dim=1)], dim=1)
            _replace(module, "gate_up_proj", gate_up)
            _replace(module, "down_proj", module.down_proj.take_along_dim(keep[:, None, :], dim=2))
            _sync_experts(inner, layer)
    record_structure(inner)
    return model


def _complement(removed: list[int], size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().flatten()


def prune_experts_by_router(
    model: nn.Module, batches: Iterable[dict], sparsity: float, method: ExpertScore = "mass"
) -> dict[int, list[int]]:
    """Remove the ``sparsity`` fraction of experts of every sparse layer that the router uses least on ``batches``.

    :func:`router_statistics` -> :func:`expert_importance` -> :func:`select_experts` (every layer keeps at least
    `num_experts_per_tok` experts) -> :func:`prune_experts`.

    Args:
        model (`PreTrainedModel`): A Mixtral, Qwen2-MoE or Qwen3-MoE model.
        batches (`Iterable[dict]`): Calibration batches (dicts of model inputs).
        sparsity (`float`): Fraction of each layer's experts to remove, in [0, 1).
        method (`Literal["mass", "frequency", "weight"]`, *optional*, defaults to `"mass"`): See `expert_importance`.

    Returns:
        `dict[int, list[int]]`: The removed experts per layer (indices before removal).

    Example:

    >>> from hf_compress.pruning.experts import prune_experts_by_router
    >>> removed = prune_experts_by_router(model, calibration_batches, sparsity=0.25)  # doctest: +SKIP
    """
    inner = unwrap(model)
    scores = expert_importance(router_statistics(model, batches), method)
    min_keep = max(router_module(inner, layer).top_k for layer in scores)
    removed = select_experts(scores, sparsity, min_keep=min_keep)
    prune_experts(model, removed)
    return removed


def select_expert_neurons(scores: dict[int, torch.Tensor], sparsity: float) -> dict[int, dict[int, list[int]]]:
    """The lowest-scoring neurons of every expert, the same number in each expert of a layer.

    Every layer keeps ``(1 - sparsity)`` of its expert width, rounded to a positive multiple of
    :data:`WIDTH_MULTIPLE` (what :func:`prune_expert_neurons` accepts); each expert loses its own lowest scores.

    Args:
        scores (`dict[int, torch.Tensor]`): Per sparse layer, scores of shape `(experts, ffn)` (higher = more
            important), e.g. ``activation_scores(model, batches).expert_neurons``.
        sparsity (`float`): Fraction of each expert's neurons to remove, in [0, 1).

    Example:

    >>> plan = select_expert_neurons({0: torch.arange(32.0).reshape(2, 16).flip(1)}, sparsity=0.5)
    >>> plan[0][0]
    [8, 9, 10, 11, 12, 13, 14, 15]
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    plan = {}
    for layer, values in scores.items():
        if values.dim() != 2:
            raise ValueError(f"`scores[{layer}]` must have shape (experts, ffn), got {tuple(values.shape)}.")
        size = values.shape[1]
        keep = max(WIDTH_MULTIPLE, round((1 - sparsity) * size / WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
        if keep >= size:
            continue
        lowest = values.float().argsort(dim=1, stable=True)[:, : size - keep]
        plan[layer] = {expert: sorted(row.tolist()) for expert, row in enumerate(lowest)}
    return plan


def prune_expert_neurons_by_activation(
    model: nn.Module, batches: Iterable[dict], sparsity: float
) -> dict[int, dict[int, list[int]]]:
    """Remove the ``sparsity`` fraction of every expert's neurons that fire least on ``batches`` (Minitron).

    :func:`~hf_compress.pruning.activations.activation_scores` (mean ``|act_fn(gate) * up|`` of each expert neuron
    over the tokens routed to that expert) -> :func:`select_expert_neurons` -> :func:`prune_expert_neurons`.
    Dense blocks and Qwen2-MoE's shared expert are left whole.

    Args:
        model (`PreTrainedModel`): A Mixtral, Qwen2-MoE or Qwen3-MoE model.
        batches (`Iterable[dict]`): Calibration batches (dicts of model inputs).
        sparsity (`float`): Fraction of each expert's neurons to remove, in [0, 1).

    Returns:
        `dict[int, dict[int, list[int]]]`: The removed neurons per layer and expert (indices before removal).

    Example:

    >>> from hf_compress.pruning.experts import prune_expert_neurons_by_activation
    >>> removed = prune_expert_neurons_by_activation(model, calibration_batches, sparsity=0.5)  # doctest: +SKIP
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    scores = activation_scores(model, batches).expert_neurons
    if not scores:
        raise ValueError(f"`model` ({unwrap(model).config.model_type}) has no routed experts to score.")
    plan = select_expert_neurons(scores, sparsity)
    if plan:
        prune_expert_neurons(model, plan)
    return plan
