"""Save and reload structurally pruned models.

Surgery records each layer's shape in ``config.hf_compress["layers"]``. When every layer is alike and the family's
config can express it (layer count, FFN width, Llama-family head counts), plain ``AutoModel*.from_pretrained`` already
rebuilds the model. Otherwise (per-layer differences, fewer heads in BERT / RoBERTa / DistilBERT / GPT-2, whose head
width is ``hidden_size / num_heads``) the config keeps its original sizes, so plain loading stops with a size-mismatch
error, and :func:`from_pretrained` here builds the model from its config, slices each layer to the recorded shape and
loads the weights strictly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from hf_compress.checks import check_model_path, readable_weights
from hf_compress.models.families import get_family, unwrap
from hf_compress.pruning.surgery import layer_structure, prune_ffn_neurons, prune_heads, record_structure

_LOAD_KWARGS = ("dtype", "attn_implementation")  # what the structured path forwards to `_from_config`


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Record the per-layer structure of ``model`` in its config, then call ``model.save_pretrained``.

    Surgery already records the structure; this helper also covers shapes changed by hand and wrapped models.

    Args:
        model (`PreTrainedModel`):
            The (possibly pruned) model; PEFT / DDP / compiled wrappers are unwrapped, adapters should be merged first.
        save_directory (`str` or `os.PathLike`):
            Output folder.
        kwargs:
            Forwarded to `PreTrainedModel.save_pretrained` (e.g. `max_shard_size`).

    Example:

    >>> from hf_compress.loading import save_pretrained
    >>> save_pretrained(model, "pruned-model")  # doctest: +SKIP
    """
    inner = unwrap(model)
    record_structure(inner)
    inner.save_pretrained(save_directory, **kwargs)


def _model_class(config: transformers.PretrainedConfig, trust_remote_code: bool) -> type:
    names = getattr(config, "architectures", None) or []
    if not names:
        raise ValueError("`config.architectures` is empty, so the model class is unknown; save with save_pretrained.")
    name = names[0]
    if hasattr(transformers, name):
        return getattr(transformers, name)
    auto_map = getattr(config, "auto_map", None) or {}
    auto_name = next((auto for auto, ref in auto_map.items() if ref.rpartition(".")[2] == name), None)
    if trust_remote_code and auto_name is not None:
        return getattr(transformers, auto_name)
    raise ValueError(
        f"`config.architectures` names {name!r}, which transformers does not define; pass `trust_remote_code=True` "
        "if the folder ships its modeling code."
    )


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"`path` {path!r} has no model.safetensors (or index); save with `save_pretrained`.")
    state = {}
    for name in files:
        with readable_weights("path", os.path.join(path, name)):
            state.update(load_file(os.path.join(path, name)))
    return state


def _slice_to(model: nn.Module, recorded: list[dict[str, int]]) -> None:
    """Remove the trailing heads / neurons of each freshly built layer until it has the recorded shape."""
    built = layer_structure(model)
    if len(built) != len(recorded):
        raise ValueError(
            f"`config.hf_compress` records {len(recorded)} layers but `num_hidden_layers` builds {len(built)}; "
            "the config.json was edited by hand."
        )
    heads, neurons = {}, {}
    for layer, (have, want) in enumerate(zip(built, recorded)):
        group = have["num_heads"] // have["num_kv_heads"]
        if (
            have["head_dim"] != want["head_dim"]
            or want["num_heads"] != want["num_kv_heads"] * group
            or want["num_kv_heads"] > have["num_kv_heads"]
            or want["ffn"] > have["ffn"]
        ):
            raise ValueError(
                f"`config.hf_compress` records layer {layer} as {want}, which cannot be cut from the {have} that the "
                "config builds; the config.json was edited by hand."
            )
        heads[layer] = list(range(want["num_heads"], have["num_heads"]))
        neurons[layer] = list(range(want["ffn"], have["ffn"]))
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)


def needs_loader(config: dict) -> bool:
    """Whether a ``config.json`` dict can only be loaded by :func:`from_pretrained` (recorded shapes or int8)."""
    from hf_compress.quantization.quantize import is_quantized

    return is_quantized(config) or (config.get("hf_compress") or {}).get("layers") is not None


def from_pretrained(path: str | os.PathLike, trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """Load any folder hf_compress saved (pruned, layer-dropped, int8, or plain), with identical logits.

    Int8 folders (:func:`hf_compress.quantization.quantize_int8`) are rebuilt with their quantised modules, on top of
    the recorded per-layer shapes when the model was also structurally pruned.

    Folders whose config has no recorded structure (never pruned, or pruned without surgery) are handed to
    transformers' ``from_pretrained`` of the class in ``config.architectures``. Otherwise the model is built from its
    config, each layer is sliced to the recorded shape and the safetensors weights are loaded strictly: a missing,
    unexpected or mis-shaped tensor is an error, never a silent random init.

    Args:
        path (`str` or `os.PathLike`):
            A local folder written by `save_pretrained`.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow modeling code shipped in the folder (`config.auto_map`).
        kwargs:
            For recorded folders only `dtype` and `attn_implementation`; otherwise forwarded to transformers.

    Returns:
        The model in eval mode.

    Example:

    >>> import hf_compress
    >>> model = hf_compress.from_pretrained("pruned-model")  # doctest: +SKIP
    """
    from hf_compress.quantization.quantize import is_quantized, load_quantized

    path = os.fspath(path)
    check_model_path("path", path)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = _model_class(config, trust_remote_code)
    recorded = (getattr(config, "hf_compress", None) or {}).get("layers")
    if is_quantized(config.to_dict()):
        skeleton = None
        if recorded is not None:
            skeleton = (cls.from_config if cls.__name__.startswith("Auto") else cls._from_config)(config)
            _slice_to(skeleton, recorded)
        with readable_weights("path", path):
            return load_quantized(path, model=skeleton, **{k: v for k, v in kwargs.items() if k == "compute"})
    if recorded is None:
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        with readable_weights("path", path):
            return cls.from_pretrained(path, **kwargs)
    unknown = sorted(set(kwargs) - set(_LOAD_KWARGS))
    if unknown:
        raise ValueError(f"`kwargs` has {unknown}, unsupported for a pruned folder; supported: {list(_LOAD_KWARGS)}.")
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
    model = build(config, **kwargs)
    get_family(model)  # recorded structure is only written for supported families
    _slice_to(model, recorded)
    _load_strict(model, _read_state_dict(path), path)
    return model.eval()


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"`path` {path!r} does not match its recorded structure (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, mis-shaped {wrong[:3]}); re-save it with `hf_compress.loading.save_pretrained`."
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()
