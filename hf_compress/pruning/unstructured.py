"""Unstructured L1-magnitude pruning of linear weights, and a sparsity report.

Unstructured zeros do not make a model faster or smaller on their own: dense kernels multiply the zeros and dense
checkpoints store them. They pay off with sparse kernels / formats (e.g. 2:4 semi-structured sparsity, sparse
storage) or compression of the saved file. Use structured pruning (heads, FFN neurons, layers) for dense speedups.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_compress.models.families import unwrap
from hf_compress.pruning.schedules import units_to_remove

DENSE_NOTE = (
    "Unstructured zeros are stored densely: size_bytes is the dense storage, and dense kernels get no speedup."
)


def _matches(name: str, patterns: list[str] | str) -> bool:
    """Whether ``name`` matches any of ``patterns`` (each a glob such as ``*.query``, or a regular expression)."""
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return True
        try:
            if re.fullmatch(pattern, name):
                return True
        except re.error:
            continue
    return False


def prunable_weights(
    model: nn.Module, include: list[str] | str | None = None, exclude: list[str] | str | None = None
) -> dict[str, nn.Parameter]:
    """``{parameter name: weight}`` of every ``nn.Linear`` / ``Conv1D`` selected for unstructured pruning.

    The output head (``get_output_embeddings()``) is left out unless ``include`` names it; embeddings are never
    linear layers. ``include`` / ``exclude`` match module names with globs or regular expressions.
    """
    model = unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if include is not None and not _matches(name, include):
            continue
        if include is None and module is head:
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        out[f"{name}.weight" if name else "weight"] = module.weight
    return out


def magnitude_masks(
    weights: dict[str, torch.Tensor],
    sparsity: float,
    scope: Literal["global", "local"] = "global",
    previous: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks removing the ``sparsity`` fraction of smallest ``|w|`` (all weights pooled, or per tensor).

    Weights already removed in ``previous`` stay removed (they are ranked first), so masks only ever shrink.

    Example:

    >>> magnitude_masks({"w": torch.tensor([0.1, -3.0, 0.5, 2.0])}, 0.5)["w"]
    tensor([False,  True, False,  True])
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    if scope not in ("global", "local"):
        raise ValueError(f"`scope` must be 'global' or 'local', got {scope!r}.")
    scores = {}
    for name, weight in weights.items():
        score = weight.detach().abs().float().flatten()
        if previous is not None and name in previous:
            kept = previous[name].to(score.device).flatten()
            score = torch.where(kept, score, torch.full_like(score, -1.0))
        scores[name] = score
    groups = [list(scores)] if scope == "global" else [[name] for name in scores]
    masks = {}
    for names in groups:
        flat = torch.cat([scores[n] for n in names])
        keep = torch.ones_like(flat, dtype=torch.bool)
        count = units_to_remove(sparsity, flat.numel())
        if count:
            keep[torch.topk(flat, count, largest=False, sorted=False).indices] = False
        for name, part in zip(names, keep.split([scores[n].numel() for n in names]), strict=True):
            masks[name] = part.reshape(weights[name].shape)
    return masks


@dataclass
class SparsityReport:
    """Sparsity of a model: per prunable module and over all parameters.

    ``size_bytes`` is the dense storage of all parameters: zeros still take their bytes, and dense kernels do not
    skip them (see ``note``).
    """

    modules: dict[str, dict[str, float]] = field(default_factory=dict)
    total_params: int = 0
    nonzero_params: int = 0
    sparsity: float = 0.0
    prunable_sparsity: float = 0.0
    size_bytes: int = 0
    note: str = DENSE_NOTE

    def to_dict(self) -> dict:
        return asdict(self)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per-module (``nn.Linear`` / ``Conv1D`` weights) and global sparsity, parameter counts and dense size.

    Example:

    >>> report = sparsity_report(model)  # doctest: +SKIP
    >>> report.to_dict()["modules"]["encoder.layer.0.intermediate.dense"]  # doctest: +SKIP
    {'total': 4096, 'nonzero': 4096, 'sparsity': 0.0}
    """
    model = unwrap(model)
    report = SparsityReport()
    seen = set()
    for param in model.parameters():
        if id(param) in seen:  # tied weights count once
            continue
        seen.add(id(param))
        report.total_params += param.numel()
        report.nonzero_params += int(torch.count_nonzero(param.detach()))
        report.size_bytes += param.numel() * param.element_size()
    module_total = module_zeros = 0
    for name, weight in prunable_weights(model, include="*").items():
        total = weight.numel()
        zeros = total - int(torch.count_nonzero(weight.detach()))
        report.modules[name.removesuffix(".weight")] = {
            "total": total,
            "nonzero": total - zeros,
            "sparsity": zeros / max(total, 1),
        }
        module_total += total
        module_zeros += zeros
    report.sparsity = 1 - report.nonzero_params / max(report.total_params, 1)
    report.prunable_sparsity = module_zeros / max(module_total, 1)
    return report


@torch.no_grad()
def magnitude_prune(
    model: nn.Module,
    sparsity: float,
    scope: Literal["global", "local"] = "global",
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
) -> SparsityReport:
    """Zero the ``sparsity`` fraction of smallest-magnitude (L1) weights of every linear layer, in place.

    Pruning is permanent: weights are zeroed directly (no ``weight_orig`` / forward hooks are left behind). The
    model keeps its dense shapes, so it is neither faster nor smaller on dense kernels (see :class:`SparsityReport`).

    Args:
        model (`nn.Module`): A transformers model (PEFT / DDP wrappers are looked through).
        sparsity (`float`): Fraction of the selected weights to zero, in [0, 1).
        scope (`Literal["global", "local"]`, *optional*, defaults to `"global"`):
            One threshold for all selected weights, or the same fraction in every layer.
        include (`list[str]` or `str`, *optional*): Module-name globs / regexes to prune (default: all linear
            layers except the output head).
        exclude (`list[str]` or `str`, *optional*): Module-name globs / regexes to leave dense.

    Returns:
        [`SparsityReport`]: The model's sparsity after pruning.

    Example:

    >>> from hf_compress.pruning import magnitude_prune
    >>> report = magnitude_prune(model, 0.5, exclude=["*attention*"])  # doctest: +SKIP
    >>> report.modules["encoder.layer.0.intermediate.dense"]["sparsity"]  # doctest: +SKIP
    0.5
    """
    weights = prunable_weights(model, include, exclude)
    if not weights:
        raise ValueError(f"`include`={include!r} / `exclude`={exclude!r} select no nn.Linear or Conv1D weight.")
    for name, keep in magnitude_masks(weights, sparsity, scope).items():
        weights[name].mul_(keep.to(weights[name].device))
    return sparsity_report(model)
