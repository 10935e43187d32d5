"""Router statistics of mixture-of-experts blocks: how often and how strongly each expert is chosen.

The routers' outputs (logits, top-k weights, top-k experts) are captured with forward hooks over calibration batches
(padding excluded) and reduced to per-expert scores; :mod:`hf_compress.pruning.experts` removes the experts they rank
lowest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from hf_compress.models.families import expert_module, get_family, get_layers, unwrap
from hf_compress.pruning.importance import run_calibration

ExpertScore = Literal["mass", "frequency", "weight"]


@dataclass
class RouterStatistics:
    """Routing of one sparse block over calibration tokens (padding excluded).

    Attributes:
        tokens (`int`): Tokens routed.
        counts (`torch.Tensor` of shape `(experts,)`): Times each expert was among a token's top-k.
        weight_sums (`torch.Tensor` of shape `(experts,)`): Sum of the gate weights each expert received.
        probability_sums (`torch.Tensor` of shape `(experts,)`): Sum of each expert's router softmax probability.
    """

    tokens: int
    counts: torch.Tensor
    weight_sums: torch.Tensor
    probability_sums: torch.Tensor

    @property
    def frequency(self) -> torch.Tensor:
        """Fraction of tokens routed to each expert (sums to ``top_k``)."""
        return self.counts / max(self.tokens, 1)

    @property
    def mean_weight(self) -> torch.Tensor:
        """Mean gate weight of each expert over the tokens routed to it (0 for an expert never chosen)."""
        return self.weight_sums / self.counts.clamp(min=1)


def routing_sums(
    router_logits: torch.Tensor,
    top_k_weights: torch.Tensor,
    top_k_index: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, counts, weight_sums, probability_sums)`` of one router call (see :class:`RouterStatistics`).

    Args:
        router_logits (`torch.Tensor` of shape `(tokens, experts)`): The router's logits.
        top_k_weights (`torch.Tensor` of shape `(tokens, top_k)`): Gate weights of the chosen experts.
        top_k_index (`torch.LongTensor` of shape `(tokens, top_k)`): The chosen experts.
        mask (`torch.Tensor` of shape `(tokens,)`, *optional*): 1 for real tokens, 0 for padding.
    """
    experts = router_logits.shape[-1]
    keep = torch.ones(router_logits.shape[0], dtype=torch.float32) if mask is None else mask.float().flatten()
    keep = keep.to(router_logits.device)
    rows = keep[:, None].expand_as(top_k_index).flatten()
    index = top_k_index.flatten()
    counts = torch.zeros(experts, device=router_logits.device).index_add_(0, index, rows)
    weights = top_k_weights.float().flatten() * rows
    weight_sums = torch.zeros(experts, device=router_logits.device).index_add_(0, index, weights)
    probabilities = (router_logits.float().softmax(-1) * keep[:, None]).sum(0)
    return int(keep.sum()), counts.cpu(), weight_sums.cpu(), probabilities.cpu()


def sparse_layers(model: nn.Module) -> list[int]:
    return [layer for layer in range(len(get_layers(model))) if expert_module(model, layer) is not None]


def router_module(model: nn.Module, layer: int) -> nn.Module:
    return get_layers(model)[layer].get_submodule(get_family(model).router)


@torch.no_grad()
def router_statistics(model: nn.Module, batches: Iterable[dict]) -> dict[int, RouterStatistics]:
    """Routing statistics of every sparse block of ``model`` over ``batches`` (dicts of model inputs).

    The routers' outputs are captured with temporary forward hooks (any head works); padding tokens (``0`` in a
    batch's ``attention_mask``) are left out. The model runs in eval mode; its training mode is restored afterwards.

    Args:
        model (`PreTrainedModel`):
            A Mixtral, Qwen2-MoE or Qwen3-MoE model, optionally wrapped by PEFT / DDP / `torch.compile`.
        batches (`Iterable[dict]`):
            Calibration batches, e.g. the first batches of the training data.

    Returns:
        `dict[int, RouterStatistics]`: Layer index -> statistics, for the sparse blocks only.

    Example:

    >>> from hf_compress.pruning.routing import expert_importance, router_statistics
    >>> stats = router_statistics(model, [tokenizer(texts, return_tensors="pt", padding=True)])  # doctest: +SKIP
    >>> stats[0].frequency  # doctest: +SKIP
    tensor([0.6250, 0.3750, 0.5000, 0.5000])
    """
    inner = unwrap(model)
    layers = sparse_layers(inner)
    if not layers:
        raise ValueError(f"`model` ({inner.config.model_type}) has no mixture-of-experts block to collect routing of.")
    totals = {layer: [0, 0.0, 0.0, 0.0] for layer in layers}
    mask: list[torch.Tensor | None] = [None]

    def capture(layer: int):
        def hook(module, args, output):
            logits, weights, index = output
            sums = routing_sums(logits, weights, index, mask[0])
            totals[layer] = [total + value for total, value in zip(totals[layer], sums)]

        return hook

    handles = [router_module(inner, layer).register_forward_hook(capture(layer)) for layer in layers]
    run_calibration(model, batches, handles, mask, "router statistics")
    return {layer: RouterStatistics(*values) for layer, values in totals.items()}


def expert_importance(
    statistics: dict[int, RouterStatistics], method: ExpertScore = "mass"
) -> dict[int, torch.Tensor]:
    """Per-layer score of every expert from :func:`router_statistics` (higher = more important).

    Args:
        statistics (`dict[int, RouterStatistics]`):
            Output of `router_statistics`.
        method (`Literal["mass", "frequency", "weight"]`, *optional*, defaults to `"mass"`):
            `"mass"`: gate weight each expert receives per token (frequency x mean gate weight: its share of the
            block's output); `"frequency"`: fraction of tokens routed to it; `"weight"`: its mean gate weight when
            chosen.

    Example:

    >>> stats = {0: RouterStatistics(4, torch.tensor([4.0, 2, 2, 0]), torch.tensor([2.0, 1, 1.5, 0]), torch.ones(4))}
    >>> expert_importance(stats)[0]
    tensor([0.5000, 0.2500, 0.3750, 0.0000])
    """
    if method not in ("mass", "frequency", "weight"):
        raise ValueError(f"`method` must be one of ['mass', 'frequency', 'weight'], got {method!r}.")
    if method == "frequency":
        return {layer: s.frequency for layer, s in statistics.items()}
    if method == "weight":
        return {layer: s.mean_weight for layer, s in statistics.items()}
    return {layer: s.weight_sums / max(s.tokens, 1) for layer, s in statistics.items()}
