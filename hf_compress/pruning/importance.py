"""Importance scores of heads, FFN neurons and layers: pure tensor functions plus per-layer vectorised gathers.

* ``magnitude``: Lp norm of every weight that carries a unit (rows/columns/bias entries from ``architectures``).
* ``taylor``: first-order Taylor ``sum |w * dL/dw|`` over the same slices (Molchanov et al., Michel et al. 2019);
  the callback accumulates it over the steps between two pruning events.
* ``block_influence``: ShortGPT's ``1 - cos(h_in, h_out)`` of each block, averaged over calibration tokens; a block
  that barely rotates its input can be dropped.

Under grouped-query attention the unit of head pruning is a whole query group (the query heads sharing one KV head),
so ``head_groups`` lists groups, each a list of query heads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .architectures import ffn_size, get_layers, head_counts, head_slices, neuron_slices


def magnitude_score(tensors: Sequence[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    """Lp norm of all values of ``tensors`` taken together (the magnitude of one unit).

    Example:

    >>> magnitude_score([torch.tensor([3.0]), torch.tensor([[4.0]])])
    tensor(5.)
    """
    return sum((t.detach().float().abs() ** p).sum() for t in tensors) ** (1.0 / p)


def taylor_score(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """First-order Taylor importance ``sum |w * g|`` of one unit (estimated loss change when it is zeroed)."""
    return sum((w.detach().float() * g.detach().float()).abs().sum() for w, g in zip(weights, grads, strict=True))


def block_influence(
    hidden_in: torch.Tensor, hidden_out: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ShortGPT block influence ``1 - cos(h_in, h_out)`` averaged over the (unmasked) tokens.

    Args:
        hidden_in (`torch.Tensor` of shape `(batch, seq, hidden)`): Hidden states entering the block.
        hidden_out (`torch.Tensor` of shape `(batch, seq, hidden)`): Hidden states leaving the block.
        attention_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*): 1 for real tokens, 0 for padding.
    """
    influence = 1.0 - nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1, eps=1e-8)
    if attention_mask is None:
        return influence.mean()
    weights = attention_mask.to(influence.dtype)
    return (influence * weights).sum() / weights.sum().clamp(min=1.0)


def normalize_per_layer(scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Divide each layer's scores by their L2 norm so units of different layers can be ranked together."""
    return {layer: s / s.norm().clamp(min=1e-12) for layer, s in scores.items()}


def head_groups(model: nn.Module, layer: int) -> list[list[int]]:
    """The prunable units of attention in block ``layer``: single heads, or whole query groups under GQA."""
    num_q, num_kv = head_counts(model, layer)
    group = num_q // num_kv
    return [list(range(g * group, (g + 1) * group)) for g in range(num_q // group)]


def _unit_rows(model: nn.Module, layer: int, target: str) -> list[tuple]:
    """``(parameter, dim, index, unit_id_of_each_index)`` covering every unit of ``target`` in block ``layer``."""
    if target == "ffn_neurons":
        slices = neuron_slices(model, layer, list(range(ffn_size(model, layer))))
        return [(getattr(m, name), dim, index, index) for m, name, dim, index in slices]
    rows: dict[tuple[int, int], list] = {}
    for unit, heads in enumerate(head_groups(model, layer)):
        for module, name, dim, index in head_slices(model, layer, heads):
            param = getattr(module, name)
            entry = rows.setdefault((id(param), dim), [param, dim, [], []])
            entry[2].append(index)
            entry[3].append(torch.full_like(index, unit))
    return [(param, dim, torch.cat(index), torch.cat(ids)) for param, dim, index, ids in rows.values()]


def _per_row(tensor: torch.Tensor, dim: int, index: torch.Tensor, fn: Callable) -> torch.Tensor:
    rows = tensor.detach().index_select(dim, index.to(tensor.device)).movedim(dim, 0)
    return fn(rows.float()).reshape(len(index), -1).sum(1).cpu()


def unit_scores(model: nn.Module, target: str, method: str = "magnitude", p: float = 2.0) -> dict[int, torch.Tensor]:
    """Per-layer scores of every head group (``target="heads"``) or FFN neuron (``"ffn_neurons"``).

    ``method="magnitude"`` gives the Lp norm of each unit's weights; ``"taylor"`` gives ``sum |w * grad|`` from the
    gradients currently stored in ``.grad`` (zero where a parameter has none).

    Example:

    >>> scores = unit_scores(model, "heads")  # doctest: +SKIP
    """
    if target not in ("heads", "ffn_neurons"):
        raise ValueError(f"`target` must be 'heads' or 'ffn_neurons' for unit scores, got {target!r}.")
    scores = {}
    for layer in range(len(get_layers(model))):
        num_units = len(head_groups(model, layer)) if target == "heads" else ffn_size(model, layer)
        out = torch.zeros(num_units)
        for param, dim, index, ids in _unit_rows(model, layer, target):
            if method == "magnitude":
                values = _per_row(param, dim, index, lambda x: x.abs() ** p)
            elif method == "taylor":
                if param.grad is None:
                    continue
                values = _per_row(param * param.grad, dim, index, torch.abs)
            else:
                raise ValueError(f"`method` must be 'magnitude' or 'taylor', got {method!r}.")
            out.index_add_(0, ids, values)
        scores[layer] = out ** (1.0 / p) if method == "magnitude" else out
    return scores


def layer_scores(model: nn.Module, method: str = "magnitude") -> torch.Tensor:
    """One score per block from its parameters: RMS magnitude, or Taylor ``sum |w * grad|``."""
    out = []
    for block in get_layers(model):
        params = [p for p in block.parameters() if p.dim() > 1]
        if method == "magnitude":
            total = sum(p.numel() for p in params)
            out.append((magnitude_score(params) / max(total, 1) ** 0.5).cpu())
        elif method == "taylor":
            pairs = [(p, p.grad) for p in params if p.grad is not None]
            out.append(taylor_score(*zip(*pairs, strict=True)).cpu() if pairs else torch.tensor(0.0))
        else:
            raise ValueError(f"`method` must be 'magnitude' or 'taylor' for layer scores, got {method!r}.")
    return torch.stack(out).float()


@torch.no_grad()
def block_influence_scores(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    """Average :func:`block_influence` of every block of ``model`` over ``batches`` (dicts of model inputs).

    The block inputs/outputs are captured with temporary forward hooks, so any head (classifier, LM) works; the
    model is run in eval mode and its training mode is restored afterwards.
    """
    layers = get_layers(model)
    totals = torch.zeros(len(layers))
    count = 0
    mask: list[torch.Tensor | None] = [None]

    def capture(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output if isinstance(output, torch.Tensor) else output[0]
            totals[index] += block_influence(hidden_in, hidden_out, mask[0]).cpu()

        return hook

    handles = [block.register_forward_hook(capture(i), with_kwargs=True) for i, block in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask[0] = batch.get("attention_mask")
            model(**batch)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("`batches` is empty; block influence needs at least one calibration batch.")
    return totals / count
