"""Activation-based importance (Minitron) from calibration batches: pure reductions plus the hooks that feed them.

* hidden channels: aggregated ``|x|`` of every hidden norm's output (the residual stream as the blocks read it);
* attention heads: L2 norm of each head's slice of the attention output (the input of the output projection);
* FFN neurons: aggregated ``|x|`` of each neuron's activation (the input of the down projection); in a block of
  routed experts (Mixtral, Qwen2-MoE, Qwen3-MoE), of each expert's neurons over the tokens routed to that expert;
* layers: the loss increase (or, without labels, the KL divergence to the full model) when a block is skipped, beside
  the ShortGPT block influence of :func:`hf_compress.pruning.importance.block_influence_scores`.

Scores are token averages over the unmasked tokens of the batches. Head scores are per query head; sum them over
:func:`~hf_compress.pruning.importance.head_groups` under grouped-query attention.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_compress.models.families import block_module, expert_module, get_layers, head_counts, unwrap
from hf_compress.pruning.hidden_channels import hidden_layout
from hf_compress.pruning.importance import head_groups
from hf_compress.pruning.surgery import skip_layers


def channel_abs_sum(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over tokens of |x|, number of tokens)`` per last-dim channel of ``x`` of shape `(batch, seq, channels)`.

    Example:

    >>> channel_abs_sum(torch.tensor([[[1.0, -2.0], [3.0, 0.0]]]))
    (tensor([4., 2.]), tensor(2.))
    """
    x = x.detach().float().abs()
    if mask is None:
        return x.reshape(-1, x.shape[-1]).sum(0), torch.tensor(float(x.numel() // x.shape[-1]))
    weights = mask.to(x.device, x.dtype).reshape(*x.shape[:-1], 1)
    return (x * weights).reshape(-1, x.shape[-1]).sum(0), weights.sum()


def head_norm_sum(
    x: torch.Tensor, num_heads: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over tokens of the L2 norm of each head's slice, number of tokens)`` of ``x`` `(batch, seq, h * d)`."""
    x = x.detach().float()
    norms = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads).norm(dim=-1)
    return channel_abs_sum(norms, mask)


EXPERT_ARGS = ("hidden_states", "top_k_index")  # the first arguments of transformers 5's fused experts modules


def expert_neuron_abs_sum(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    gate_up_proj: torch.Tensor,
    act_fn,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of |act|, tokens)`` per expert neuron of one fused experts call: `(experts, ffn)` and `(experts, 1)`.

    ``act = act_fn(gate) * up`` with ``gate, up = (x @ gate_up_proj[e].T).chunk(2)`` is what expert ``e`` feeds its
    down projection, over the tokens routed to it (any top-k slot; padding excluded by ``mask``).

    Args:
        hidden_states (`torch.Tensor` of shape `(tokens, hidden)`): The experts' input.
        top_k_index (`torch.LongTensor` of shape `(tokens, top_k)`): The experts chosen for each token.
        gate_up_proj (`torch.Tensor` of shape `(experts, 2 * ffn, hidden)`): The fused gate / up weights.
        act_fn (`Callable`): The experts' activation.
        mask (`torch.Tensor`, *optional*): 1 for real tokens, 0 for padding, `tokens` values in any shape.
    """
    experts, ffn = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    x = hidden_states.detach().reshape(-1, hidden_states.shape[-1])
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if mask is not None:
        keep = mask.to(x.device).reshape(-1).bool()
    totals, counts = torch.zeros(experts, ffn), torch.zeros(experts, 1)
    for expert in range(experts):
        tokens = ((top_k_index == expert).any(-1) & keep).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        gate, up = nn.functional.linear(x[tokens], gate_up_proj[expert].detach()).chunk(2, dim=-1)
        totals[expert] = (act_fn(gate) * up).float().abs().sum(0).cpu()
        counts[expert] = float(tokens.numel())
    return totals, counts


@dataclass
class ActivationScores:
    """Minitron activation importance: per hidden channel, per layer per query head, per layer per FFN neuron.

    ``ffn_neurons`` holds the dense FFN blocks; ``expert_neurons`` the blocks of routed experts, one row of neuron
    scores per expert (a row of zeros for an expert no calibration token was routed to).
    """

    hidden: torch.Tensor
    heads: dict[int, torch.Tensor]
    ffn_neurons: dict[int, torch.Tensor]
    expert_neurons: dict[int, torch.Tensor] = field(default_factory=dict)

    def head_group_scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Head scores summed over the prunable units of each layer (query groups under grouped-query attention)."""
        return {
            layer: torch.stack([scores[group].sum() for group in head_groups(model, layer)])
            for layer, scores in self.heads.items()
        }


class _Accumulator:
    def __init__(self):
        self.sums: dict[object, torch.Tensor] = {}
        self.counts: dict[object, torch.Tensor] = {}

    def add(self, key: object, values: tuple[torch.Tensor, torch.Tensor]) -> None:
        total, count = values
        self.sums[key] = self.sums.get(key, 0) + total.cpu()
        self.counts[key] = self.counts.get(key, 0) + count.cpu()

    def mean(self, key: object) -> torch.Tensor:
        return self.sums[key] / self.counts[key].clamp(min=1.0)


def _batches_on(model: nn.Module, batches: Iterable[dict]) -> Iterable[dict]:
    device = next(model.parameters()).device
    for batch in batches:
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward_kwargs(model: nn.Module) -> dict:
    return {"use_cache": False} if getattr(unwrap(model).config, "use_cache", None) is not None else {}


@torch.no_grad()
def activation_scores(model: nn.Module, batches: Iterable[dict]) -> ActivationScores:
    """Minitron activation importance of hidden channels, heads and FFN neurons of ``model`` over ``batches``.

    Args:
        model (`PreTrainedModel`):
            A supported model (any head); run in eval mode, its training mode is restored afterwards.
        batches (`Iterable[dict]`):
            Calibration batches of model inputs (`input_ids`, `attention_mask`; other keys are passed on).

    Returns:
        [`ActivationScores`] on the CPU.

    Example:

    >>> scores = activation_scores(model, [tokenizer("calibration text", return_tensors="pt")])  # doctest: +SKIP
    >>> scores.hidden.argsort()[:64]  # the 64 least important hidden channels  # doctest: +SKIP
    """
    inner = unwrap(model)
    layers = range(len(get_layers(inner)))
    norms = [norm.module for norm in hidden_layout(inner).norms]
    if not norms:
        raise ValueError("`model` has no norm over the hidden channels, so hidden activations cannot be scored.")
    acc = _Accumulator()
    mask: list[torch.Tensor | None] = [None]
    handles = []
    for norm in norms:
        handles.append(norm.register_forward_hook(lambda m, a, out: acc.add("hidden", channel_abs_sum(out, mask[0]))))
    for layer in layers:
        heads = head_counts(inner, layer)[0]

        def heads_hook(module, args, layer=layer, heads=heads):
            acc.add(("heads", layer), head_norm_sum(args[0], heads, mask[0]))

        def neurons_hook(module, args, layer=layer):
            acc.add(("ffn", layer), channel_abs_sum(args[0], mask[0]))

        def experts_hook(module, args, kwargs, layer=layer):
            hidden_states, top_k_index = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(EXPERT_ARGS))
            sums = expert_neuron_abs_sum(hidden_states, top_k_index, module.gate_up_proj, module.act_fn, mask[0])
            acc.add(("experts", layer), sums)

        handles.append(block_module(inner, layer, "o").register_forward_pre_hook(heads_hook))
        experts = expert_module(inner, layer)
        if experts is None:
            handles.append(block_module(inner, layer, "down").register_forward_pre_hook(neurons_hook))
        else:
            handles.append(experts.register_forward_pre_hook(experts_hook, with_kwargs=True))
    was_training = inner.training
    inner.eval()
    count = 0
    try:
        for batch in _batches_on(inner, batches):
            mask[0] = batch.get("attention_mask")
            inner(**batch, **_forward_kwargs(inner))
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        inner.train(was_training)
    if count == 0:
        raise ValueError("`batches` is empty; activation importance needs at least one calibration batch.")
    return ActivationScores(
        hidden=acc.mean("hidden"),
        heads={layer: acc.mean(("heads", layer)) for layer in layers},
        ffn_neurons={layer: acc.mean(("ffn", layer)) for layer in layers if ("ffn", layer) in acc.sums},
        expert_neurons={layer: acc.mean(("experts", layer)) for layer in layers if ("experts", layer) in acc.sums},
    )


def hidden_weight_scores(model: nn.Module, method: str = "magnitude") -> torch.Tensor:
    """One weight-based score per hidden channel: L2 norm of everything written to it, or Taylor ``sum |w * grad|``.

    The writers are those of :func:`~hf_compress.pruning.hidden.hidden_layout` (embeddings, o / down projections,
    head transforms); a channel they all leave at zero scores 0.
    """
    if method not in ("magnitude", "taylor"):
        raise ValueError(f"`method` must be 'magnitude' or 'taylor' for hidden scores, got {method!r}.")
    layout = hidden_layout(model)
    total = torch.zeros(layout.size)
    seen = set()
    for module, name, dim in layout.writers:
        param = getattr(module, name)
        if id(param) in seen or (method == "taylor" and param.grad is None):
            continue
        seen.add(id(param))
        values = param.detach().float() if method == "magnitude" else (param.detach() * param.grad).float().abs()
        other = [d for d in range(values.dim()) if d != dim]
        values = values.square() if method == "magnitude" else values
        total += (values.sum(other) if other else values).cpu()
    return total.sqrt() if method == "magnitude" else total


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (unmasked) positions of ``KL(softmax(reference) || softmax(logits))`` along the last dim."""
    ref = reference.float().log_softmax(-1)
    kl = (ref.exp() * (ref - logits.float().log_softmax(-1))).sum(-1)
    if mask is None or kl.dim() != mask.dim():
        return kl.mean()
    weights = mask.to(kl.device, kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1.0)


@torch.no_grad()
def block_skip_scores(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    """Importance of every block as the damage of skipping it (one block at a time), averaged over ``batches``.

    With `labels` in the batches the damage is the increase of the model's loss; without, it is the KL divergence of
    the model's first output (logits) from the full model's. Costs ``num_layers + 1`` forwards per batch.
    """
    inner = unwrap(model)
    num_layers = len(get_layers(inner))
    totals = torch.zeros(num_layers)
    was_training = inner.training
    inner.eval()
    count = 0
    try:
        for batch in _batches_on(inner, batches):
            full = inner(**batch, **_forward_kwargs(inner))
            for layer in range(num_layers):
                keep = torch.ones(num_layers, dtype=torch.bool)
                keep[layer] = False
                handles = skip_layers(inner, keep)
                try:
                    out = inner(**batch, **_forward_kwargs(inner))
                finally:
                    for handle in handles:
                        handle.remove()
                if "labels" in batch:
                    totals[layer] += float(out.loss - full.loss)
                else:
                    totals[layer] += float(kl_to_reference(out[0], full[0], batch.get("attention_mask")))
            count += 1
    finally:
        inner.train(was_training)
    if count == 0:
        raise ValueError("`batches` is empty; block skip scores need at least one calibration batch.")
    return totals / count
