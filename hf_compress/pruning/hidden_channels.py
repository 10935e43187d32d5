"""Where the hidden (residual-stream) channels of a model live: discovered, then zeroed on request.

* the block projections come from the family table (:mod:`hf_compress.models.families`): q / k / v / fused qkv / up
  / gate read the residual stream (input columns), o / down write to it (output rows and bias entries);
* everything else is found by shape: ``nn.Embedding`` of width ``hidden_size`` (word, position, token type) writes,
  a norm (``*LayerNorm`` / ``*RMSNorm`` with a ``(hidden_size,)`` weight) is sliced and rescaled, any other
  ``nn.Linear`` / ``Conv1D`` reads hidden channels when ``in_features == hidden_size`` (LM head, classifier, score)
  and writes them when ``out_features == hidden_size`` (pooler, MLM transform, RoBERTa classification dense);
* a parameter with a ``hidden_size`` dimension that none of these rules covers is an error.

:func:`zero_hidden_channels` makes channels carry nothing (the training-time mask of the hidden target); removing them
is :mod:`hf_compress.pruning.hidden`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_compress.models.families import block_module, expert_module, get_family, get_layers, locate, unwrap
from hf_compress.pruning.checks import check_hidden_supported

_READERS = ("q", "k", "v", "qkv", "up", "gate")
_WRITERS = ("o", "down")
_FFN_ROLES = ("up", "gate", "down")  # a sparse (mixture-of-experts) block's are its fused experts instead


@dataclass
class Norm:
    """A normalisation over the hidden channels: its module, whether it centres (LayerNorm), its gain offset."""

    module: nn.Module
    centred: bool
    offset: float  # the gain is ``offset + weight`` (1.0 for Gemma-style norms, 0.0 otherwise)


@dataclass
class HiddenLayout:
    """Every tensor of a model that carries hidden channels, as ``(module, parameter name, dim)`` entries."""

    size: int
    readers: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    writers: list[tuple[nn.Module, str, int]] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    scaled_embeddings: list[nn.Embedding] = field(default_factory=list)


def hidden_size(model: nn.Module) -> int:
    """``config.hidden_size`` of ``model`` (``dim`` / ``n_embd`` through the config's attribute map)."""
    return int(unwrap(model).config.hidden_size)


def _linear_dims(module: nn.Module) -> tuple[int, int, int, int]:
    """``(in_features, out_features, input dim, output dim)`` of an ``nn.Linear`` or ``Conv1D`` weight."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1], 0, 1
    return module.in_features, module.out_features, 1, 0


def _add_projection(layout: HiddenLayout, module: nn.Module, read: bool, write: bool) -> None:
    _, _, in_dim, out_dim = _linear_dims(module)
    if read:
        layout.readers.append((module, "weight", in_dim))
    if write:
        layout.writers.append((module, "weight", out_dim))
        if getattr(module, "bias", None) is not None:
            layout.writers.append((module, "bias", 0))


def _gain_offset(module: nn.Module) -> float:
    """0 for ``weight * x_hat`` norms, 1 for ``(1 + weight) * x_hat`` norms: probed with the weight set to zero."""
    if module.weight.is_meta:  # shapes only (dry-run plans): the offset changes no count
        return 0.0
    probe = torch.ones(1, module.weight.shape[0], dtype=module.weight.dtype, device=module.weight.device)
    params = {"weight": torch.zeros_like(module.weight)}
    with torch.no_grad():
        out = torch.func.functional_call(module, params, (probe,))
    return float(round(out.float().mean().item()))


def _as_norm(module: nn.Module, size: int) -> Norm | None:
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (size,):
        return None
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
        return Norm(module, centred=True, offset=0.0)
    if name.endswith("RMSNorm"):
        return Norm(module, centred=False, offset=_gain_offset(module))
    return None


def hidden_layout(model: nn.Module) -> HiddenLayout:
    """Discover every reader, writer and norm of the hidden channels of ``model`` (see the module docstring).

    Raises a one-sentence error naming the first parameter with a ``hidden_size`` dimension that no rule covers.
    """
    inner = unwrap(model)
    check_hidden_supported(getattr(inner.config, "model_type", None), "model")
    family = get_family(inner)
    size = hidden_size(inner)
    layout = HiddenLayout(size=size)
    known: set[int] = set()
    for layer in range(len(get_layers(inner))):
        experts = expert_module(inner, layer)
        for roles, read in ((_READERS, True), (_WRITERS, False)):
            for role in roles:
                if getattr(family, role) is None or (experts is not None and role in _FFN_ROLES):
                    continue
                _add_projection(layout, block_module(inner, layer, role), read=read, write=not read)
                known.add(id(block_module(inner, layer, role)))
        if experts is not None:  # fused experts: gate_up_proj [e, 2 * ffn, hidden], down_proj [e, hidden, ffn]
            router = locate(inner, layer)[1].get_submodule(family.router)
            layout.readers += [(experts, "gate_up_proj", 2), (router, "weight", 1)]
            layout.writers.append((experts, "down_proj", 1))
            known.update((id(experts), id(router)))
    for module in inner.modules():
        if id(module) in known:
            continue
        if isinstance(module, nn.Embedding) and module.embedding_dim == size:
            layout.writers.append((module, "weight", 1))
            if hasattr(module, "embed_scale"):
                layout.scaled_embeddings.append(module)
        elif isinstance(module, (nn.Linear, Conv1D)):
            fan_in, fan_out, _, _ = _linear_dims(module)
            if fan_in == size or fan_out == size:
                _add_projection(layout, module, read=fan_in == size, write=fan_out == size)
        elif (norm := _as_norm(module, size)) is not None:
            layout.norms.append(norm)
        else:
            continue
        known.add(id(module))
    for name, param in inner.named_parameters():
        owner = inner.get_submodule(name.rpartition(".")[0]) if "." in name else inner
        if id(owner) not in known and size in param.shape:
            raise ValueError(
                f"`model` has parameter {name!r} of shape {tuple(param.shape)} with a hidden_size ({size}) dimension "
                "that hf_compress cannot place (not an embedding, norm, nn.Linear or Conv1D); hidden pruning does not "
                "support this architecture yet."
            )
    return layout


def channel_index(channels: Sequence[int] | torch.Tensor, size: int) -> torch.Tensor:
    """``channels`` as unique ``long`` indices, checked to lie in ``[0, size)`` and to leave one channel."""
    index = torch.as_tensor(list(channels) if not isinstance(channels, torch.Tensor) else channels, dtype=torch.long)
    index = index.flatten().unique()
    if index.numel() and (index.min() < 0 or index.max() >= size):
        raise ValueError(f"`channels` must be hidden-channel indices in [0, {size}), got {index.tolist()[:8]}.")
    if index.numel() >= size:
        raise ValueError(f"`channels` removes all {size} hidden channels; keep at least one.")
    return index


def param_holders(layout: HiddenLayout) -> dict[int, tuple[nn.Parameter, set[int], list[tuple[nn.Module, str]]]]:
    """Unique parameters with the dims carrying hidden channels and every module holding them (tied weights once)."""
    holders: dict[int, tuple[nn.Parameter, set[int], list[tuple[nn.Module, str]]]] = {}
    entries = layout.readers + layout.writers
    entries += [(n.module, name, 0) for n in layout.norms for name in ("weight", "bias")]
    for module, name, dim in entries:
        param = getattr(module, name, None)
        if param is None:
            continue
        entry = holders.setdefault(id(param), (param, set(), []))
        entry[1].add(dim)
        if (module, name) not in entry[2]:
            entry[2].append((module, name))
    return holders


def zero_hidden_channels(model: nn.Module, channels: Sequence[int] | torch.Tensor) -> nn.Module:
    """Make ``channels`` carry nothing: zero them in every writer, and zero the norms' gains and biases there.

    This is the training-time mask of the hidden target and the premise of the zero-channel oracle. In place.
    """
    layout = hidden_layout(model)
    index = channel_index(channels, layout.size)
    with torch.no_grad():
        for module, name, dim in layout.writers:
            param = getattr(module, name)
            param.index_fill_(dim, index.to(param.device), 0.0)
        for norm in layout.norms:
            norm.module.weight.index_fill_(0, index.to(norm.module.weight.device), -norm.offset)
            if getattr(norm.module, "bias", None) is not None:
                norm.module.bias.index_fill_(0, index.to(norm.module.bias.device), 0.0)
    return model


def hidden_carriers(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """``(parameter, dim)`` of every writer and norm parameter along which :func:`zero_hidden_channels` zeroes."""
    layout = hidden_layout(model)
    out = [(getattr(module, name), dim) for module, name, dim in layout.writers]
    for norm in layout.norms:
        out += [
            (getattr(norm.module, name), 0)
            for name in ("weight", "bias")
            if getattr(norm.module, name, None) is not None
        ]
    return out
