"""Post-training int8 quantisation of Linear and Embedding layers for CPU inference, saved as plain safetensors.

:func:`quantize_int8` swaps ``nn.Linear`` / ``nn.Embedding`` modules for the int8 / int4 layers of
:mod:`hf_compress.quantization.layers` (which explains the formats and why they are our own). The codes and scales are
ordinary buffers, so ``model.save_pretrained(folder)`` writes a normal ``model.safetensors`` plus a
``hf_compress_quantization`` record in ``config.json``, and :func:`load_quantized` rebuilds the same modules from
that record.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

from torch import nn

from hf_compress.quantization.checks import check_not_quantized
from hf_compress.quantization.layers import (
    CLIP_RATIOS,
    COMPUTE_MODES,
    Compute,
    Int8Embedding,
    Int8Linear,
    _is_conv1d,
    quantize_groups,
    quantize_rows,
    unpack_int4,
)

__all__ = [
    "CLIP_RATIOS", "COMPUTE_MODES", "QUANTIZATION_KEY", "Int8Embedding", "Int8Linear", "is_quantized",
    "load_quantized", "model_size_bytes", "prepare_quantized_skeleton", "quantize_groups", "quantize_int8",
    "quantize_rows", "set_compute", "unpack_int4",
]  # fmt: skip

QUANTIZATION_KEY = "hf_compress_quantization"
FORMAT_VERSION = 1


def _kind(module: nn.Module) -> str | None:
    if type(module) is nn.Linear or _is_conv1d(module):
        return "linear"
    if type(module) is nn.Embedding:  # exact type: subclasses (e.g. scaled embeddings) change forward
        return "embedding"
    return None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_compute(compute: str) -> None:
    if compute not in COMPUTE_MODES:
        raise ValueError(f"`compute` must be one of {COMPUTE_MODES}, got {compute!r}.")


def quantize_int8(
    model: nn.Module,
    include_embeddings: bool = True,
    modules: list[str] | None = None,
    exclude: list[str] | None = None,
    compute: Compute = "dynamic",
    embedding_bits: int = 8,
    embedding_group_size: int | None = None,
) -> nn.Module:
    """Quantise ``model``'s Linear (and Embedding) layers to int8 in place, for CPU inference.

    Args:
        model (`nn.Module`): typically a `PreTrainedModel`; its config gets a ``hf_compress_quantization`` record so
            ``model.save_pretrained(folder)`` followed by :func:`load_quantized` restores it.
        include_embeddings (`bool`, *optional*, defaults to `True`): also quantise ``nn.Embedding`` tables per row.
        modules (`list[str]`, *optional*): ``fnmatch`` patterns of qualified module names to quantise; all eligible
            modules when `None`. Output layers tied to a quantised embedding are always quantised with it.
        exclude (`list[str]`, *optional*): ``fnmatch`` patterns of module names to leave in floating point.
        compute (`Literal["dynamic", "weight_only"]`, *optional*, defaults to `"dynamic"`): Linear kernel, see module
            docstring.
        embedding_bits (`int`, *optional*, defaults to 8): bits of the word-embedding table (the model's input
            embeddings, else its largest table): 8, or 4 for nibble-packed rows. Other tables (positions, token types:
            small and sensitive) stay int8.
        embedding_group_size (`int`, *optional*): columns sharing one fp16 scale and offset in a 4-bit table; must
            divide the embedding width. Defaults to 64 (or its greatest common divisor with the width).

    Example:

    ```python
    >>> from hf_compress.quantization.quantize import quantize_int8, model_size_bytes
    >>> before = model_size_bytes(model)
    >>> quantize_int8(model).save_pretrained("out/int8")
    ```
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch `nn.Module`, got {type(model).__name__}.")
    check_not_quantized(model)
    _check_compute(compute)
    if embedding_bits not in (4, 8):
        raise ValueError(f"`embedding_bits` must be 4 or 8, got {embedding_bits}.")
    if embedding_group_size is not None and (not isinstance(embedding_group_size, int) or embedding_group_size < 2
                                             or embedding_group_size % 2):  # fmt: skip
        raise ValueError(f"`embedding_group_size` must be an even integer >= 2, got {embedding_group_size!r}.")
    for arg, patterns in (("modules", modules), ("exclude", exclude)):
        if patterns is not None and (isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns)):
            raise TypeError(f"`{arg}` must be a list of name patterns, got {patterns!r}.")

    def wanted(name: str) -> bool:
        picked = modules is None or any(fnmatch.fnmatchcase(name, p) for p in modules)
        return picked and not any(fnmatch.fnmatchcase(name, p) for p in exclude or [])

    candidates = {name: (mod, _kind(mod)) for name, mod in model.named_modules() if _kind(mod)}
    chosen = {n for n, (_, kind) in candidates.items() if wanted(n) and (kind == "linear" or include_embeddings)}
    quantised_tables = {id(candidates[n][0].weight) for n in chosen if candidates[n][1] == "embedding"}
    chosen |= {n for n, (m, kind) in candidates.items() if kind == "linear" and id(m.weight) in quantised_tables}
    if not chosen:
        raise ValueError(f"`modules`={modules!r} / `exclude`={exclude!r} select no Linear or Embedding layer.")

    tables = {n: candidates[n][0] for n in chosen if candidates[n][1] == "embedding"}
    word = _word_embedding(model, tables) if embedding_bits == 4 else None
    if word is not None:
        width = tables[word].embedding_dim
        if embedding_group_size is None:
            embedding_group_size = math.gcd(width, 64)
        if width % embedding_group_size or embedding_group_size % 2:
            raise ValueError(
                f"`embedding_group_size` {embedding_group_size} does not evenly divide the width {width} "
                f"of `{word}` into even groups; pick an even divisor of {width}."
            )
    record, layouts = {}, {}
    for name in sorted(chosen):
        module, kind = candidates[name]
        if kind == "linear":
            _set_module(model, name, Int8Linear.from_float(module, compute=compute))
        else:
            layout = {"bits": 4, "group_size": embedding_group_size} if name == word else {"bits": 8}
            _set_module(model, name, Int8Embedding.from_float(module, **layout))
            layouts[name] = layout
        record[name] = kind
    config = getattr(model, "config", None)
    if config is not None:
        previous = getattr(config, QUANTIZATION_KEY, None) or {}
        setattr(
            config,
            QUANTIZATION_KEY,
            {
                "method": "hf_compress_int8",
                "format_version": FORMAT_VERSION,
                "compute": compute,
                "embedding_bits": embedding_bits,
                "modules": {**previous.get("modules", {}), **record},
                "embeddings": {**previous.get("embeddings", {}), **layouts},
            },
        )
    return model


def _word_embedding(model: nn.Module, tables: dict[str, nn.Embedding]) -> str | None:
    """Name (among ``tables``) of the model's input-embedding table, else of the largest table."""
    if not tables:
        return None
    getter = getattr(model, "get_input_embeddings", None)
    try:
        word = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        word = None
    named = [name for name, table in tables.items() if table is word]
    return named[0] if named else max(tables, key=lambda n: tables[n].weight.numel())


def is_quantized(config) -> bool:
    """Whether a transformers config (or the dict of a ``config.json``) carries a ``hf_compress`` int8 record."""
    record = config.get(QUANTIZATION_KEY) if isinstance(config, dict) else getattr(config, QUANTIZATION_KEY, None)
    return isinstance(record, dict) and record.get("method") == "hf_compress_int8"


def set_compute(model: nn.Module, compute: Compute) -> nn.Module:
    """Switch every :class:`Int8Linear` of ``model`` (and its config record) to another kernel."""
    _check_compute(compute)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.compute = compute
    record = getattr(getattr(model, "config", None), QUANTIZATION_KEY, None)
    if isinstance(record, dict):
        record["compute"] = compute
    return model


def prepare_quantized_skeleton(model: nn.Module, record: dict) -> nn.Module:
    """Replace the float modules named in ``record["modules"]`` with empty int8 modules of the same shapes."""
    bits = record.get("embedding_bits", 8)  # files without per-table layouts used it for every table, per row
    layouts = record.get("embeddings", {})
    for name, kind in record["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"Quantised module `{name}` from the record does not exist in the model.") from err
        if kind == "linear":
            out_f, in_f = module.weight.t().shape if _is_conv1d(module) else module.weight.shape
            new = Int8Linear(in_f, out_f, bias=module.bias is not None, compute=record.get("compute", "dynamic"))
        elif kind == "embedding":
            layout = layouts.get(name, {"bits": bits})
            new = Int8Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                bits=layout["bits"], group_size=layout.get("group_size"))  # fmt: skip
        else:
            raise ValueError(f"Module kind for `{name}` must be 'linear' or 'embedding', got {kind!r}.")
        _set_module(model, name, new)
    return model


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"`path` must be an existing model folder, got {str(path)!r}.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"`path` {str(path)!r} has no config.json; save the model with `save_pretrained`.")
    return json.loads((path / "config.json").read_text())


def _local_folder(path: str | Path, **hub_kwargs) -> Path:
    """``path`` itself when it is a folder (or clearly a local path), else a Hub snapshot of the repo ``path``."""
    local = Path(path)
    if local.is_dir() or local.is_absolute() or str(path).startswith((".", "~")):
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(path))
    except HFValidationError:
        return local
    return Path(snapshot_download(str(path), **hub_kwargs))


def load_quantized(
    path: str | Path, model: nn.Module | None = None, compute: Compute | None = None, **hub_kwargs
) -> nn.Module:
    """Reload a folder saved after :func:`quantize_int8`, in eval mode, with the same predictions as before saving.

    Args:
        path (`str` or `Path`): folder written by ``model.save_pretrained``, or a Hub repo id (downloaded with
            ``snapshot_download``, which gets ``hub_kwargs`` such as ``revision`` or ``token``).
        model (`nn.Module`, *optional*): a float skeleton to fill (e.g. a structurally pruned model built by
            ``hf_compress.loading``); by default ``config.architectures[0]`` is built from ``config.json``.
        compute (`Literal["dynamic", "weight_only"]`, *optional*): override the kernel recorded at save time.

    Example:

    ```python
    >>> from hf_compress.quantization.quantize import load_quantized
    >>> model = load_quantized("out/int8")
    ```
    """
    import transformers
    from safetensors.torch import load_file

    path = _local_folder(path, **hub_kwargs)
    raw = _read_config(path)
    if not is_quantized(raw):
        raise ValueError(f"`path` {str(path)!r} holds no `{QUANTIZATION_KEY}` record; load it with `from_pretrained`.")
    record = dict(raw[QUANTIZATION_KEY])
    if compute is not None:
        _check_compute(compute)
        record["compute"] = compute
    if model is None:
        config = transformers.AutoConfig.from_pretrained(path)
        architectures = config.architectures or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is None:
            raise ValueError(f"config.json `architectures` must name a transformers model class, got {architectures}.")
        model = cls(config)
    prepare_quantized_skeleton(model, record)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"`path` {str(path)!r} has no *.safetensors weights.")
    state = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"Weights in {str(path)!r} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    if getattr(model, "config", None) is not None:
        setattr(model.config, QUANTIZATION_KEY, record)
    return model.eval()


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers of ``model``, counting shared tensors once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch `nn.Module`, got {type(model).__name__}.")
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
