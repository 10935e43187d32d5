"""Importance scores of heads, FFN neurons and layers: pure tensor functions plus per-layer vectorised gathers.

* ``magnitude``: Lp norm of every weight that carries a unit (rows/columns/bias entries from ``architectures``).
* ``taylor``: first-order Taylor ``sum |w * dL/dw|`` over the same slices (Molchanov et al., Michel et al. 2019);
  the callback accumulates it over the steps between two pruning events.
* ``block_influence``: ShortGPT's ``1 - cos(h_in, h_out)`` of each block, averaged over calibration tokens; a block
  that barely rotates its input can be dropped.

Under grouped-query attention the unit of head pruning is a whole query group (the query heads sharing one KV head),
so ``head_groups`` lists groups, each a list of query heads; with a single KV head the units are single query heads.

Unit scores are vectorised: ``unit_layout`` records once which positions of which parameters carry each unit, and a
score is then one reduction per parameter (a value per row / column) summed into units with ``index_add_``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from hf_compress.models.families import ffn_size, get_layers, head_counts, head_slices, neuron_slices


def magnitude_score(tensors: Sequence[torch.Tensor], p: float = 2.0) -> torch.Tensor:
    """Lp norm of all values of ``tensors`` taken together (the magnitude of one unit).

    Example:

    >>> magnitude_score([torch.tensor([3.0]), torch.tensor([[4.0]])])
    tensor(5.)
    """
    return sum(_norm(t.detach(), p) ** p for t in tensors) ** (1.0 / p)


def taylor_score(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """First-order Taylor importance ``sum |w * g|`` of one unit (estimated loss change when it is zeroed)."""
    return sum(_norm(w.detach().float() * g.detach().float(), 1.0) for w, g in zip(weights, grads, strict=True))


def _norm(tensor: torch.Tensor, p: float, dim: list[int] | None = None) -> torch.Tensor:
    """Float32 Lp norm of ``tensor`` (over ``dim``, or all of it): one fused pass, no ``|x| ** p`` temporary."""
    if tensor.dtype == torch.float64:  # `vector_norm` refuses to narrow through its `dtype` argument
        tensor = tensor.float()
    return torch.linalg.vector_norm(tensor, ord=p, dim=dim, dtype=torch.float32)


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
    """The prunable units of attention in block ``layer``, each a run of consecutive query heads.

    Single heads without GQA; whole query groups (the heads sharing one KV head) under GQA, except with a single KV
    head, where no whole group can go: the units are then single query heads removed from within that group.
    """
    num_q, num_kv = head_counts(model, layer)
    group = 1 if num_kv == 1 else num_q // num_kv
    return [list(range(g * group, (g + 1) * group)) for g in range(num_q // group)]


def _position_sums(tensor: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """``sum |x|^p`` over every dimension of ``tensor`` but ``dim`` (float32): one value per position along ``dim``.

    Picks the fast kernel of each case: a fused L2 norm over contiguous rows, one temporary and a sum otherwise.
    """
    x = tensor if tensor.dtype == torch.float32 else tensor.float()
    other = [d for d in range(x.dim()) if d != dim]
    if not other:  # a bias: one value per position already
        return x.abs().pow(p)
    if p == 2 and other == [x.dim() - 1] and x.is_contiguous():
        return torch.linalg.vector_norm(x, dim=other).square()
    powered = x * x if p == 2 else x.abs() if p == 1 else x.abs().pow(p)
    return powered.sum(other)


def _taylor_sums(param: nn.Parameter, dim: int) -> torch.Tensor:
    """``sum |w * grad|`` (float32) over every dimension of ``param`` but ``dim``."""
    product = param.detach() * param.grad
    product = (product if product.dtype == torch.float32 else product.float()).abs_()
    other = [d for d in range(product.dim()) if d != dim]
    return product.sum(other) if other else product


# One parameter's share of a layer's units: (parameter, dim, positions along dim or None for all of them in order,
# unit id of each position).
UnitRows = tuple[nn.Parameter, int, torch.Tensor | None, torch.Tensor]
# Layer -> (number of units, the parameters carrying them).
UnitLayout = dict[int, tuple[int, list[UnitRows]]]


def _unit_rows(model: nn.Module, layer: int, target: str) -> list[UnitRows]:
    """The :data:`UnitRows` covering every unit of ``target`` in block ``layer``, positions sorted."""
    if target == "ffn_neurons":
        size = ffn_size(model, layer)
        slices = neuron_slices(model, layer, list(range(size)))
        # A fused gate/up projection holds neuron n at rows n and size + n.
        entries = [(getattr(m, name), dim, index, index % size) for m, name, dim, index in slices]
    else:
        rows: dict[tuple[int, int], list] = {}
        for unit, heads in enumerate(head_groups(model, layer)):
            for module, name, dim, index in head_slices(model, layer, heads):
                param = getattr(module, name)
                entry = rows.setdefault((id(param), dim), [param, dim, [], []])
                entry[2].append(index)
                entry[3].append(torch.full_like(index, unit))
        entries = [(param, dim, torch.cat(index), torch.cat(ids)) for param, dim, index, ids in rows.values()]
    out = []
    for param, dim, index, ids in entries:
        index, order = index.sort()
        ids = ids[order].to(param.device)
        whole = len(index) == param.shape[dim] and torch.equal(index, torch.arange(len(index)))
        out.append((param, dim, None if whole else index.to(param.device), ids))
    return out


def unit_layout(model: nn.Module, target: str) -> UnitLayout:
    """Where every head group (``target="heads"``) or FFN neuron (``"ffn_neurons"``) of ``model`` lives.

    Building it walks ``architectures`` once per unit; :func:`unit_scores` then needs one reduction per parameter.
    It stays valid while the parameter shapes do (reuse it across training steps, rebuild it after surgery).

    Example:

    >>> layout = unit_layout(model, "ffn_neurons")  # doctest: +SKIP
    >>> scores = unit_scores(model, "ffn_neurons", layout=layout)  # doctest: +SKIP
    """
    if target not in ("heads", "ffn_neurons"):
        raise ValueError(f"`target` must be 'heads' or 'ffn_neurons' for unit scores, got {target!r}.")
    layout = {}
    for layer in range(len(get_layers(model))):
        num_units = len(head_groups(model, layer)) if target == "heads" else ffn_size(model, layer)
        layout[layer] = (num_units, _unit_rows(model, layer, target))
    return layout


def layer_unit_scores(num_units: int, rows: list[UnitRows], method: str = "magnitude", p: float = 2.0) -> torch.Tensor:
    """Scores of the ``num_units`` units of one layer of a :data:`UnitLayout`, on the parameters' device.

    Each parameter is reduced to one value per position along its unit dimension (``sum |w|^p`` or
    ``sum |w * grad|``) in a single pass, and the positions are summed into their units.
    """
    if method not in ("magnitude", "taylor"):
        raise ValueError(f"`method` must be 'magnitude' or 'taylor', got {method!r}.")
    out = None
    for param, dim, index, ids in rows:
        if out is None:
            out = torch.zeros(num_units, device=ids.device)
        if method == "magnitude":
            values = _position_sums(param.detach(), dim, p)
        elif param.grad is not None:
            values = _taylor_sums(param, dim)
        else:
            continue
        if index is not None:
            values = values.index_select(0, index)
        out.index_add_(0, ids, values.to(out.device))
    if out is None:
        out = torch.zeros(num_units)
    return out.pow(1.0 / p) if method == "magnitude" else out


def unit_scores(
    model: nn.Module, target: str, method: str = "magnitude", p: float = 2.0, layout: UnitLayout | None = None
) -> dict[int, torch.Tensor]:
    """Per-layer scores (on the CPU) of every head group (``target="heads"``) or FFN neuron (``"ffn_neurons"``).

    ``method="magnitude"`` gives the Lp norm of each unit's weights; ``"taylor"`` gives ``sum |w * grad|`` from the
    gradients currently stored in ``.grad`` (zero where a parameter has none). Pass ``layout`` (from
    :func:`unit_layout`) to skip rebuilding it.

    Example:

    >>> scores = unit_scores(model, "heads")  # doctest: +SKIP
    """
    if target not in ("heads", "ffn_neurons"):
        raise ValueError(f"`target` must be 'heads' or 'ffn_neurons' for unit scores, got {target!r}.")
    if method not in ("magnitude", "taylor"):
        raise ValueError(f"`method` must be 'magnitude' or 'taylor', got {method!r}.")
    layout = unit_layout(model, target) if layout is None else layout
    return {layer: layer_unit_scores(n, rows, method, p).cpu() for layer, (n, rows) in layout.items()}


def layer_scores(model: nn.Module, method: str = "magnitude") -> torch.Tensor:
    """One score per block from its parameters: RMS magnitude, or Taylor ``sum |w * grad|``."""
    if method not in ("magnitude", "taylor"):
        raise ValueError(f"`method` must be 'magnitude' or 'taylor' for layer scores, got {method!r}.")
    out = []
    for block in get_layers(model):
        params = [p for p in block.parameters() if p.dim() > 1]
        if method == "magnitude":
            total = sum(p.numel() for p in params)
            out.append(magnitude_score(params) / max(total, 1) ** 0.5)
        else:
            pairs = [(p, p.grad) for p in params if p.grad is not None]
            out.append(taylor_score(*zip(*pairs, strict=True)) if pairs else torch.tensor(0.0))
    return torch.stack([score.to(out[0].device) for score in out]).float().cpu()  # one host transfer at the end


@torch.no_grad()
def block_influence_scores(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    """Average :func:`block_influence` of every block of ``model`` over ``batches`` (dicts of model inputs).

    The block inputs/outputs are captured with temporary forward hooks, so any head (classifier, LM) works; the
    model is run in eval mode and its training mode is restored afterwards.
    """
    layers = get_layers(model)
    totals = torch.zeros(len(layers))
    mask: list[torch.Tensor | None] = [None]

    def capture(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output if isinstance(output, torch.Tensor) else output[0]
            totals[index] += block_influence(hidden_in, hidden_out, mask[0]).cpu()

        return hook

    handles = [block.register_forward_hook(capture(i), with_kwargs=True) for i, block in enumerate(layers)]
    count = run_calibration(model, batches, handles, mask, "block influence")
    return totals / count


def run_calibration(model: nn.Module, batches: Iterable[dict], handles: list, mask: list, what: str) -> int:
    """Forward every batch of ``batches`` in eval mode so the hooks behind ``handles`` can collect statistics.

    Each batch's attention mask is put in ``mask[0]`` for the hooks; the hooks are removed and the training mode
    restored afterwards, also on error. Returns the number of batches (an empty iterable is a one-sentence error
    naming ``what``).
    """
    was_training, count = model.training, 0
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
        raise ValueError(f"`batches` is empty; {what} needs at least one calibration batch.")
    return count
