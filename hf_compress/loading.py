"""Save and reload compressed models: structurally pruned, int8 / 4-bit quantised, or both.

Surgery records each layer's shape in ``config.hf_compress["layers"]``. When every layer is alike and the family's
config can express it (layer count, FFN width, Llama-family head counts), plain ``AutoModel*.from_pretrained`` already
rebuilds the model. Otherwise (per-layer differences, fewer heads in BERT / RoBERTa / DistilBERT / GPT-2, whose head
width is ``hidden_size / num_heads``) the config keeps its original sizes, so plain loading stops with a size-mismatch
error, and :func:`from_pretrained` here builds the model from its config, slices each layer to the recorded shape and
loads the weights strictly.

Quantised folders (:func:`hf_compress.quantization.quantize.quantize_model`) carry a ``hf_compress_quantization``
record; :func:`from_pretrained` rebuilds their int8 / int4 modules (on top of the recorded per-layer shapes when the
model was also pruned) before loading the weights, so it is the one loader for every folder hf_compress writes.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig, revert_weight_conversion

from hf_compress.checks import check_model_path, readable_weights
from hf_compress.models.families import FAMILIES, get_family, unwrap
from hf_compress.models.hub_ids import hub_id
from hf_compress.pruning.experts import prune_expert_neurons, prune_experts
from hf_compress.pruning.hidden import resize_hidden
from hf_compress.pruning.surgery import layer_structure, prune_ffn_neurons, prune_heads, record_structure
from hf_compress.quantization.quantize import (
    QUANTIZATION_KEY,
    Compute,
    check_compute,
    is_quantized,
    prepare_quantized_skeleton,
)

_LOAD_KWARGS = ("dtype", "attn_implementation")  # what the structured path forwards to `_from_config`
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")  # for Hub repo ids


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
    """Every tensor of a folder's ``model.safetensors`` (or of the shards its index names)."""
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


def local_folder(path: str | os.PathLike, **hub_kwargs: Any) -> str:
    """``path`` when it is a local folder (or names a local path), else a Hub snapshot of the repo id ``path``.

    Args:
        path (`str` or `os.PathLike`): A folder, or a Hub repo id (downloaded with ``snapshot_download``).
        hub_kwargs: Forwarded to ``snapshot_download`` (`revision`, `token`, ...).
    """
    path = os.fspath(path)
    if os.path.isdir(path) or hub_id(path) is None:
        return path
    return snapshot_download(path, **hub_kwargs)


def _slice_to(model: nn.Module, recorded: list[dict[str, int]]) -> None:
    """Remove the trailing heads / neurons of each freshly built layer until it has the recorded shape."""
    built = layer_structure(model)
    if len(built) != len(recorded):
        raise ValueError(
            f"`config.hf_compress` records {len(recorded)} layers but `num_hidden_layers` builds {len(built)}; "
            "the config.json was edited by hand."
        )
    heads, neurons, experts, cross = {}, {}, {}, {}
    for layer, (have, want) in enumerate(zip(built, recorded)):
        group = have["num_heads"] // have["num_kv_heads"]
        kept = want["num_heads"] // max(want["num_kv_heads"], 1)  # query heads each kept KV group keeps
        if (
            have["head_dim"] != want["head_dim"]
            or want["num_heads"] != want["num_kv_heads"] * kept
            or want["num_kv_heads"] > have["num_kv_heads"]
            or kept > group
            or want["ffn"] > have["ffn"]
            or want.get("experts", 0) > have.get("experts", 0)
            or want.get("num_cross_heads", 0) > have.get("num_cross_heads", 0)
        ):
            raise ValueError(
                f"`config.hf_compress` records layer {layer} as {want}, which cannot be cut from the {have} that the "
                "config builds; the config.json was edited by hand."
            )
        # Trailing KV groups go whole, then the trailing query heads of every kept group.
        heads[layer] = [h for h in range(have["num_heads"]) if h // group >= want["num_kv_heads"] or h % group >= kept]
        neurons[layer] = list(range(want["ffn"], have["ffn"]))
        experts[layer] = list(range(want.get("experts", 0), have.get("experts", 0)))
        if "num_cross_heads" in want:
            cross[layer] = list(range(want["num_cross_heads"], have["num_cross_heads"]))
    prune_heads(model, heads, cross or None)
    if get_family(model).experts is None:
        prune_ffn_neurons(model, neurons)
    else:  # mixture of experts: expert counts, and the neurons of every expert
        prune_experts(model, experts)
        prune_expert_neurons(model, neurons)


def _wide_config(
    config: transformers.PretrainedConfig, recorded: list[dict[str, int]]
) -> transformers.PretrainedConfig | None:
    """A copy of ``config`` whose hidden size builds the recorded head width, or ``None`` when it already does.

    In families whose head width is ``hidden_size / num_heads`` (BERT, RoBERTa, DistilBERT, GPT-2 ...), removing
    hidden channels from a model with per-layer head counts leaves a config whose hidden size no longer divides into
    heads of the recorded width; the skeleton is then built ``head_dim * num_heads`` wide and cut back with
    :func:`~hf_compress.pruning.hidden.resize_hidden`. Decided from the config alone: the narrow config may not even
    build (BERT refuses a hidden size that is not a multiple of the head count).
    """
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None or family.config_head_dim or family.decoder is not None:
        return None
    heads = getattr(config, family.heads_config)
    dims = {entry["head_dim"] for entry in recorded}
    if len(dims) != 1 or config.hidden_size // heads == next(iter(dims)):
        return None
    wide = copy.deepcopy(config)
    wide.hidden_size = next(iter(dims)) * heads
    return wide


def _recorded_skeleton(build, config: transformers.PretrainedConfig, recorded: list[dict[str, int]], **kwargs: Any):
    """A freshly built model cut to the recorded per-layer shapes (and hidden size), ready for strict loading."""
    wide = _wide_config(config, recorded)
    # build at a hidden size giving the recorded head width, then cut the hidden channels
    model = build(config if wide is None else wide, **kwargs)
    get_family(model)  # recorded structure is only written for supported families
    _slice_to(model, recorded)
    if wide is not None:
        resize_hidden(model, config.hidden_size)
    return model


def needs_loader(config: dict) -> bool:
    """Whether a ``config.json`` dict can only be loaded by :func:`from_pretrained` (recorded shapes or int8)."""
    return is_quantized(config) or (config.get("hf_compress") or {}).get("layers") is not None


def from_pretrained(path: str | os.PathLike, trust_remote_code: bool = False, **kwargs: Any) -> nn.Module:
    """Load any folder hf_compress saved (pruned, layer-dropped, quantised, or plain), with identical logits.

    Quantised folders (:func:`hf_compress.quantization.quantize.quantize_model`) are rebuilt with their int8 / int4
    modules, on top of the recorded per-layer shapes when the model was also structurally pruned.

    Checkpoints pruned with transformers 4.x ``prune_heads`` (a ``config.pruned_heads`` entry, which transformers 5
    ignores) are rebuilt with those heads removed, so models pruned before the move to v5 keep loading.

    Folders whose config has no recorded structure (never pruned, or pruned without surgery) are handed to
    transformers' ``from_pretrained`` of the class in ``config.architectures``. Otherwise the model is built from its
    config, each layer is sliced to the recorded shape and the safetensors weights are loaded strictly: a missing,
    unexpected or mis-shaped tensor is an error, never a silent random init.

    Args:
        path (`str` or `os.PathLike`):
            A local folder written by `save_pretrained`, or a Hub repo id of one.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow modeling code shipped in the folder (`config.auto_map`).
        kwargs:
            For quantised folders only `compute` (`"dynamic"` or `"weight_only"`, overriding the saved kernel; others
            are ignored); for
            recorded folders only `dtype` and `attn_implementation`; otherwise forwarded to transformers. Hub options
            (`revision`, `token`, `cache_dir`, `local_files_only`, `force_download`) apply to every kind.

    Returns:
        The model in eval mode.

    Example:

    >>> import hf_compress
    >>> model = hf_compress.from_pretrained("pruned-model")  # doctest: +SKIP
    """
    path = os.fspath(path)
    check_model_path("path", path)
    hub = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **hub)
    cls = _model_class(config, trust_remote_code)
    recorded = (getattr(config, "hf_compress", None) or {}).get("layers")
    if is_quantized(config.to_dict()):
        build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
        skeleton = build(config) if recorded is None else _recorded_skeleton(build, config, recorded)
        with readable_weights("path", path):
            return load_quantized_weights(skeleton, local_folder(path, **hub), kwargs.get("compute"))
    legacy = _legacy_pruned_heads(config) if recorded is None else None
    if recorded is None and legacy is None:
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        with readable_weights("path", path):
            return cls.from_pretrained(path, **hub, **kwargs)
    unknown = sorted(set(kwargs) - set(_LOAD_KWARGS))
    if unknown:
        raise ValueError(f"`kwargs` has {unknown}, unsupported for a pruned folder; supported: {list(_LOAD_KWARGS)}.")
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
    if legacy is not None:
        model = build(config, **kwargs)
        get_family(model)  # recorded structure is only written for supported families
        prune_heads(model, legacy)  # a fresh model: the current head indices are the original ones
    else:
        model = _recorded_skeleton(build, config, recorded, **kwargs)
    folder = local_folder(path, **hub)
    _load_strict(model, _read_state_dict(folder), folder)
    return model.eval()


def _legacy_pruned_heads(config: transformers.PretrainedConfig) -> dict[int, list[int]] | None:
    """The ``pruned_heads`` that transformers 4.x ``prune_heads`` wrote to ``config.json`` (``None`` when empty).

    transformers 5 no longer reads it, so such a checkpoint has fewer heads than its config builds; the heads are
    original indices per layer, removed here from a freshly built model before the weights are loaded. The field is
    dropped from the config: the loaded model records its structure in ``config.hf_compress`` instead.
    """
    pruned = getattr(config, "pruned_heads", None)
    if hasattr(config, "pruned_heads"):
        delattr(config, "pruned_heads")
    if not pruned:
        return None
    if not isinstance(pruned, dict):
        raise ValueError(f"`config.pruned_heads` must map layer indices to head lists, got {pruned!r}.")
    return {int(layer): sorted(int(h) for h in heads) for layer, heads in pruned.items() if heads}


def _file_to_model_keys(model: nn.Module) -> dict[str, str]:
    """Checkpoint key -> parameter name, where ``save_pretrained`` writes legacy names (ViT, DeiT in transformers 5).

    The names ``save_pretrained`` would write come from transformers' own reverse conversion of the model's state
    dict; renamed tensors are the same objects, which pairs the two names.
    """
    state = model.state_dict()
    names = {id(tensor): name for name, tensor in state.items()}
    reverted = revert_weight_conversion(model, dict(state))
    pairs = ((key, names.get(id(tensor))) for key, tensor in reverted.items())
    return {key: name for key, name in pairs if name is not None and name != key}


def _quantized_config(folder: str) -> dict:
    """The ``config.json`` dict of a quantised folder; a one-sentence error for anything else."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"`path` must be an existing model folder, got {folder!r}.")
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"`path` {folder!r} has no config.json; save the model with `save_pretrained`.")
    raw = json.loads(config_file.read_text())
    if not is_quantized(raw):
        raise ValueError(f"`path` {folder!r} holds no `{QUANTIZATION_KEY}` record; load it with `from_pretrained`.")
    return raw


def load_quantized_weights(model: nn.Module, folder: str | os.PathLike, compute: Compute | None = None) -> nn.Module:
    """Swap the float modules of ``model`` named in ``folder``'s quantisation record for int8 / int4 ones, load the
    folder's weights into them, and return the model in eval mode.

    Args:
        model (`nn.Module`): A float skeleton of the saved model (built from its config, sliced when it was pruned).
        folder (`str` or `os.PathLike`): A local folder saved after `quantize_model`.
        compute (`Literal["dynamic", "weight_only"]`, *optional*): Override the kernel recorded at save time.
    """
    folder = os.fspath(folder)
    raw = _quantized_config(folder)
    record = dict(raw[QUANTIZATION_KEY])
    if compute is not None:
        check_compute(compute)
        record["compute"] = compute
    prepare_quantized_skeleton(model, record)
    missing, unexpected = model.load_state_dict(_read_state_dict(folder), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"Weights in {folder!r} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    if getattr(model, "config", None) is not None:
        setattr(model.config, QUANTIZATION_KEY, record)
    return model.eval()


def load_quantized(
    path: str | os.PathLike, model: nn.Module | None = None, compute: Compute | None = None, **hub_kwargs: Any
) -> nn.Module:
    """Deprecated: use :func:`from_pretrained`, which loads quantised folders (and Hub repos of them) itself.

    Args:
        path (`str` or `os.PathLike`): A folder saved after `quantize_model`, or a Hub repo id of one.
        model (`nn.Module`, *optional*): A float skeleton to fill instead of the one built from ``config.json``.
        compute (`Literal["dynamic", "weight_only"]`, *optional*): Override the kernel recorded at save time.
        hub_kwargs: Forwarded to ``snapshot_download`` for a Hub repo id (`revision`, `token`, ...).
    """
    warnings.warn(
        "`load_quantized` is deprecated; use `hf_compress.from_pretrained`, which loads quantised folders.",
        DeprecationWarning,
        stacklevel=2,
    )
    folder = local_folder(path, **hub_kwargs)
    _quantized_config(folder)
    if model is None:
        return from_pretrained(folder, **({} if compute is None else {"compute": compute}))
    return load_quantized_weights(model, folder, compute)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    renamed = _file_to_model_keys(model)
    state = {renamed.get(key, key): tensor for key, tensor in state.items()}
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if any(not isinstance(c, PrefixChange) for c in get_model_conversion_mapping(model, add_legacy=False)):
        # transformers saves these weights in the checkpoint layout (MoE experts one by one) and converts on load
        load = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model))
        info, _ = convert_and_load_state_dict_in_model(model, state, load)
        missing, unexpected = sorted(info.missing_keys - tied), sorted(info.unexpected_keys)
        wrong = sorted(key for key, _, _ in info.mismatched_keys)
        state = {}  # already loaded
    else:
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
