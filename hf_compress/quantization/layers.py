"""Int8 / int4 layers for CPU inference: the quantisation math and the :class:`Int8Linear` / :class:`Int8Embedding`
modules that :func:`hf_compress.quantization.quantize.quantize_model` swaps in.

Linear weights are int8 with one fp32 scale per output channel (symmetric, no zero point). Embedding tables are int8
with one fp32 scale per row, or 4-bit: two codes a byte, either symmetric per row (files written before group
layouts) or asymmetric with an fp16 scale and offset per group of columns (:func:`quantize_groups`).

Why our own modules rather than ``torch.ao.quantization.quantize_dynamic`` or ``torchao``: in torch 2.13 the former
is deprecated and its packed weights do not round-trip through safetensors; ``torchao`` 0.18 (PyPI) reloads through
transformers on CPU but only quantises Linear weights and was *slower* than fp32 on CPU for a 384-wide BERT. Measured
on this machine's 2-core Xeon (AVX512-VNNI), all-MiniLM-L6-v2, Linear layers only, batch 32 x 64 tokens, median ms:
fp32 194, dequantise-on-the-fly 200, ``torch._int_mm`` with per-token activation scales 209, fbgemm dynamic int8
(``torch.ops.quantized.linear_dynamic``) 127; at batch 1 x 64: 10.4 / 13.1 / 8.8 / 6.7. So the default
``compute="dynamic"`` runs the stored int8 weights through the fbgemm/x86 dynamic kernel (per-tensor activation
scale; sentence-embedding cosine to fp32 ~0.99), and ``compute="weight_only"`` dequantises on the fly (cosine ~0.9996,
no speedup, same 4x smaller Linear weights). Embeddings always gather the looked-up rows and decode only those.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

COMPUTE_MODES = ("dynamic", "weight_only")
Compute = Literal["dynamic", "weight_only"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D` (GPT-2's Linear with a transposed `[in, out]` weight)."""
    return isinstance(module, Conv1D)


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


def check_group_size(group_size: object, cols: int | None = None, name: str = "group_size") -> None:
    """The rule of :func:`quantize_groups`' groups: an even integer >= 2 dividing ``cols`` (when known)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"`{name}` must be an even integer such as 64 or 32, got {group_size!r}.")
    if cols is not None and cols % group_size:
        raise ValueError(f"`{name}` must be an even divisor of the {cols} columns, got {group_size}; try 64 or 32.")


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
    check_group_size(group_size, cols)
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
        weight = module.weight.t() if is_conv1d(module) else module.weight
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
            num_embeddings,
            embedding_dim,
            padding_idx,
            bits,
            group_size,
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
        warnings.warn(
            f"int8 dynamic kernels are unavailable ({err}); falling back to `compute='weight_only'`.", stacklevel=2
        )
        return False
    return True
