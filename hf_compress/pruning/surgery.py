"""Physically remove attention heads, FFN neurons and whole blocks, keeping the config in step.

Every function works in place on any supported head (base, classification, LM ...) and returns the model. Parameter
slices come from :mod:`hf_compress.models.families`; here we keep their complement, fix the modules' shape
attributes and update the config. Config fields the family can express (uniform FFN width, layer count,
Llama-family head counts) are rewritten so that plain ``AutoModel.from_pretrained`` rebuilds the model. Anything else
(per-layer differences, fewer heads where head width is ``hidden_size / num_heads``) is recorded per layer in
``config.hf_compress["layers"]`` while the config fields keep their original, larger sizes: plain loading then stops
with a size-mismatch error instead of loading wrong weights, and :func:`hf_compress.from_pretrained` rebuilds it.
:func:`skip_layers` is the reversible preview of :func:`drop_layers` used while training: blocks become identities
through forward hooks until they are removed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from hf_compress.models.families import (
    Family,
    block_module,
    ffn_size,
    get_family,
    get_layers,
    head_counts,
    head_dim,
    head_slices,
    neuron_slices,
    unwrap,
)
from hf_compress.pruning.checks import check_keeps_one

# Runtime attributes of the attention modules (BERT, DistilBERT, GPT-2, Llama family) and what they hold.
_HEAD_ATTRIBUTES: dict[str, str] = {
    "num_attention_heads": "heads",  # BERT / RoBERTa
    "n_heads": "heads",  # DistilBERT
    "num_heads": "heads",  # GPT-2
    "num_key_value_heads": "kv_heads",
    "num_key_value_groups": "groups",  # Llama family (GQA repeat factor)
    "all_head_size": "width",  # BERT / RoBERTa
    "split_size": "width",  # GPT-2 (splits the fused q/k/v output)
}


def _index_dict(name: str, value: Any, num_layers: int) -> dict[int, list[int]]:
    """Validate a ``{layer: [indices]}`` argument; returns it with sorted unique indices and empty entries dropped."""
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a dict of layer index -> list of indices, got {type(value).__name__}.")
    out = {}
    for layer, indices in value.items():
        if not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"`{name}` has layer index {layer!r} outside [0, {num_layers}).")
        if not all(isinstance(i, int) for i in indices):
            raise TypeError(f"`{name}[{layer}]` must be a list of ints, got {list(indices)!r}.")
        if indices:
            out[layer] = sorted(set(indices))
    return out


def _keep_complement(slices: list[tuple[nn.Module, str, int, torch.Tensor]]) -> None:
    """Replace each sliced parameter by its complement along the slice dimension and fix the modules' shapes."""
    for module, _, _, _ in slices:
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise TypeError(
                f"`model` has a {type(module).__name__} where an nn.Linear or Conv1D was expected; merge adapters "
                "(e.g. `merge_and_unload()`) or dequantize before structured pruning."
            )
    with torch.no_grad():
        for module, name, dim, index in slices:
            param = getattr(module, name)
            keep = torch.ones(param.shape[dim], dtype=torch.bool)
            keep[index] = False
            kept = param.index_select(dim, keep.nonzero().flatten().to(param.device))
            setattr(module, name, nn.Parameter(kept, requires_grad=param.requires_grad))
    for module in {id(s[0]): s[0] for s in slices}.values():
        if isinstance(module, Conv1D):
            module.nx, module.nf = module.weight.shape
        else:
            module.out_features, module.in_features = module.weight.shape


def _sync_attention(model: nn.Module, layer: int) -> None:
    heads, kv_heads = head_counts(model, layer)
    width = heads * head_dim(model, layer)
    values = {"heads": heads, "kv_heads": kv_heads, "groups": heads // kv_heads, "width": width}
    attention = block_module(model, layer, "attention")
    for attribute, kind in _HEAD_ATTRIBUTES.items():
        if hasattr(attention, attribute):
            setattr(attention, attribute, values[kind])


def _ffn_container(model: nn.Module, layer: int) -> nn.Module:
    path = get_family(model).up.rpartition(".")[0]
    return get_layers(model)[layer].get_submodule(path)


def layer_structure(model: nn.Module) -> list[dict[str, int]]:
    """Per-layer ``{"num_heads", "num_kv_heads", "head_dim", "ffn"}`` of ``model``, read from its weight shapes."""
    model = unwrap(model)
    out = []
    for layer in range(len(get_layers(model))):
        heads, kv_heads = head_counts(model, layer)
        dim, ffn = head_dim(model, layer), ffn_size(model, layer)
        out.append({"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": dim, "ffn": ffn})
    return out


def _update_uniform_fields(config: Any, family: Family, layers: list[dict[str, int]]) -> None:
    ffn = {entry["ffn"] for entry in layers}
    if len(ffn) == 1:
        setattr(config, family.ffn_config, ffn.pop())
    heads = {(entry["num_heads"], entry["num_kv_heads"], entry["head_dim"]) for entry in layers}
    if len(heads) == 1 and family.config_head_dim:
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads.pop()


def _config_layer(config: Any, family: Family) -> dict[str, int | None]:
    """The structure every layer gets when transformers builds the model from ``config``."""
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) if family.config_head_dim else None
    return {
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": dim or config.hidden_size // heads,
        "ffn": getattr(config, family.ffn_config),
    }


def record_structure(model: nn.Module) -> list[dict[str, int]]:
    """Update the config to the current shapes of ``model``; returns its per-layer structure.

    Uniform shapes the family's config can express are written to its fields. If the layers still differ from what
    the config builds, the per-layer structure goes to ``config.hf_compress["layers"]`` (read by
    :func:`hf_compress.from_pretrained`); otherwise that entry is removed, as plain ``from_pretrained`` suffices.
    Called by every surgery function; call it yourself only after changing shapes by hand.
    """
    model = unwrap(model)
    family, config = get_family(model), model.config
    layers = layer_structure(model)
    _update_uniform_fields(config, family, layers)
    record = dict(getattr(config, "hf_compress", None) or {})
    record.pop("layers", None)
    if any(entry != _config_layer(config, family) for entry in layers):
        record["layers"] = layers
    if record:
        config.hf_compress = record
    elif hasattr(config, "hf_compress"):
        del config.hf_compress
    return layers


def prune_heads(model: nn.Module, heads: dict[int, list[int]]) -> nn.Module:
    """Physically remove query heads (and, under grouped-query attention, their KV heads).

    The q/k/v rows (fused ``c_attn`` columns for GPT-2), biases and output-projection columns of each head are removed
    and the attention modules' head counts are updated. The result computes exactly what the original model computes
    with those heads' value rows zeroed. With grouped-query attention only whole query groups can go.

    Removing *every* head of a layer is refused: the attention output would be just the output-projection bias, which
    no transformers config can express; remove the whole block with :func:`drop_layers` or keep one head (group).
    Arguments are validated for all layers before anything changes.

    Args:
        model (`PreTrainedModel`):
            A supported model (see `architectures.FAMILIES`), optionally wrapped by PEFT / DDP / `torch.compile`.
        heads (`dict[int, list[int]]`):
            Query-head indices to remove, per layer index (indices refer to the current heads of that layer).

    Returns:
        The same `model`, modified in place.

    Example:

    >>> from hf_compress.pruning import prune_heads
    >>> model = prune_heads(model, {0: [0, 1], 3: [2]})  # doctest: +SKIP
    """
    inner = unwrap(model)
    plan = _index_dict("heads", heads, len(get_layers(inner)))
    slices = {}
    for layer, indices in plan.items():
        num_heads, _ = head_counts(inner, layer)
        slices[layer] = head_slices(inner, layer, indices)  # validates range and GQA groups
        if len(indices) == num_heads:
            raise ValueError(
                f"`heads[{layer}]` removes all {num_heads} heads of layer {layer}; keep at least one head (one KV "
                f"group under grouped-query attention) or remove the block with `drop_layers(model, [{layer}])`."
            )
    _keep_complement([s for layer_slices in slices.values() for s in layer_slices])
    for layer in slices:
        _sync_attention(inner, layer)
    record_structure(inner)
    return model


def prune_ffn_neurons(model: nn.Module, neurons: dict[int, list[int]]) -> nn.Module:
    """Physically remove FFN neurons: up (and gate) rows with their bias entries, down-projection columns.

    The result computes exactly what the original model computes with those neurons' down-projection columns zeroed.
    Removing every neuron of a layer is refused, as for heads: remove the whole block with :func:`drop_layers`.
    Arguments are validated for all layers before anything changes.

    Args:
        model (`PreTrainedModel`):
            A supported model, optionally wrapped by PEFT / DDP / `torch.compile`.
        neurons (`dict[int, list[int]]`):
            Neuron indices to remove, per layer index.

    Returns:
        The same `model`, modified in place.

    Example:

    >>> from hf_compress.pruning import prune_ffn_neurons
    >>> model = prune_ffn_neurons(model, {0: list(range(128))})  # doctest: +SKIP
    """
    inner = unwrap(model)
    plan = _index_dict("neurons", neurons, len(get_layers(inner)))
    slices = {layer: neuron_slices(inner, layer, indices) for layer, indices in plan.items()}
    for layer, indices in plan.items():  # the rule of `prune_heads`: a layer keeps at least one unit
        fix = f"remove the block with `drop_layers(model, [{layer}])`"
        check_keeps_one("neurons", layer, len(set(indices)), ffn_size(inner, layer), "FFN neurons", fix)
    _keep_complement([s for layer_slices in slices.values() for s in layer_slices])
    for layer in slices:
        container = _ffn_container(inner, layer)
        if hasattr(container, "intermediate_size"):  # Llama-family MLPs keep their width
            container.intermediate_size = ffn_size(inner, layer)
    record_structure(inner)
    return model


def drop_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Remove whole transformer blocks and renumber the rest.

    ``num_hidden_layers`` and ``layer_types`` (when the config has it) are updated and every ``layer_idx`` inside the
    kept blocks is renumbered, so KV caches and ``generate()`` keep working; the result loads with plain
    ``from_pretrained``.

    Args:
        model (`PreTrainedModel`):
            A supported model, optionally wrapped by PEFT / DDP / `torch.compile`.
        layers (`list[int]`):
            Indices of the blocks to remove (at least one block must remain).

    Returns:
        The same `model`, modified in place.

    Example:

    >>> from hf_compress.pruning import drop_layers
    >>> model = drop_layers(model, [5, 6])  # doctest: +SKIP
    """
    inner = unwrap(model)
    blocks = get_layers(inner)
    num_layers = len(blocks)
    if isinstance(layers, int) or not all(isinstance(i, int) for i in layers):
        raise TypeError(f"`layers` must be a list of layer indices, got {layers!r}.")
    drop = sorted(set(layers))
    if len(drop) != len(layers):
        raise ValueError(f"`layers` must not repeat an index, got {list(layers)}.")
    if any(not 0 <= i < num_layers for i in drop):
        raise ValueError(f"`layers` has indices outside [0, {num_layers}), got {list(layers)}.")
    if len(drop) == num_layers:
        raise ValueError(f"`layers` removes all {num_layers} layers; keep at least one.")
    config = inner.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            "`layers` cannot be dropped from a model with `scale_attn_by_inverse_layer_idx=True`, whose attention "
            "scale depends on the layer index; disable it or keep all layers."
        )
    keep = [i for i in range(num_layers) if i not in drop]
    for index in reversed(drop):
        del blocks[index]
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(keep)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep]
    record_structure(inner)
    return model


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
