"""Where attention heads, FFN neurons and blocks are in a model, read from the family table.

The table (:data:`FAMILIES`, :class:`Family`, in :mod:`hf_compress.models.table`) maps a ``config.model_type`` to the
attribute paths of its blocks and projections. Everything that masks or slices structure (masks, surgery,
make_student, loading) goes through the helpers below, so adding a family is one table entry.

Encoder-decoder models use one flat block numbering: the encoder blocks first, then the decoder blocks (decoder block
``j`` is ``num_encoder_layers + j``).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_compress.models.discovery import discover
from hf_compress.models.sentence import is_sentence_transformer
from hf_compress.models.table import FAMILIES, REFUSED, Family  # the table is also read through this module

# A slice of structure: (module, parameter name, dimension, indices along that dimension).
Slice = tuple[nn.Module, str, int, torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a PEFT / DDP / compiled / sentence-transformers wrapper."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif is_sentence_transformer(model):
            model = model[0].auto_model  # SentenceTransformer: its first module holds the transformers model
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def get_family(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``: its table entry, else its discovered and verified structure.

    A model type missing from the table is handled when its blocks follow a common layout (see
    :mod:`hf_compress.models.discovery`); otherwise the one-sentence error lists the supported families and names what
    was not found.
    """
    config = getattr(unwrap(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise ValueError(
            f"`model` has model_type {model_type!r}, which hf_compress cannot prune or slice: {REFUSED[model_type]}."
        )
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if config is None:
        raise ValueError(
            f"`model` is a {type(model).__name__} without a transformers config; hf_compress cannot slice it."
        )
    return discover(unwrap(model))  # verified on copies, or a one-sentence error naming what was not found


def _has(root: nn.Module, path: str) -> bool:
    try:
        _get(root, path)
    except AttributeError:
        return False
    return True


def _get(root: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def stacks(model: nn.Module) -> list[tuple[Family, nn.ModuleList]]:
    """``(family entry, blocks)`` of each stack: one for encoders / decoders, encoder then decoder otherwise."""
    family = get_family(model)
    backbone = unwrap(model).base_model
    out = [(family, _get(backbone, family.layers))]
    if family.decoder is not None:
        out.append((family.decoder, _get(backbone, family.decoder.layers)))
    return out


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of ``model`` (any head, PEFT-wrapped or not), in the flat numbering.

    Encoder-decoder models number the encoder blocks first, then the decoder blocks: decoder block ``j`` is
    ``num_encoder_layers + j``. The list is then a new ``nn.ModuleList`` over both stacks (the blocks themselves, not
    copies), to read and hook; remove blocks with ``surgery.drop_layers``.
    """
    found = stacks(model)
    if len(found) == 1:
        return found[0][1]
    return nn.ModuleList([block for _, blocks in found for block in blocks])


def num_encoder_layers(model: nn.Module) -> int | None:
    """Number of encoder blocks of an encoder-decoder ``model`` (= first decoder block's flat index), or ``None``."""
    found = stacks(model)
    return len(found[0][1]) if len(found) == 2 else None


def locate(model: nn.Module, layer: int) -> tuple[Family, nn.Module, int]:
    """``(family entry, block, index within its stack)`` of flat block index ``layer``."""
    for family, blocks in stacks(model):
        if layer < len(blocks):
            return family, blocks[layer], layer
        layer -= len(blocks)
    raise IndexError(f"`layer` {layer} is past the last block of the model.")


def block_family(model: nn.Module, layer: int) -> Family:
    """The :class:`Family` entry describing block ``layer`` (the decoder entry for decoder blocks)."""
    return locate(model, layer)[0]


def block_module(model: nn.Module, layer: int, role: str) -> nn.Module | None:
    """The module playing ``role`` (``"q"``, ``"o"``, ``"up"``, ``"cross_o"``...) of block ``layer``."""
    family, block, _ = locate(model, layer)
    path = getattr(family, role)
    return None if path is None else _get(block, path)


def expert_module(model: nn.Module, layer: int) -> nn.Module | None:
    """The fused experts of block ``layer``; ``None`` for a dense block or family."""
    path = get_family(model).experts
    if path is None:
        return None
    try:
        return get_layers(model)[layer].get_submodule(path)
    except AttributeError:  # a dense block (`mlp_only_layers`, `decoder_sparse_step`)
        return None


def builds_experts(config, family: Family, layer: int) -> bool:
    """Whether transformers builds block ``layer`` of ``config`` with routed experts (Qwen MoE blocks can be dense)."""
    if family.experts is None or layer in (getattr(config, "mlp_only_layers", None) or []):
        return False
    return getattr(config, family.experts_config) > 0 and (layer + 1) % getattr(config, "decoder_sparse_step", 1) == 0


def num_experts(model: nn.Module, layer: int) -> int:
    """Number of routed experts of block ``layer`` (0 for a dense block), read from its weight shapes."""
    experts = expert_module(model, layer)
    return 0 if experts is None else experts.gate_up_proj.shape[0]


def _out_features(module: nn.Module, conv1d: bool) -> int:
    return module.weight.shape[1] if conv1d else module.weight.shape[0]


def _in_features(module: nn.Module, conv1d: bool) -> int:
    return module.weight.shape[0] if conv1d else module.weight.shape[1]


def _role(role: str, cross: bool) -> str:
    return f"cross_{role}" if cross else role


def _check_cross(model: nn.Module, layer: int, cross: bool) -> Family:
    family = block_family(model, layer)
    if cross and family.cross_attention is None:
        raise ValueError(
            f"`cross_heads` names layer {layer}, which has no cross-attention; cross-attention lives in the decoder "
            f"blocks, numbered from {num_encoder_layers(model)} on."
        )
    return family


def head_dim(model: nn.Module, layer: int, cross: bool = False) -> int:
    """Per-head width of the self- (or ``cross``-) attention of block ``layer``."""
    family = _check_cross(model, layer, cross)
    return int(getattr(block_module(model, layer, _role("attention", cross)), family.head_dim))


def head_counts(model: nn.Module, layer: int, cross: bool = False) -> tuple[int, int]:
    """``(num_query_heads, num_kv_heads)`` of block ``layer`` (its ``cross``-attention), read from weight shapes."""
    family = _check_cross(model, layer, cross)
    dim = head_dim(model, layer, cross)
    q = _in_features(block_module(model, layer, _role("o", cross)), family.conv1d) // dim
    if family.qkv is not None:  # [q][k][v]: the k and v parts share what q leaves
        return q, (_out_features(block_module(model, layer, "qkv"), family.conv1d) // dim - q) // 2
    return q, _out_features(block_module(model, layer, _role("k", cross)), family.conv1d) // dim


def ffn_size(model: nn.Module, layer: int) -> int:
    """Number of FFN neurons of block ``layer`` (of each of its experts in a mixture-of-experts block)."""
    experts = expert_module(model, layer)
    if experts is not None:
        return experts.down_proj.shape[2]
    family = block_family(model, layer)
    size = _out_features(block_module(model, layer, "up"), family.conv1d)
    return size // 2 if family.fused_gate_up else size


def _rows(module: nn.Module, conv1d: bool, index: torch.Tensor) -> list[Slice]:
    """Output units ``index`` of a projection: weight rows (columns for Conv1D) and bias entries."""
    out = [(module, "weight", 1 if conv1d else 0, index)]
    if getattr(module, "bias", None) is not None:
        out.append((module, "bias", 0, index))
    return out


def _cols(module: nn.Module, conv1d: bool, index: torch.Tensor) -> list[Slice]:
    """Input units ``index`` of a projection (its bias is untouched)."""
    return [(module, "weight", 0 if conv1d else 1, index)]


def _units(heads: list[int], dim: int, offset: int = 0) -> torch.Tensor:
    if not heads:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in sorted(heads)]) + offset


def kv_heads_for(model: nn.Module, layer: int, heads: list[int], cross: bool = False) -> list[int]:
    """KV heads that go with removing query ``heads`` of block ``layer`` (all of them without GQA).

    Under grouped-query attention every KV group must keep either none or the same number of its query heads, so
    ``num_attention_heads`` stays a multiple of ``num_key_value_heads``: remove whole groups (their KV head goes too),
    the same number of query heads from every group (the KV heads stay), or both. Anything else is an error.
    """
    refused = _check_cross(model, layer, cross).heads_refused
    if refused is not None:
        model_type = unwrap(model).config.model_type
        raise ValueError(f"`heads` cannot be removed from a {model_type!r} model: {refused}.")
    num_q, num_kv = head_counts(model, layer, cross)
    bad = [h for h in heads if not 0 <= h < num_q]
    if bad:
        raise ValueError(f"`heads[{layer}]` has head indices {bad} outside [0, {num_q}) for layer {layer}.")
    if num_q == num_kv:
        return sorted(set(heads))
    group = num_q // num_kv
    chosen = set(heads)
    kept = [group - len(chosen & set(range(g * group, (g + 1) * group))) for g in range(num_kv)]
    if len(set(kept) - {0}) > 1:
        raise ValueError(
            f"`heads[{layer}]` = {sorted(chosen)} splits the query groups of layer {layer} unevenly (query heads kept "
            f"per KV group: {kept}); with grouped-query attention remove whole groups of {group} query heads or the "
            "same number of query heads from every group."
        )
    return [g for g, count in enumerate(kept) if count == 0]


def head_slices(model: nn.Module, layer: int, heads: list[int], cross: bool = False) -> list[Slice]:
    """Every parameter slice that carries query ``heads`` of block ``layer`` (and their KV heads under GQA).

    ``cross=True`` addresses the cross-attention of a decoder block instead of its self-attention. Zeroing these
    slices silences the heads; keeping only the complement removes them physically.
    """
    family = _check_cross(model, layer, cross)
    dim = head_dim(model, layer, cross)
    kv = kv_heads_for(model, layer, heads, cross)
    out = _cols(block_module(model, layer, _role("o", cross)), family.conv1d, _units(heads, dim))
    if family.qkv is not None:
        num_q, num_kv = head_counts(model, layer)
        q_width, kv_width = num_q * dim, num_kv * dim
        parts = [_units(heads, dim), _units(kv, dim, q_width), _units(kv, dim, q_width + kv_width)]
        return _rows(block_module(model, layer, "qkv"), family.conv1d, torch.cat(parts)) + out
    out += _rows(block_module(model, layer, _role("q", cross)), family.conv1d, _units(heads, dim))
    if not cross:
        block = locate(model, layer)[1]
        for path in family.head_rows:
            if _has(block, path):
                out += _rows(_get(block, path), family.conv1d, _units(heads, dim))
    for role in ("k", "v"):
        out += _rows(block_module(model, layer, _role(role, cross)), family.conv1d, _units(kv, dim))
    return out


def neuron_slices(model: nn.Module, layer: int, neurons: list[int]) -> list[Slice]:
    """Every parameter slice that carries FFN ``neurons`` of block ``layer`` (up/gate rows, down columns).

    In a mixture-of-experts block these are the neurons of every expert: ``gate_up_proj`` rows ``n`` and
    ``ffn + n``, ``down_proj`` columns ``n`` (the fused tensors need one width for all experts of a block).
    """
    family = block_family(model, layer)
    size = ffn_size(model, layer)
    bad = [n for n in neurons if not 0 <= n < size]
    if bad:
        raise ValueError(f"`neurons[{layer}]` has indices {bad[:5]} outside [0, {size}) for layer {layer}.")
    index = torch.tensor(sorted(set(neurons)), dtype=torch.long)
    experts = expert_module(model, layer)
    if experts is not None:
        return [(experts, "gate_up_proj", 1, torch.cat([index, index + size])), (experts, "down_proj", 2, index)]
    up_index = torch.cat([index, index + size]) if family.fused_gate_up else index
    out = _rows(block_module(model, layer, "up"), family.conv1d, up_index)
    if family.gate is not None:
        out += _rows(block_module(model, layer, "gate"), family.conv1d, index)
    return out + _cols(block_module(model, layer, "down"), family.conv1d, index)
