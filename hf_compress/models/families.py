"""Where attention heads, FFN neurons and blocks live in each supported model family.

One plain dict, ``FAMILIES``, maps a ``config.model_type`` to the attribute paths of its blocks and projections.
Everything that masks or slices structure (masks, surgery, make_student) goes through the helpers below, so adding
a family is one dict entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """Attribute paths of one model family. Block-relative paths are dotted, ``None`` when absent."""

    layers: str  # path from the backbone (``model.base_model``) to the ``nn.ModuleList`` of blocks
    o: str  # attention output projection
    up: str  # FFN input projection (rows = neurons)
    down: str  # FFN output projection (columns = neurons)
    head_dim: str  # attribute on the attention module holding the per-head width
    attention: str  # the attention module (owner of the head-count attributes)
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused q/k/v projection (GPT-2 ``c_attn``)
    gate: str | None = None  # gated FFNs (Llama family)
    ffn_config: str = "intermediate_size"  # config field holding the FFN width
    conv1d: bool = False  # weights stored as [in, out] (transformers ``Conv1D``)
    causal_cache: bool = False  # blocks carry a ``layer_idx`` used by the KV cache
    config_head_dim: bool = False  # the config stores ``head_dim``, so fewer heads per layer are expressible
    # Mixture of experts: in a sparse block the FFN neurons are those of the routed experts (``ffn_config`` is their
    # width, the same for every expert of a block); ``up`` / ``gate`` / ``down`` then name a dense block's MLP.
    experts: str | None = None  # fused experts: ``gate_up_proj`` [experts, 2 * ffn, hidden], ``down_proj`` [.., ffn]
    router: str | None = None  # the experts' router: ``weight`` [experts, hidden] and ``top_k``
    experts_config: str | None = None  # config field holding the number of experts per block


_BERT = Family(
    layers="encoder.layer",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    up="intermediate.dense",
    down="output.dense",
    attention="attention.self",
    head_dim="attention_head_size",
)
_LLAMA = Family(
    layers="layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    attention="self_attn",
    head_dim="head_dim",
    causal_cache=True,
    config_head_dim=True,
)

# Mixture of experts (transformers 5 fuses each block's experts into 3-D tensors).
_MOE = Family(
    layers="layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
    attention="self_attn",
    head_dim="head_dim",
    ffn_config="moe_intermediate_size",
    causal_cache=True,
    config_head_dim=True,
    experts="mlp.experts",
    router="mlp.gate",
    experts_config="num_experts",
)

FAMILIES: dict[str, Family] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": Family(
        layers="transformer.layer",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        up="ffn.lin1",
        down="ffn.lin2",
        attention="attention",
        head_dim="attention_head_size",
        ffn_config="hidden_dim",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": Family(
        layers="h",
        qkv="attn.c_attn",
        o="attn.c_proj",
        up="mlp.c_fc",
        down="mlp.c_proj",
        attention="attn",
        head_dim="head_dim",
        ffn_config="n_inner",
        conv1d=True,
        causal_cache=True,
    ),
    "qwen2_moe": _MOE,  # its shared expert (``mlp.shared_expert``) is kept whole
    "qwen3_moe": _MOE,
    "mixtral": dataclasses.replace(_MOE, ffn_config="intermediate_size", experts_config="num_local_experts"),
}

# A slice of structure: (module, parameter name, dimension, indices along that dimension).
Slice = tuple[nn.Module, str, int, torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a PEFT / DDP / compiled / sentence-transformers wrapper."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(model, nn.Sequential) and len(model) and hasattr(model[0], "auto_model"):
            model = model[0].auto_model  # SentenceTransformer: its first module holds the transformers model
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def get_family(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``, or a one-sentence error listing the supported ones."""
    config = getattr(unwrap(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"`model` has model_type {model_type!r}, which hf_compress cannot prune or slice; "
            f"supported families: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[model_type]


def _get(root: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks of ``model`` (any head, PEFT-wrapped or not)."""
    family = get_family(model)
    return _get(unwrap(model).base_model, family.layers)


def block_module(model: nn.Module, layer: int, role: str) -> nn.Module | None:
    """The module playing ``role`` (``"q"``, ``"o"``, ``"up"``, ``"attention"`` ...) in block ``layer``."""
    path = getattr(get_family(model), role)
    return None if path is None else _get(get_layers(model)[layer], path)


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


def head_dim(model: nn.Module, layer: int) -> int:
    family = get_family(model)
    return int(getattr(block_module(model, layer, "attention"), family.head_dim))


def head_counts(model: nn.Module, layer: int) -> tuple[int, int]:
    """``(num_query_heads, num_kv_heads)`` of block ``layer``, read from its current weight shapes."""
    family = get_family(model)
    dim = head_dim(model, layer)
    if family.qkv is not None:
        heads = _out_features(block_module(model, layer, "qkv"), family.conv1d) // (3 * dim)
        return heads, heads
    q = _out_features(block_module(model, layer, "q"), family.conv1d) // dim
    kv = _out_features(block_module(model, layer, "k"), family.conv1d) // dim
    return q, kv


def ffn_size(model: nn.Module, layer: int) -> int:
    """Number of FFN neurons of block ``layer`` (of each of its experts in a mixture-of-experts block)."""
    experts = expert_module(model, layer)
    if experts is not None:
        return experts.down_proj.shape[2]
    return _out_features(block_module(model, layer, "up"), get_family(model).conv1d)


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


def kv_heads_for(model: nn.Module, layer: int, heads: list[int]) -> list[int]:
    """KV heads that go with query ``heads`` (GQA: only whole query groups; a partial group is an error)."""
    num_q, num_kv = head_counts(model, layer)
    bad = [h for h in heads if not 0 <= h < num_q]
    if bad:
        raise ValueError(f"`heads[{layer}]` has head indices {bad} outside [0, {num_q}) for layer {layer}.")
    if num_q == num_kv:
        return sorted(set(heads))
    group = num_q // num_kv
    chosen = set(heads)
    kv = []
    for g in range(num_kv):
        members = set(range(g * group, (g + 1) * group))
        if members & chosen and not members <= chosen:
            raise ValueError(
                f"`heads[{layer}]` = {sorted(chosen)} splits the query group {sorted(members)} of KV head {g}; "
                f"with grouped-query attention remove whole groups of {group} query heads."
            )
        if members <= chosen:
            kv.append(g)
    return kv


def head_slices(model: nn.Module, layer: int, heads: list[int]) -> list[Slice]:
    """Every parameter slice that carries query ``heads`` of block ``layer`` (and their KV heads under GQA).

    Zeroing these slices silences the heads; keeping only the complement removes them physically.
    """
    family = get_family(model)
    dim = head_dim(model, layer)
    kv = kv_heads_for(model, layer, heads)
    o = block_module(model, layer, "o")
    out = _cols(o, family.conv1d, _units(heads, dim))
    if family.qkv is not None:
        num_q, _ = head_counts(model, layer)
        width = num_q * dim
        index = torch.cat([_units(heads, dim, offset=i * width) for i in range(3)])
        return _rows(block_module(model, layer, "qkv"), family.conv1d, index) + out
    out += _rows(block_module(model, layer, "q"), family.conv1d, _units(heads, dim))
    for role in ("k", "v"):
        out += _rows(block_module(model, layer, role), family.conv1d, _units(kv, dim))
    return out


def neuron_slices(model: nn.Module, layer: int, neurons: list[int]) -> list[Slice]:
    """Every parameter slice that carries FFN ``neurons`` of block ``layer`` (up/gate rows, down columns).

    In a mixture-of-experts block these are the neurons of every expert: ``gate_up_proj`` rows ``n`` and
    ``ffn + n``, ``down_proj`` columns ``n`` (the fused tensors need one width for all experts of a block).
    """
    family = get_family(model)
    size = ffn_size(model, layer)
    bad = [n for n in neurons if not 0 <= n < size]
    if bad:
        raise ValueError(f"`neurons[{layer}]` has indices {bad[:5]} outside [0, {size}) for layer {layer}.")
    index = torch.tensor(sorted(set(neurons)), dtype=torch.long)
    experts = expert_module(model, layer)
    if experts is not None:
        return [(experts, "gate_up_proj", 1, torch.cat([index, index + size])), (experts, "down_proj", 2, index)]
    out = _rows(block_module(model, layer, "up"), family.conv1d, index)
    if family.gate is not None:
        out += _rows(block_module(model, layer, "gate"), family.conv1d, index)
    return out + _cols(block_module(model, layer, "down"), family.conv1d, index)
