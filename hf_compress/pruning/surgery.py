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

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from hf_compress.models.families import (
    Family,
    block_family,
    block_module,
    builds_experts,
    expert_module,
    ffn_size,
    get_family,
    get_layers,
    head_counts,
    head_dim,
    head_slices,
    locate,
    neuron_slices,
    num_encoder_layers,
    num_experts,
    stacks,
    unwrap,
)
from hf_compress.models.table import HEAD_ATTRIBUTES, PER_LAYER_CONFIG
from hf_compress.pruning.checks import check_keeps_one


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


def _sync_attention(model: nn.Module, layer: int, cross: bool = False) -> None:
    heads, kv_heads = head_counts(model, layer, cross)
    width = heads * head_dim(model, layer, cross)
    values = {"heads": heads, "kv_heads": kv_heads, "groups": heads // kv_heads, "width": width}
    attention = block_module(model, layer, "cross_attention" if cross else "attention")
    for attribute, kind in HEAD_ATTRIBUTES.items():
        if hasattr(attention, attribute):
            setattr(attention, attribute, values[kind])
    if block_family(model, layer).forward_reads_config_heads:
        # Phi-3 splits its fused q/k/v output at `config.num_attention_heads * head_dim`: give the module a config
        # of its own (a shallow copy; the model's config is what gets saved).
        attention.config = copy.copy(attention.config)
        attention.config.num_attention_heads = heads
        attention.config.num_key_value_heads = kv_heads


def _ffn_container(model: nn.Module, layer: int) -> nn.Module:
    family, block, _ = locate(model, layer)
    return block.get_submodule(family.up.rpartition(".")[0])


def layer_structure(model: nn.Module) -> list[dict[str, int]]:
    """Per-layer ``{"num_heads", "num_kv_heads", "head_dim", "ffn"}`` of ``model``, read from its weight shapes.

    Decoder blocks of encoder-decoder models also have ``"num_cross_heads"``. Layers are in the flat numbering.
    Mixture-of-experts families add ``"experts"`` (routed experts of the layer; ``"ffn"`` is then each expert's width).
    """
    model = unwrap(model)
    moe = get_family(model).experts is not None
    out = []
    for layer in range(len(get_layers(model))):
        heads, kv_heads = head_counts(model, layer)
        dim, ffn = head_dim(model, layer), ffn_size(model, layer)
        entry = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": dim, "ffn": ffn}
        if block_family(model, layer).cross_attention is not None:
            entry["num_cross_heads"] = head_counts(model, layer, cross=True)[0]
        if moe:
            entry["experts"] = num_experts(model, layer)
        out.append(entry)
    return out


def _ffn_field(family: Family, entry: dict[str, int]) -> str:
    """Config field of a layer's FFN width (dense blocks of a mixture-of-experts family: ``intermediate_size``)."""
    return "intermediate_size" if entry.get("experts") == 0 else family.ffn_config


def _sides(model: nn.Module, layers: list[dict[str, int]]) -> list[tuple[Family, list[dict[str, int]]]]:
    """Each stack's family entry with its part of the flat ``layers`` (one stack unless encoder-decoder)."""
    split = num_encoder_layers(model)
    if split is None:
        return [(get_family(model), layers)]
    family = get_family(model)
    return [(family, layers[:split]), (family.decoder, layers[split:])]


def _update_uniform_fields(config: Any, family: Family, layers: list[dict[str, int]]) -> None:
    widths: dict[str, set[int]] = {}
    for entry in layers:
        widths.setdefault(_ffn_field(family, entry), set()).add(entry["ffn"])
    for name, ffn in widths.items():
        if len(ffn) == 1:
            setattr(config, name, ffn.pop())
    dims = {entry["head_dim"] for entry in layers}
    if len(dims) == 1 and family.config_head_dim:  # some configs (Qwen2) derive it from hidden_size unless it is set
        setattr(config, family.config_head_dim, dims.pop())
    heads = {(entry["num_heads"], entry["num_kv_heads"], entry["head_dim"]) for entry in layers}
    if len(heads) == 1 and family.config_head_dim:
        config.num_attention_heads, kv_heads, dim = heads.pop()
        setattr(config, family.config_head_dim, dim)
        if hasattr(config, "num_key_value_heads"):  # GQA configs (ViT / DeBERTa have none)
            config.num_key_value_heads = kv_heads
    experts = {entry["experts"] for entry in layers if entry.get("experts")}
    if len(experts) == 1:
        setattr(config, family.experts_config, experts.pop())


def _config_layer(config: Any, family: Family, layer: int) -> dict[str, int | None]:
    """The structure block ``layer`` of ``family``'s stack gets when transformers builds the model from ``config``."""
    heads = getattr(config, family.heads_config)
    dim = getattr(config, family.config_head_dim, None) if family.config_head_dim else None
    kv = getattr(config, "num_key_value_heads", None) if family.heads_config == "num_attention_heads" else None
    out = {"num_heads": heads, "num_kv_heads": kv or heads, "head_dim": dim or config.hidden_size // heads}
    out["ffn"] = getattr(config, family.ffn_config)
    if family.cross_attention is not None:
        out["num_cross_heads"] = heads
    if family.experts is not None:
        out["experts"] = getattr(config, family.experts_config) if builds_experts(config, family, layer) else 0
        out["ffn"] = getattr(config, _ffn_field(family, out))
    return out


def record_structure(model: nn.Module) -> list[dict[str, int]]:
    """Update the config to the current shapes of ``model``; returns its per-layer structure.

    Uniform shapes the family's config can express are written to its fields. If the layers still differ from what
    the config builds, the per-layer structure goes to ``config.hf_compress["layers"]`` (read by
    :func:`hf_compress.from_pretrained`); otherwise that entry is removed, as plain ``from_pretrained`` suffices.
    Called by every surgery function; call it yourself only after changing shapes by hand.
    """
    model = unwrap(model)
    config = model.config
    layers = layer_structure(model)
    differs = False
    for family, part in _sides(model, layers):
        _update_uniform_fields(config, family, part)
        differs |= any(entry != _config_layer(config, family, i) for i, entry in enumerate(part))
    record = dict(getattr(config, "hf_compress", None) or {})
    record.pop("layers", None)
    if differs:
        record["layers"] = layers
    if record:
        config.hf_compress = record
    elif hasattr(config, "hf_compress"):
        del config.hf_compress
    return layers


def prune_heads(
    model: nn.Module, heads: dict[int, list[int]], cross_heads: dict[int, list[int]] | None = None
) -> nn.Module:
    """Physically remove query heads (and, under grouped-query attention, their KV heads).

    The q/k/v rows (fused ``c_attn`` columns for GPT-2), biases and output-projection columns of each head are removed
    and the attention modules' head counts are updated. The result computes exactly what the original model computes
    with those heads' output-projection columns zeroed.

    With grouped-query attention every KV group must keep either none or the same number of its query heads, so
    ``num_attention_heads`` stays a multiple of ``num_key_value_heads``: remove whole groups (their KV head goes with
    them), the same number of query heads from *within* every group (the KV heads stay; the only way to prune a model
    with a single KV head, such as Gemma 3 270M), or both. For example with 8 query heads over 2 KV heads,
    ``[0, 1, 2, 3]`` removes group 0, ``[3, 7]`` removes one query head per group, ``[0]`` alone is refused.

    Encoder-decoder models use the flat numbering of `get_layers`: encoder blocks first, then decoder blocks (decoder
    block `j` is `num_encoder_layers + j`; `hf_compress.models.describe(model)` prints it). `heads` prunes
    self-attention heads; `cross_heads` prunes the cross-attention heads of decoder blocks.

    Removing *every* head of a layer is refused: the attention output would be just the output-projection bias, which
    no transformers config can express; remove the whole block with :func:`drop_layers` or keep one head (group).
    Arguments are validated for all layers before anything changes.

    Args:
        model (`PreTrainedModel`):
            A supported model (see `architectures.FAMILIES`), optionally wrapped by PEFT / DDP / `torch.compile`.
        heads (`dict[int, list[int]]`):
            Query-head indices to remove, per layer index (indices refer to the current heads of that layer; query
            head `h` belongs to KV group `h // (num_heads // num_kv_heads)`).
        cross_heads (`dict[int, list[int]]`, *optional*):
            Cross-attention head indices to remove, per decoder block (flat index) of an encoder-decoder model.

    Returns:
        The same `model`, modified in place.

    Example:

    >>> from hf_compress.pruning import prune_heads
    >>> model = prune_heads(model, {0: [0, 1], 3: [2]})  # doctest: +SKIP
    """
    inner = unwrap(model)
    num_layers = len(get_layers(inner))
    plans = {False: _index_dict("heads", heads, num_layers)}
    if cross_heads is not None:
        plans[True] = _index_dict("cross_heads", cross_heads, num_layers)
    slices = []
    for cross, plan in plans.items():
        for layer, indices in plan.items():
            slices += head_slices(inner, layer, indices, cross)  # validates range, GQA groups, cross-attention
            num_heads, _ = head_counts(inner, layer, cross)
            if len(indices) == num_heads:
                name = "cross_heads" if cross else "heads"
                raise ValueError(
                    f"`{name}[{layer}]` removes all {num_heads} heads of layer {layer}; keep at least one head (one "
                    "KV group under grouped-query attention) or remove the block with "
                    f"`drop_layers(model, [{layer}])`."
                )
    _keep_complement(slices)
    for cross, plan in plans.items():
        for layer in plan:
            _sync_attention(inner, layer, cross)
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
    sparse = [layer for layer in plan if expert_module(inner, layer) is not None]
    if sparse:
        raise ValueError(
            f"`neurons` names layers {sparse}, whose FFNs are fused experts; remove their neurons with "
            "`hf_compress.pruning.experts.prune_expert_neurons`."
        )
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

    ``num_hidden_layers`` and the per-layer config lists (``layer_types``, SmolLM3's ``no_rope_layers``, Qwen MoE's
    ``mlp_only_layers``) are updated and every ``layer_idx`` inside the kept blocks is renumbered, so KV caches and
    ``generate()`` keep working and each kept block keeps its attention kind (sliding / full); the result loads with
    plain ``from_pretrained``.

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
    num_layers = len(get_layers(inner))
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
    split = num_encoder_layers(inner)
    if split is not None and (set(range(split)) <= set(drop) or set(range(split, num_layers)) <= set(drop)):
        raise ValueError(
            f"`layers` {list(layers)} removes every block of the encoder (blocks 0-{split - 1}) or of the decoder "
            f"(blocks {split}-{num_layers - 1}); keep at least one block in each stack."
        )
    start = 0
    for family, stack in stacks(inner):
        size = len(stack)
        local = [i - start for i in drop if start <= i < start + size]
        for index in reversed(local):
            del stack[index]
        for new_index, block in enumerate(stack):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_index
        setattr(config, family.layers_config, len(stack))
        if split is None:
            keep = [i for i in range(size) if i not in local]
            for name in PER_LAYER_CONFIG:
                values = getattr(config, name, None)
                if isinstance(values, list) and len(values) == size:
                    setattr(config, name, [values[i] for i in keep])
        start += size
    if hasattr(config, "mlp_only_layers"):  # Qwen MoE: which blocks are dense follows from their index
        config.mlp_only_layers = [i for i in range(len(get_layers(inner))) if expert_module(inner, i) is None]
        config.decoder_sparse_step = 1
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
