"""Structure discovery for model types missing from the family table, verified before use.

A model whose blocks follow a common layout (an ``nn.ModuleList`` of identical blocks; an attention module with
q/k/v/o projections or a fused ``[q][k][v]`` projection and a per-head width attribute; an FFN with up (+ gate) /
down projections) gets a :class:`Family` built from the names found. Before it is used, it is verified on copies of
the model: removing head 0 of the first block must equal zeroing that head's output-projection columns, and removing
FFN neuron 0 must equal zeroing its down-projection column, within fp32 tolerance. Anything not found, or a check
that fails, is a one-sentence error naming it. Verified families are kept in :data:`DISCOVERED` (per model type).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hf_compress.models.table import FAMILIES, HEAD_ATTRIBUTES, Family

DISCOVERED: dict[str, Family] = {}

# Common names of each role, as children of the attention / FFN module.
_Q = ("q_proj", "query", "q", "q_lin", "query_proj", "wq")
_K = ("k_proj", "key", "k", "k_lin", "key_proj", "wk")
_V = ("v_proj", "value", "v", "v_lin", "value_proj", "wv")
_O = ("o_proj", "out_proj", "o", "out_lin", "wo", "dense", "c_proj")
_QKV = ("qkv_proj", "c_attn", "Wqkv", "qkv")
_UP = ("up_proj", "fc1", "c_fc", "w1", "lin1", "fc_in")
_GATE = ("gate_proj", "w3")
_DOWN = ("down_proj", "fc2", "c_proj", "w2", "lin2", "fc_out")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size", "d_head")
_FFN_CONFIG = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "hidden_dim", "encoder_ffn_dim")


def _child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Linear)), None)


def _blocks(backbone: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ``nn.ModuleList`` of identical blocks that hold ``nn.Linear`` layers."""
    found = [
        (name, module)
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(block) for block in module}) == 1
        and any(isinstance(m, nn.Linear) for m in module[0].modules())
    ]
    return max(found, key=lambda item: len(item[1]), default=None)


def _attention(block: nn.Module) -> dict[str, str] | None:
    for path, module in block.named_modules():
        dim = next((n for n in _HEAD_DIM if isinstance(getattr(module, n, None), int)), None)
        o = _child(module, _O)
        if dim is None or o is None:
            continue
        roles = {"attention": path, "head_dim": dim, "o": f"{path}.{o}".lstrip(".")}
        qkv = _child(module, _QKV)
        q, k, v = _child(module, _Q), _child(module, _K), _child(module, _V)
        if q and k and v:
            return roles | {role: f"{path}.{name}".lstrip(".") for role, name in (("q", q), ("k", k), ("v", v))}
        if qkv:
            return roles | {"qkv": f"{path}.{qkv}".lstrip(".")}
    return None


def _ffn(block: nn.Module, attention: str) -> dict[str, str] | None:
    for path, module in block.named_modules():
        if attention and (path == attention or path.startswith(f"{attention}.")):
            continue
        up, down = _child(module, _UP), _child(module, _DOWN)
        if up and down and up != down:
            roles = {"up": f"{path}.{up}".lstrip("."), "down": f"{path}.{down}".lstrip(".")}
            gate = _child(module, _GATE)
            return roles | ({"gate": f"{path}.{gate}".lstrip(".")} if gate else {})
    return None


def _fail(model_type: str, what: str) -> ValueError:
    return ValueError(
        f"`model` has model_type {model_type!r}, which hf_compress cannot prune or slice: it is not among the "
        f"supported families ({', '.join(sorted(FAMILIES))}) and structure discovery found {what}."
    )


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _keep(module: nn.Linear, dim: int, drop: torch.Tensor) -> None:
    keep = torch.ones(module.weight.shape[dim], dtype=torch.bool)
    keep[drop] = False
    index = keep.nonzero().flatten()
    module.weight = nn.Parameter(module.weight.detach().index_select(dim, index))
    if dim == 0 and module.bias is not None:
        module.bias = nn.Parameter(module.bias.detach()[index])
    module.out_features, module.in_features = module.weight.shape


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if getattr(out, "logits", None) is not None else out[0]).float()


def _verify(model: nn.Module, family: Family, inputs: dict) -> str | None:
    """``None`` when removing head 0 / neuron 0 of block 0 equals zeroing them, else what failed."""
    reference, pruned = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    block_ref = _get(reference.base_model, family.layers)[0]
    block = _get(pruned.base_model, family.layers)[0]
    attention = _get(block, family.attention)
    dim = int(getattr(attention, family.head_dim))
    o = _get(block, family.o)
    heads = o.in_features // dim
    if heads < 2:
        return "a single attention head, too few to check head removal"
    head0 = torch.arange(dim)
    with torch.no_grad():
        _get(block_ref, family.o).weight[:, head0] = 0
    if family.qkv is not None:
        width = _get(block, family.qkv).out_features // 3
        _keep(_get(block, family.qkv), 0, torch.cat([head0, head0 + width, head0 + 2 * width]))
        kv_heads = heads
    else:
        kv_heads = _get(block, family.k).out_features // dim
        group = heads // max(kv_heads, 1)
        _keep(_get(block, family.q), 0, torch.arange(group * dim))
        _keep(o, 1, torch.arange(group * dim))
        with torch.no_grad():
            _get(block_ref, family.o).weight[:, : group * dim] = 0
        for role in ("k", "v"):
            _keep(_get(block, getattr(family, role)), 0, head0)
        heads -= group
        kv_heads -= 1
    if family.qkv is not None:
        _keep(o, 1, head0)
        heads -= 1
        kv_heads -= 1
    values = {"heads": heads, "kv_heads": kv_heads, "groups": heads // max(kv_heads, 1), "width": heads * dim}
    for attribute, kind in HEAD_ATTRIBUTES.items():
        if isinstance(getattr(attention, attribute, None), int):
            setattr(attention, attribute, values[kind])
    try:
        same = torch.allclose(_output(pruned, inputs), _output(reference, inputs), atol=1e-4, rtol=1e-4)
    except RuntimeError:  # shapes the module cannot run with: its forward reads the head count elsewhere
        same = False
    if not same:
        return f"attention {family.attention!r} whose head removal does not equal zeroing the head"
    reference, pruned = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    block_ref, block = (_get(m.base_model, family.layers)[0] for m in (reference, pruned))
    with torch.no_grad():
        _get(block_ref, family.down).weight[:, 0] = 0
    for role in ("up", "gate"):
        if getattr(family, role) is not None:
            _keep(_get(block, getattr(family, role)), 0, torch.tensor([0]))
    _keep(_get(block, family.down), 1, torch.tensor([0]))
    if not torch.allclose(_output(pruned, inputs), _output(reference, inputs), atol=1e-4, rtol=1e-4):
        return f"an FFN ({family.up!r} / {family.down!r}) whose neuron removal does not equal zeroing the neuron"
    return None


def discover(model: nn.Module) -> Family:
    """The verified :class:`Family` of a ``model`` whose type is not in the table, or a one-sentence error.

    Args:
        model (`PreTrainedModel`): The (unwrapped) model; it is not modified (checks run on copies).
    """
    config = model.config
    model_type = config.model_type
    if model_type in DISCOVERED:
        return DISCOVERED[model_type]
    backbone = model.base_model
    found = _blocks(backbone)
    if found is None:
        raise _fail(model_type, "no nn.ModuleList of identical blocks holding nn.Linear layers")
    path, blocks = found
    attention = _attention(blocks[0])
    if attention is None:
        raise _fail(model_type, f"no attention module with q/k/v/o or fused qkv projections in {path}[0]")
    ffn = _ffn(blocks[0], attention["attention"])
    if ffn is None:
        raise _fail(model_type, f"no FFN with up (+ gate) / down projections in {path}[0]")
    width = _get(blocks[0], ffn["up"]).out_features
    ffn_config = next((n for n in _FFN_CONFIG if getattr(config, n, None) == width), None)
    if ffn_config is None:
        raise _fail(model_type, f"no config field holding its FFN width {width} (tried {', '.join(_FFN_CONFIG)})")
    causal = any(isinstance(getattr(m, "layer_idx", None), int) for m in blocks[0].modules())
    family = Family(layers=path, ffn_config=ffn_config, causal_cache=causal, **attention, **ffn)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise _fail(model_type, "no `vocab_size` in its config to build the verification inputs")
    ids = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    problem = _verify(model, family, {"input_ids": ids.to(next(model.parameters()).device)})
    if problem is not None:
        raise _fail(model_type, problem)
    DISCOVERED[model_type] = family
    return family
