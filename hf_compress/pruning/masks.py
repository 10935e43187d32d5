"""Pruning masks: build, apply (to weights, gradients and optimizer state) and persist in safetensors.

A mask is ``True`` where the structure is kept. Head and neuron masks are small per-layer boolean vectors over the
parameter slices that ``architectures.head_slices`` / ``neuron_slices`` return; :func:`parameter_masks` turns them,
once per pruning decision, into one broadcastable multiplier per parameter, so holding them on every training step is
one in-place op per parameter. The hidden-channel mask zeroes its channels in every writer of the residual stream and
in the norms' gains and biases (``hidden.hidden_carriers``). Layer masks are applied with forward hooks that turn a
removed block into the identity. Unstructured masks have the shape of the weight they mask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_compress.checks import readable_weights
from hf_compress.models.families import ffn_size, get_layers, head_counts, head_slices, neuron_slices, unwrap
from hf_compress.pruning.hidden_channels import hidden_carriers, hidden_size

MASKS_NAME = "pruning_masks.safetensors"

# (parameter, dimension, indices along it) to zero.
ZeroSlice = tuple[nn.Parameter, int, torch.Tensor]


@dataclass(frozen=True, eq=False)
class ParamMask:
    """How to zero what one parameter loses (and the same positions of its gradient / optimizer state).

    Attributes:
        param (`nn.Parameter`): The parameter.
        keep (`torch.Tensor`): 1 where kept, 0 where removed, in the parameter's dtype and broadcastable to it.
        dim (`int`, *optional*): With ``index``: zero only these positions along ``dim`` (``index_fill_``), which is
            cheaper than a full ``mul_`` when they are few.
        index (`torch.LongTensor`, *optional*): The positions along ``dim`` to zero.
    """

    param: nn.Parameter
    keep: torch.Tensor
    dim: int | None = None
    index: torch.Tensor | None = None

    def apply(self, tensor: torch.Tensor) -> None:
        """Zero the removed positions of ``tensor`` (shaped like :attr:`param`) in place."""
        if self.index is not None:
            index = self.index if self.index.device == tensor.device else self.index.to(tensor.device)
            tensor.index_fill_(self.dim, index, 0)
        else:
            tensor.mul_(self.keep if self.keep.device == tensor.device else self.keep.to(tensor.device))


def _param_mask(param: nn.Parameter, keep: torch.Tensor, zero: torch.Tensor | None = None) -> ParamMask:
    """A :class:`ParamMask` of the boolean ``keep``; ``zero`` (defaults to ``~keep``) is what must still be zeroed.

    A mask along one dimension zeroes by index when few positions are involved: up to 1/4 of the rows of a
    row-major weight, or 1/32 of the positions along a contiguous dimension (``index_fill_`` is slow there).
    """
    multiplier = keep.to(param.dtype)
    dims = [d for d, n in enumerate(keep.shape) if n != 1]
    if len(dims) == 1 and keep.dim() == param.dim():
        dim = dims[0]
        index = (~keep if zero is None else zero).flatten().nonzero().flatten()
        if len(index) <= param.shape[dim] // (32 if param.stride(dim) == 1 else 4):
            return ParamMask(param, multiplier, dim, index)
    return ParamMask(param, multiplier)


@dataclass
class PruningMasks:
    """Keep-masks of every pruning target (``True`` = kept).

    Attributes:
        heads (`dict[int, torch.BoolTensor]`): Layer index -> mask over its query heads.
        ffn_neurons (`dict[int, torch.BoolTensor]`): Layer index -> mask over its FFN neurons.
        layers (`torch.BoolTensor`, *optional*): Mask over the blocks.
        hidden (`torch.BoolTensor`, *optional*): Mask over the hidden (residual-stream) channels.
        weights (`dict[str, torch.BoolTensor]`): Parameter name -> element-wise mask (unstructured pruning).
    """

    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn_neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    layers: torch.Tensor | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None

    @classmethod
    def full(cls, model: nn.Module, targets: list[str], weight_names: list[str] | None = None) -> PruningMasks:
        """All-``True`` masks of ``targets`` for ``model`` (``weight_names`` lists the unstructured parameters)."""
        num_layers = len(get_layers(model)) if set(targets) & {"heads", "ffn_neurons", "layers", "hidden"} else 0
        params = dict(unwrap(model).named_parameters())
        masks = cls()
        if "heads" in targets:
            masks.heads = {i: torch.ones(head_counts(model, i)[0], dtype=torch.bool) for i in range(num_layers)}
        if "ffn_neurons" in targets:
            masks.ffn_neurons = {i: torch.ones(ffn_size(model, i), dtype=torch.bool) for i in range(num_layers)}
        if "layers" in targets:
            masks.layers = torch.ones(num_layers, dtype=torch.bool)
        if "hidden" in targets:
            masks.hidden = torch.ones(hidden_size(model), dtype=torch.bool)
        if "unstructured" in targets:
            masks.weights = {n: torch.ones_like(params[n], dtype=torch.bool) for n in weight_names or []}
        return masks

    def removed(self, target: str) -> dict[int, list[int]] | list[int]:
        """Removed indices: ``{layer: [heads]}``, ``{layer: [neurons]}``, ``[layers]`` or ``[hidden channels]``."""
        if target in ("layers", "hidden"):
            keep = getattr(self, target)
            return [] if keep is None else (~keep).nonzero().flatten().tolist()
        per_layer = self.heads if target == "heads" else self.ffn_neurons
        return {layer: (~keep).nonzero().flatten().tolist() for layer, keep in per_layer.items() if not keep.all()}

    def sparsity(self) -> dict[str, float]:
        """Fraction removed of each target present."""
        out = {}
        for target, values in (
            ("heads", self.heads.values()),
            ("ffn_neurons", self.ffn_neurons.values()),
            ("unstructured", self.weights.values()),
        ):
            values = list(values)
            if values:
                total = sum(v.numel() for v in values)
                out[target] = sum(int((~v).sum()) for v in values) / total
        if self.layers is not None:
            out["layers"] = float((~self.layers).sum()) / self.layers.numel()
        if self.hidden is not None:
            out["hidden"] = float((~self.hidden).sum()) / self.hidden.numel()
        return out

    def _flat(self) -> dict[str, torch.Tensor]:
        out = {f"heads.{i}": m for i, m in self.heads.items()}
        out.update({f"ffn_neurons.{i}": m for i, m in self.ffn_neurons.items()})
        out.update({f"weights.{n}": m for n, m in self.weights.items()})
        if self.layers is not None:
            out["layers"] = self.layers
        if self.hidden is not None:
            out["hidden"] = self.hidden
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat view: ``heads.<layer>``, ``ffn_neurons.<layer>``, ``layers``, ``weights.<name>``."""
        return {k: v.detach().to("cpu", torch.bool).contiguous() for k, v in self._flat().items()}

    def equals(self, other: PruningMasks) -> bool:
        """Whether ``other`` holds the same masks (wherever their tensors live)."""
        mine, theirs = self._flat(), other._flat()
        return mine.keys() == theirs.keys() and all(
            mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k].to(mine[k].device)) for k in mine
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> PruningMasks:
        """Inverse of :meth:`state_dict` (keys with other prefixes are ignored)."""
        masks = cls()
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if prefix == "heads":
                masks.heads[int(rest)] = value.bool()
            elif prefix == "ffn_neurons":
                masks.ffn_neurons[int(rest)] = value.bool()
            elif prefix == "weights":
                masks.weights[rest] = value.bool()
            elif key == "layers":
                masks.layers = value.bool()
            elif key == "hidden":
                masks.hidden = value.bool()
        masks.heads = dict(sorted(masks.heads.items()))
        masks.ffn_neurons = dict(sorted(masks.ffn_neurons.items()))
        return masks

    def fingerprint(self) -> str:
        """SHA-256 of the masks (equal on every rank of a distributed run)."""
        digest = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.to(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def save_masks(masks: PruningMasks, path: str, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``masks`` (and ``extra`` tensors, e.g. accumulated scores, stored under ``extra.<name>``) to ``path``."""
    tensors = masks.state_dict()
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    save_file(tensors, path, metadata={"format": "pt", "producer": "hf_compress"})


def load_masks(path: str) -> tuple[PruningMasks, dict[str, torch.Tensor]]:
    """Read a file written by :func:`save_masks`: ``(masks, extra)``."""
    with readable_weights("path", path):  # e.g. a checkpoint's masks file cut short by a crash
        tensors = load_file(path)
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return PruningMasks.from_state_dict(tensors), extra


def structured_slices(model: nn.Module, masks: PruningMasks) -> list[ZeroSlice]:
    """The ``(parameter, dim, index)`` slices that carry removed heads and neurons."""
    out = []
    for layer, heads in masks.removed("heads").items():
        out += [(getattr(m, name), dim, index) for m, name, dim, index in head_slices(model, layer, heads)]
    for layer, neurons in masks.removed("ffn_neurons").items():
        out += [(getattr(m, name), dim, index) for m, name, dim, index in neuron_slices(model, layer, neurons)]
    return out


def parameter_masks(model: nn.Module, masks: PruningMasks, layouts: dict | None = None) -> list[ParamMask]:
    """One keep-multiplier per parameter that loses anything: 1 where kept, 0 where removed, in its dtype and device.

    Head / neuron masks stay broadcastable (``[out, 1]`` rows, ``[1, in]`` columns, ``[out]`` biases); unstructured
    masks have the weight's shape; parameters that keep everything are left out. Build the list once per decision and
    pass it to :func:`mask_weights`, :func:`mask_grads` and :func:`mask_optimizer_state` until the masks change.

    Args:
        model (`nn.Module`): The model the masks belong to.
        masks ([`PruningMasks`]): The masks.
        layouts (`dict[str, UnitLayout]`, *optional*): ``importance.unit_layout`` of ``"heads"`` / ``"ffn_neurons"``
            for the current shapes; with them, whole units are mapped to parameter positions without walking
            ``architectures`` again.

    Example:

    >>> cached = parameter_masks(model, masks)  # doctest: +SKIP
    >>> mask_grads(model, masks, cached)  # doctest: +SKIP
    """
    per_dim: dict[int, tuple[nn.Parameter, dict[int, torch.Tensor]]] = {}

    def keep_along(param: nn.Parameter, dim: int) -> torch.Tensor:
        keeps = per_dim.setdefault(id(param), (param, {}))[1]
        return keeps.setdefault(dim, torch.ones(param.shape[dim], dtype=torch.bool, device=param.device))

    rest = PruningMasks()  # the layers the layouts cannot express, zeroed through `structured_slices`
    for target in ("heads", "ffn_neurons"):
        for layer, keep in getattr(masks, target).items():
            if bool(keep.all()):
                continue
            layout = (layouts or {}).get(target, {}).get(layer)
            units = _unit_keep(keep, layout[0]) if layout is not None else None
            if units is None:
                getattr(rest, target)[layer] = keep
                continue
            for param, dim, index, ids in layout[1]:
                kept = units.to(ids.device)[ids]
                along = keep_along(param, dim)
                if index is None:
                    along &= kept
                else:
                    along[index] &= kept
    for param, dim, index in structured_slices(model, rest):
        keep_along(param, dim)[index.to(param.device)] = False
    if masks.hidden is not None and not bool(masks.hidden.all()):
        for param, dim in hidden_carriers(model):  # dead channels carry nothing: zero them wherever they are written
            keep_along(param, dim).logical_and_(masks.hidden.to(param.device))
    combined: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for param, keeps in per_dim.values():
        mask = None
        for dim, keep in keeps.items():
            shape = [1] * param.dim()
            shape[dim] = -1
            mask = keep.view(shape) if mask is None else mask & keep.view(shape)
        combined[id(param)] = (param, mask)
    params = dict(unwrap(model).named_parameters()) if masks.weights else {}
    for name, keep in masks.weights.items():
        param = params[name]
        keep = keep.to(param.device)
        if bool(keep.all()):
            continue
        previous = combined.get(id(param))
        combined[id(param)] = (param, keep if previous is None else previous[1] & keep)
    return [_param_mask(param, mask) for param, mask in combined.values()]


def _unit_keep(keep: torch.Tensor, num_units: int) -> torch.Tensor | None:
    """``keep`` (per head / neuron) as a mask over ``num_units`` units of consecutive members; ``None`` when a unit is
    only partly removed (``structured_slices`` then zeroes exactly the removed members, or refuses a split GQA group).
    """
    if keep.numel() % num_units:
        return None
    grouped = keep.view(num_units, -1)
    whole = grouped.all(1)
    return whole if torch.equal(whole, grouped.any(1)) else None


def mask_changes(previous: list[ParamMask] | None, current: list[ParamMask]) -> list[ParamMask]:
    """The part of ``current`` not already applied through ``previous`` (both from :func:`parameter_masks`).

    Parameters whose mask is unchanged are left out; for the others only the newly removed positions are zeroed
    when that is cheaper. Applying the result to weights already masked by ``previous`` gives the ``current`` masks.
    """
    before = {id(entry.param): entry.keep for entry in previous or []}
    out = []
    for entry in current:
        old = before.get(id(entry.param))
        if old is not None and old.shape == entry.keep.shape and torch.equal(old, entry.keep):
            continue
        keep = entry.keep != 0
        out.append(_param_mask(entry.param, keep, None if old is None else (old != 0) & ~keep))
    return out


def _cached(model: nn.Module, masks: PruningMasks, cached: list[ParamMask] | None) -> list[ParamMask]:
    return parameter_masks(model, masks) if cached is None else cached


@torch.no_grad()
def mask_weights(model: nn.Module, masks: PruningMasks, cached: list[ParamMask] | None = None) -> None:
    """Zero every removed head / neuron slice and masked weight of ``model`` in place.

    ``cached`` is :func:`parameter_masks` of ``masks`` (or :func:`mask_changes`), built here when omitted.
    """
    for entry in _cached(model, masks, cached):
        entry.apply(entry.param)


@torch.no_grad()
def mask_grads(model: nn.Module, masks: PruningMasks, cached: list[ParamMask] | None = None) -> None:
    """Zero the gradients of every removed slice / weight (parameters without ``.grad`` are skipped)."""
    for entry in _cached(model, masks, cached):
        if entry.param.grad is not None:
            entry.apply(entry.param.grad)


@torch.no_grad()
def mask_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, masks: PruningMasks, cached: list[ParamMask] | None = None
) -> None:
    """Zero the optimizer state (e.g. Adam moments) of removed slices so momentum cannot push them back."""
    state = optimizer.state
    for entry in _cached(model, masks, cached):
        for value in state.get(entry.param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == entry.param.shape:
                entry.apply(value)
