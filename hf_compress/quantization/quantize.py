"""Post-training quantisation for CPU inference: int8 Linear layers, int8 or 4-bit embeddings, plain safetensors.

:func:`quantize_model` swaps ``nn.Linear`` / ``nn.Embedding`` modules for the int8 / int4 layers of
:mod:`hf_compress.quantization.layers` (which explains the formats and why they are our own). The codes and scales are
ordinary buffers, so ``model.save_pretrained(folder)`` writes a normal ``model.safetensors`` plus a
``hf_compress_quantization`` record in ``config.json``; :func:`hf_compress.from_pretrained` reads that record and
rebuilds the same modules with :func:`prepare_quantized_skeleton` before loading the weights.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import warnings

from torch import nn

from hf_compress.quantization.checks import check_not_quantized
from hf_compress.quantization.layers import (
    CLIP_RATIOS,
    COMPUTE_MODES,
    Compute,
    Int8Embedding,
    Int8Linear,
    check_group_size,
    is_conv1d,
    quantize_groups,
    quantize_rows,
    unpack_int4,
)

__all__ = [
    "CLIP_RATIOS", "COMPUTE_MODES", "QUANTIZATION_KEY", "Int8Embedding", "Int8Linear", "check_compute",
    "is_quantized", "prepare_quantized_skeleton", "quantize_groups", "quantize_int8", "quantize_model",
    "quantize_rows", "set_compute", "unpack_int4",
]  # fmt: skip

QUANTIZATION_KEY = "hf_compress_quantization"
FORMAT_VERSION = 1


def _kind(module: nn.Module) -> str | None:
    if type(module) is nn.Linear or is_conv1d(module):
        return "linear"
    if type(module) is nn.Embedding:  # exact type: subclasses (e.g. scaled embeddings) change forward
        return "embedding"
    return None


def check_compute(compute: str) -> None:
    """Raise a `ValueError` unless `compute` is one of `COMPUTE_MODES`."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"`compute` must be one of {COMPUTE_MODES}, got {compute!r}.")


def quantize_model(
    model: nn.Module,
    include_embeddings: bool = True,
    modules: list[str] | None = None,
    exclude: list[str] | None = None,
    compute: Compute = "dynamic",
    embedding_bits: int = 8,
    embedding_group_size: int | None = None,
) -> nn.Module:
    """Quantise ``model`` in place for CPU inference: Linear layers to int8, Embedding tables to int8 (or the word
    embeddings to 4 bits).

    Args:
        model (`nn.Module`): typically a `PreTrainedModel`; its config gets a ``hf_compress_quantization`` record so
            ``model.save_pretrained(folder)`` followed by :func:`hf_compress.from_pretrained` restores it.
        include_embeddings (`bool`, *optional*, defaults to `True`): also quantise ``nn.Embedding`` tables per row.
        modules (`list[str]`, *optional*): ``fnmatch`` patterns of qualified module names to quantise; all eligible
            modules when `None`. Output layers tied to a quantised embedding are always quantised with it.
        exclude (`list[str]`, *optional*): ``fnmatch`` patterns of module names to leave in floating point.
        compute (`Literal["dynamic", "weight_only"]`, *optional*, defaults to `"dynamic"`): Linear kernel, see
            :mod:`hf_compress.quantization.layers`.
        embedding_bits (`int`, *optional*, defaults to 8): bits of the word-embedding table (the model's input
            embeddings, else its largest table): 8, or 4 for nibble-packed rows. Other tables (positions, token types:
            small and sensitive) stay int8.
        embedding_group_size (`int`, *optional*): columns sharing one fp16 scale and offset in a 4-bit table; must
            divide the embedding width. Defaults to 64 (or its greatest common divisor with the width).

    Example:

    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_compress.quantization.quantize import quantize_model
    >>> from hf_compress.reporting.measure import model_size_bytes
    >>> config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                     intermediate_size=32)
    >>> model = BertForSequenceClassification(config)
    >>> before = model_size_bytes(model)
    >>> quantize_model(model, embedding_bits=4, embedding_group_size=16).bert.embeddings.word_embeddings.bits
    4
    >>> model_size_bytes(model) < before / 3
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch `nn.Module`, got {type(model).__name__}.")
    check_not_quantized(model)
    check_compute(compute)
    if embedding_bits not in (4, 8):
        raise ValueError(f"`embedding_bits` must be 4 or 8, got {embedding_bits}.")
    if embedding_group_size is not None:
        check_group_size(embedding_group_size, name="embedding_group_size")
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
        check_group_size(embedding_group_size, width, name="embedding_group_size")
    record, layouts = {}, {}
    for name in sorted(chosen):
        module, kind = candidates[name]
        if kind == "linear":
            model.set_submodule(name, Int8Linear.from_float(module, compute=compute))
        else:
            layout = {"bits": 4, "group_size": embedding_group_size} if name == word else {"bits": 8}
            model.set_submodule(name, Int8Embedding.from_float(module, **layout))
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


@functools.wraps(quantize_model, assigned=("__module__",))  # its signature, its own name and docstring
def quantize_int8(*args, **kwargs) -> nn.Module:
    """Deprecated alias of :func:`quantize_model` (which also makes 4-bit embeddings, hence the new name)."""
    warnings.warn(
        "`quantize_int8` is deprecated; use `quantize_model`, the same function under a name that covers its 4-bit "
        "embeddings.",
        DeprecationWarning,
        stacklevel=2,
    )
    return quantize_model(*args, **kwargs)


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
    check_compute(compute)
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
            out_f, in_f = module.weight.t().shape if is_conv1d(module) else module.weight.shape
            new = Int8Linear(in_f, out_f, bias=module.bias is not None, compute=record.get("compute", "dynamic"))
        elif kind == "embedding":
            layout = layouts.get(name, {"bits": bits})
            new = Int8Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                bits=layout["bits"], group_size=layout.get("group_size"))  # fmt: skip
        else:
            raise ValueError(f"Module kind for `{name}` must be 'linear' or 'embedding', got {kind!r}.")
        model.set_submodule(name, new)
    return model
