"""Post-training int8 quantisation of Linear and Embedding layers for CPU inference, saved as plain safetensors.

Weights are stored as int8 with one fp32 scale per output channel / embedding row (symmetric, no zero point), as
ordinary buffers; a 4-bit word-embedding table packs two codes a byte with an fp16 scale and offset per group of 64
columns (asymmetric, clipping range chosen per group by least squares). ``model.save_pretrained(folder)`` therefore
writes a normal ``model.safetensors`` plus a ``hf_compress_quantization`` record in ``config.json``, and
:func:`load_quantized` rebuilds the same modules from that record.

Why our own modules rather than ``torch.ao.quantization.quantize_dynamic`` or ``torchao``: in torch 2.13 the former
is deprecated and its packed weights do not round-trip through safetensors; ``torchao`` 0.18 (PyPI) reloads through
transformers on CPU but only quantises Linear weights and was *slower* than fp32 on CPU for a 384-wide BERT. Measured
on this machine's 2-core Xeon (AVX512-VNNI), all-MiniLM-L6-v2, Linear layers only, batch 32 x 64 tokens, median ms:
fp32 194, dequantise-on-the-fly 200, ``torch._int_mm`` with per-token activation scales 209, fbgemm dynamic int8
(``torch.ops.quantized.linear_dynamic``) 127; at batch 1 x 64: 10.4 / 13.1 / 8.8 / 6.7. So the default
``compute="dynamic"`` runs the stored int8 weights through the fbgemm/x86 dynamic kernel (per-tensor activation
scale; sentence-embedding cosine to fp32 ~0.99), and ``compute="weight_only"`` dequantises on the fly (cosine ~0.9996,
no speedup, same 4x smaller Linear weights). Embeddings always gather int8 rows and rescale only those rows.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATION_KEY = "hf_compress_quantization"
FORMAT_VERSION = 1
COMPUTE_MODES = ("dynamic", "weight_only")
Compute = Literal["dynamic", "weight_only"]


def quantize_rows(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantisation of a 2-D tensor; returns ``(codes, scale)``.

    For ``bits=8`` ``codes`` is int8 in [-127, 127] with ``weight.shape``; for ``bits=4`` it is uint8 holding two
    offset-by-8 nibbles per byte (even column in the low nibble), shape ``(rows, ceil(cols / 2))``.
    """
    if bits not in (4, 8):
        raise ValueError(f"`bits` must be 4 or 8, got {bits}.")
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D, got shape {tuple(weight.shape)}.")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    if bits == 8:
        return codes, scale
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    nibbles = (codes + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # candidate ranges of quantize_groups, fractions of min..max


def quantize_groups(weight: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantisation of a 2-D tensor in groups of ``group_size`` columns per row.

    Each group maps ``[lo, hi]`` (its min..max shrunk by the ratio of ``CLIP_RATIOS`` with the least squared error) to
    16 levels: ``w ~ code * scale + offset`` with ``code`` in [-8, 7]. Returns ``(packed, scale, offset)``: ``packed``
    is uint8 ``(rows, cols / 2)`` in the nibble layout of :func:`quantize_rows`, ``scale`` and ``offset`` are fp16
    ``(rows, cols / group_size)``.
    """
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D, got shape {tuple(weight.shape)}.")
    rows, cols = weight.shape
    if group_size < 2 or group_size % 2 or cols % group_size:
        raise ValueError(f"`group_size` must be an even divisor of the {cols} columns, got {group_size}.")
    x = weight.detach().float().reshape(rows, cols // group_size, group_size)
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    best = best_err = None
    for ratio in CLIP_RATIOS:
        lo, hi = low * ratio, high * ratio
        scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
        offset = (lo + 8 * scale).half().float()  # code -8 decodes to lo
        codes = torch.clamp(torch.round((x - offset) / scale), -8, 7)
        err = (codes * scale + offset - x).pow(2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = (codes, scale, offset), err
        else:
            better = err < best_err
            best = tuple(torch.where(better, new, old) for new, old in zip((codes, scale, offset), best))
            best_err = torch.minimum(err, best_err)
    codes, scale, offset = best
    nibbles = (codes.reshape(rows, cols) + 8).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale.squeeze(-1).half(), offset.squeeze(-1).half()


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of the ``bits=4`` packing of :func:`quantize_rows` on the last dimension; returns int8 codes."""
    low, high = packed & 0x0F, packed >> 4
    return (torch.stack((low, high), dim=-1).flatten(-2)[..., :cols].to(torch.int8) - 8).to(torch.int8)


@functools.cache
def _reduce_range() -> bool:
    # fbgemm accumulates u8*s8 pairs in int16 on CPUs without VNNI; 7-bit activations avoid saturation there.
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    return not (vnni is not None and vnni())


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and per-output-channel fp32 scales, for CPU inference.

    Buffers: ``qweight`` (int8, ``[out_features, in_features]``), ``scale`` (fp32, ``[out_features]``) and an
    optional ``bias``. ``compute`` picks the kernel: ``"dynamic"`` (fbgemm int8 matmul with a per-call activation
    scale) or ``"weight_only"`` (dequantise, then fp32 matmul). Inference only: there is no backward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute: Compute = "dynamic"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.compute = compute
        self._packed = None

    @classmethod
    def from_float(cls, module: nn.Module, compute: Compute = "dynamic") -> Int8Linear:
        """Quantise an ``nn.Linear`` or a transformers ``Conv1D`` (weights stored ``[in, out]``)."""
        weight = module.weight.t() if _is_conv1d(module) else module.weight
        out_features, in_features = weight.shape
        new = cls(in_features, out_features, bias=module.bias is not None, compute=compute)
        new.qweight, new.scale = quantize_rows(weight)
        if module.bias is not None:
            new.bias = module.bias.detach().float().clone()
        return new

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised fp32 weight (a fresh tensor; for inspection and code that reads ``.weight``)."""
        return self.dequantize()

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def _prepacked(self):
        if self._packed is None:
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zero_points, 0)
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == "dynamic" and x.device.type == "cpu" and _dynamic_available():
            out = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._prepacked(), _reduce_range())
            return out.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, compute={self.compute}"


class Int8Embedding(nn.Module):
    """An Embedding with int8 (or packed int4) rows; only looked-up rows are decoded.

    ``group_size=None``: symmetric codes with one fp32 ``scale`` per row. ``group_size=g`` (4-bit only): asymmetric
    codes with an fp16 ``scale`` and ``offset`` per group of ``g`` columns (see :func:`quantize_groups`).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, bits: int = 8,
                 group_size: int | None = None):  # fmt: skip
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"`bits` must be 4 or 8, got {bits}.")
        if group_size is not None and (bits != 4 or embedding_dim % group_size):
            raise ValueError(f"`group_size` needs bits=4 and must divide embedding_dim={embedding_dim}, got "
                             f"{group_size} at bits={bits}.")  # fmt: skip
        self.num_embeddings, self.embedding_dim, self.padding_idx, self.bits, self.group_size = (
            num_embeddings, embedding_dim, padding_idx, bits, group_size,
        )
        cols, dtype = (embedding_dim, torch.int8) if bits == 8 else ((embedding_dim + 1) // 2, torch.uint8)
        self.register_buffer("qweight", torch.zeros(num_embeddings, cols, dtype=dtype))
        if group_size is None:
            self.register_buffer("scale", torch.ones(num_embeddings))
        else:
            groups = embedding_dim // group_size
            self.register_buffer("scale", torch.ones(num_embeddings, groups, dtype=torch.float16))
            self.register_buffer("offset", torch.zeros(num_embeddings, groups, dtype=torch.float16))

    @classmethod
    def from_float(cls, module: nn.Embedding, bits: int = 8, group_size: int | None = None) -> Int8Embedding:
        new = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, bits=bits, group_size=group_size)
        if group_size is None:
            new.qweight, new.scale = quantize_rows(module.weight, bits=bits)
        else:
            new.qweight, new.scale, new.offset = quantize_groups(module.weight, group_size)
        return new

    def _decode(self, codes: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 rows from packed ``codes`` (rows ``index`` of the table, or all rows)."""
        pick = (lambda t: t) if index is None else (lambda t: F.embedding(index, t))  # noqa: E731
        values = (codes if self.bits == 8 else unpack_int4(codes, self.embedding_dim)).float()
        if self.group_size is None:
            return values * pick(self.scale[:, None])
        grouped = values.unflatten(-1, (-1, self.group_size))
        scale, offset = pick(self.scale).float().unsqueeze(-1), pick(self.offset).float().unsqueeze(-1)
        return torch.addcmul(offset, grouped, scale).flatten(-2)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised fp32 table (a fresh tensor)."""
        return self._decode(self.qweight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._decode(F.embedding(input_ids, self.qweight), input_ids)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{group}"


@functools.cache
def _dynamic_available() -> bool:
    """Whether this torch build can prepack and run per-channel dynamic int8 Linear (fbgemm/x86/qnnpack)."""
    try:
        probe = Int8Linear(8, 8, compute="dynamic")
        torch.ops.quantized.linear_dynamic(torch.ones(1, 8), probe._prepacked(), _reduce_range())
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        warnings.warn(f"int8 dynamic kernels are unavailable ({err}); falling back to `compute='weight_only'`.",
                      stacklevel=2)
        return False
    return True


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


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
    >>> from hf_compress.quantization import quantize_int8, model_size_bytes
    >>> before = model_size_bytes(model)
    >>> quantize_int8(model).save_pretrained("out/int8")
    ```
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch `nn.Module`, got {type(model).__name__}.")
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
            raise ValueError(f"`embedding_group_size` {embedding_group_size} does not evenly divide the width {width} "
                             f"of `{word}` into even groups; pick an even divisor of {width}.")
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
        setattr(config, QUANTIZATION_KEY, {
            "method": "hf_compress_int8",
            "format_version": FORMAT_VERSION,
            "compute": compute,
            "embedding_bits": embedding_bits,
            "modules": {**previous.get("modules", {}), **record},
            "embeddings": {**previous.get("embeddings", {}), **layouts},
        })
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
    >>> from hf_compress.quantization import load_quantized
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
        raise ValueError(f"Weights in {str(path)!r} do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
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
