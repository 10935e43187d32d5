"""Pruning masks: build, apply (to weights, gradients and optimizer state) and persist in safetensors.

A mask is ``True`` where the structure is kept. Head and neuron masks are small per-layer boolean vectors; they are
applied by zeroing the parameter slices that ``architectures.head_slices`` / ``neuron_slices`` return. Layer masks
are applied with forward hooks that turn a removed block into the identity. Unstructured masks have the shape of
the weight they mask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from .architectures import ffn_size, get_layers, head_counts, head_slices, neuron_slices, unwrap

MASKS_NAME = "pruning_masks.safetensors"

# (parameter, dimension, indices along it) to zero.
ZeroSlice = tuple[nn.Parameter, int, torch.Tensor]


@dataclass
class PruningMasks:
    """Keep-masks of every pruning target (``True`` = kept).

    Attributes:
        heads (`dict[int, torch.BoolTensor]`): Layer index -> mask over its query heads.
        ffn_neurons (`dict[int, torch.BoolTensor]`): Layer index -> mask over its FFN neurons.
        layers (`torch.BoolTensor`, *optional*): Mask over the blocks.
        weights (`dict[str, torch.BoolTensor]`): Parameter name -> element-wise mask (unstructured pruning).
    """

    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn_neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    layers: torch.Tensor | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def full(cls, model: nn.Module, targets: list[str], weight_names: list[str] | None = None) -> PruningMasks:
        """All-``True`` masks of ``targets`` for ``model`` (``weight_names`` lists the unstructured parameters)."""
        num_layers = len(get_layers(model)) if set(targets) & {"heads", "ffn_neurons", "layers"} else 0
        params = dict(unwrap(model).named_parameters())
        masks = cls()
        if "heads" in targets:
            masks.heads = {i: torch.ones(head_counts(model, i)[0], dtype=torch.bool) for i in range(num_layers)}
        if "ffn_neurons" in targets:
            masks.ffn_neurons = {i: torch.ones(ffn_size(model, i), dtype=torch.bool) for i in range(num_layers)}
        if "layers" in targets:
            masks.layers = torch.ones(num_layers, dtype=torch.bool)
        if "unstructured" in targets:
            masks.weights = {n: torch.ones_like(params[n], dtype=torch.bool) for n in weight_names or []}
        return masks

    def removed(self, target: str) -> dict[int, list[int]] | list[int]:
        """Removed indices: ``{layer: [heads]}``, ``{layer: [neurons]}`` or ``[layers]`` (the surgery arguments)."""
        if target == "layers":
            return [] if self.layers is None else (~self.layers).nonzero().flatten().tolist()
        per_layer = self.heads if target == "heads" else self.ffn_neurons
        return {layer: (~keep).nonzero().flatten().tolist() for layer, keep in per_layer.items() if not keep.all()}

    def sparsity(self) -> dict[str, float]:
        """Fraction removed of each target present."""
        out = {}
        for target, values in (("heads", self.heads.values()), ("ffn_neurons", self.ffn_neurons.values()),
                               ("unstructured", self.weights.values())):
            values = list(values)
            if values:
                total = sum(v.numel() for v in values)
                out[target] = sum(int((~v).sum()) for v in values) / total
        if self.layers is not None:
            out["layers"] = float((~self.layers).sum()) / self.layers.numel()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat view: ``heads.<layer>``, ``ffn_neurons.<layer>``, ``layers``, ``weights.<name>``."""
        out = {f"heads.{i}": m for i, m in self.heads.items()}
        out.update({f"ffn_neurons.{i}": m for i, m in self.ffn_neurons.items()})
        out.update({f"weights.{n}": m for n, m in self.weights.items()})
        if self.layers is not None:
            out["layers"] = self.layers
        return {k: v.detach().to("cpu", torch.bool).contiguous() for k, v in out.items()}

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


def _targets(model: nn.Module, masks: PruningMasks, slices: list[ZeroSlice] | None):
    slices = structured_slices(model, masks) if slices is None else slices
    params = dict(unwrap(model).named_parameters()) if masks.weights else {}
    return slices, [(params[name], keep) for name, keep in masks.weights.items()]


@torch.no_grad()
def mask_weights(model: nn.Module, masks: PruningMasks, slices: list[ZeroSlice] | None = None) -> None:
    """Zero every removed head / neuron slice and masked weight of ``model`` in place."""
    slices, elementwise = _targets(model, masks, slices)
    for param, dim, index in slices:
        param.index_fill_(dim, index.to(param.device), 0)
    for param, keep in elementwise:
        param.mul_(keep.to(param.device))


@torch.no_grad()
def mask_grads(model: nn.Module, masks: PruningMasks, slices: list[ZeroSlice] | None = None) -> None:
    """Zero the gradients of every removed slice / weight (parameters without ``.grad`` are skipped)."""
    slices, elementwise = _targets(model, masks, slices)
    for param, dim, index in slices:
        if param.grad is not None:
            param.grad.index_fill_(dim, index.to(param.device), 0)
    for param, keep in elementwise:
        if param.grad is not None:
            param.grad.mul_(keep.to(param.device))


@torch.no_grad()
def mask_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, masks: PruningMasks, slices: list[ZeroSlice] | None = None
) -> None:
    """Zero the optimizer state (e.g. Adam moments) of removed slices so momentum cannot push them back."""
    slices, elementwise = _targets(model, masks, slices)
    state = optimizer.state
    for param, dim, index in slices:
        for value in state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.index_fill_(dim, index.to(value.device), 0)
    for param, keep in elementwise:
        for value in state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.mul_(keep.to(value.device))


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
    from .importance import normalize_per_layer
    from .schedules import units_to_remove

    layers = sorted(scores)
    if scope == "global":
        scores = normalize_per_layer(scores)
        groups = [layers]
    else:
        groups = [[layer] for layer in layers]
    new = {layer: keep[layer].clone() for layer in layers}
    for group in groups:
        flat = torch.cat([torch.where(keep[lay], scores[lay].float(), -torch.inf) for lay in group])
        owner = torch.cat([torch.full((len(scores[lay]),), lay) for lay in group])
        position = torch.cat([torch.arange(len(scores[lay])) for lay in group])
        target = max(units_to_remove(sparsity, flat.numel()), int((flat == -torch.inf).sum()))
        kept = {lay: int(keep[lay].sum()) for lay in group}
        removed = int((flat == -torch.inf).sum())
        for i in torch.sort(flat, stable=True).indices.tolist():
            layer, unit = int(owner[i]), int(position[i])
            if removed >= target:
                break
            if not new[layer][unit] or kept[layer] <= min_keep:
                continue
            new[layer][unit] = False
            kept[layer] -= 1
            removed += 1
    return new


def skip_layers(model: nn.Module, keep: torch.Tensor) -> list[RemovableHandle]:
    """Make every block with ``keep[i] == False`` the identity (its output replaced by its input) until removal.

    Returns the hook handles; call ``handle.remove()`` on each to restore the blocks.
    """

    def identity(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, torch.Tensor):
            return hidden_in
        return (hidden_in, *tuple(output)[1:])

    layers = get_layers(model)
    return [layers[i].register_forward_hook(identity, with_kwargs=True) for i in (~keep).nonzero().flatten().tolist()]
