"""Compression to a parameter budget (Minitron): enumerate candidate shapes, prune each one-shot, keep the best by KL.

A candidate :class:`Shape` is uniform: ``layers`` blocks of ``heads`` query heads (whole groups under grouped-query
attention) and ``ffn`` neurons, on ``hidden`` channels. Parameter counts come from the model's own tensors (each
dimension that carries hidden channels, heads or neurons scales with the kept fraction), so no candidate is built
to be counted. The candidates within ``budget`` and closest to it are pruned one-shot from activation importance
(:mod:`hf_compress.pruning.activations`) computed once on the full model, and scored by the KL divergence of their
logits from the full model's on calibration batches; the table of every scored candidate is printed.

For BERT / RoBERTa / DistilBERT / GPT-2, whose head width is ``hidden_size / num_heads``, candidates keep
``hidden / head_dim`` heads so the result stays expressible by the config (plain ``from_pretrained``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hf_compress.models.families import (
    ffn_size,
    get_family,
    get_layers,
    head_counts,
    head_dim,
    head_slices,
    neuron_slices,
    unwrap,
)
from hf_compress.models.hidden_sizes import hidden_multiple
from hf_compress.pruning.activations import ActivationScores, activation_scores, block_skip_scores, kl_to_reference
from hf_compress.pruning.hidden import prune_hidden
from hf_compress.pruning.hidden_channels import hidden_layout
from hf_compress.pruning.importance import block_influence_scores, head_groups
from hf_compress.pruning.surgery import drop_layers, prune_ffn_neurons, prune_heads

FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)


@dataclass(frozen=True)
class Shape:
    """A uniform model shape: block count, hidden size, query heads and FFN neurons per block."""

    layers: int
    hidden: int
    heads: int
    ffn: int


@dataclass
class BudgetResult:
    """The chosen shape, the pruned copy, one row per scored candidate (shape, params, KL), and what was removed
    (:func:`shape_removals`, indices of the input model)."""

    shape: Shape
    model: nn.Module
    table: list[dict] = field(default_factory=list)
    removed: dict = field(default_factory=dict)


def _base_shape(model: nn.Module) -> Shape:
    layers = get_layers(model)
    structures = {(head_counts(model, i), ffn_size(model, i)) for i in range(len(layers))}
    if len(structures) != 1:
        raise ValueError("`model` has layers of different shapes; budget search starts from a uniform model.")
    (heads, _), ffn = structures.pop()
    return Shape(layers=len(layers), hidden=int(model.config.hidden_size), heads=heads, ffn=ffn)


def _exponents(model: nn.Module) -> list[tuple[int, bool, int, int, int]]:
    """Per unique parameter: ``(numel, in a block, #hidden dims, #head dims, #ffn dims)``."""
    layout = hidden_layout(model)
    hidden_dims: dict[int, set[int]] = {}
    for module, name, dim in layout.readers + layout.writers:
        hidden_dims.setdefault(id(getattr(module, name)), set()).add(dim)
    for norm in layout.norms:
        for name in ("weight", "bias"):
            if getattr(norm.module, name, None) is not None:
                hidden_dims.setdefault(id(getattr(norm.module, name)), set()).add(0)
    head_dims: dict[int, set[int]] = {}
    ffn_dims: dict[int, set[int]] = {}
    for layer in range(len(get_layers(model))):
        heads = list(range(head_counts(model, layer)[0]))
        for module, name, dim, _ in head_slices(model, layer, heads):
            head_dims.setdefault(id(getattr(module, name)), set()).add(dim)
        for module, name, dim, _ in neuron_slices(model, layer, list(range(ffn_size(model, layer)))):
            ffn_dims.setdefault(id(getattr(module, name)), set()).add(dim)
    block_params = {id(p) for p in get_layers(model).parameters()}
    return [
        (
            p.numel(),
            id(p) in block_params,
            len(hidden_dims.get(id(p), ())),
            len(head_dims.get(id(p), ())),
            len(ffn_dims.get(id(p), ())),
        )
        for p in model.parameters()
    ]


def count_parameters(model: nn.Module, shape: Shape) -> int:
    """Parameters (tied ones once) of ``model`` pruned uniformly to ``shape``, without building it."""
    inner = unwrap(model)
    base = _base_shape(inner)
    return _count(_exponents(inner), base, shape)


def _count(exponents: list[tuple[int, bool, int, int, int]], base: Shape, shape: Shape) -> int:
    ratios = (shape.hidden / base.hidden, shape.heads / base.heads, shape.ffn / base.ffn)
    total = 0.0
    for numel, in_block, hidden, heads, ffn in exponents:
        size = numel * ratios[0] ** hidden * ratios[1] ** heads * ratios[2] ** ffn
        total += size * shape.layers / base.layers if in_block else size
    return round(total)


def candidate_shapes(
    model: nn.Module,
    budget: int,
    depth: Sequence[float] = FRACTIONS,
    width: Sequence[float] = FRACTIONS,
    heads: Sequence[float] = (1.0, 0.75, 0.5),
    ffn: Sequence[float] = FRACTIONS,
    slack: float = 0.1,
) -> list[tuple[Shape, int]]:
    """Uniform shapes of ``model`` with ``(1 - slack) * budget <= params <= budget``, largest first, with their counts.

    ``depth`` / ``width`` / ``heads`` / ``ffn`` are the kept fractions tried for blocks, hidden size, query heads and
    FFN neurons. Hidden sizes are rounded to a multiple of 8 (of the head width where the head width is
    ``hidden_size / num_heads``: those families keep ``hidden / head_dim`` heads), and of the candidate's head count
    where the config requires it (:func:`~hf_compress.models.hidden_sizes.hidden_multiple`: Llama, Gemma 2 / 3), so
    every candidate saves. Head counts keep whole query groups.
    If no shape lands within the slack, the largest shapes under the budget are returned.
    """
    inner = unwrap(model)
    if not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"`budget` must be a positive number of parameters, got {budget!r}.")
    base = _base_shape(inner)
    exponents = _exponents(inner)
    coupled = not get_family(inner).config_head_dim
    dim = head_dim(inner, 0)
    group = base.heads // head_counts(inner, 0)[1]
    multiple = dim if coupled else (8 if base.hidden % 8 == 0 and base.hidden >= 64 else 1)
    # (hidden size, query heads) pairs; where the config validates it, the hidden size is a multiple of the heads
    pairs = set()
    for fw in width:
        if coupled:
            hidden = max(multiple, round(base.hidden * fw / multiple) * multiple)
            pairs.add((hidden, hidden // dim))
            continue
        for num_heads in {min(base.heads, max(group, round(base.heads * f / group) * group)) for f in heads}:
            step = math.lcm(multiple, hidden_multiple(inner.config, num_heads))
            pairs.add((min(base.hidden, max(step, round(base.hidden * fw / step) * step)), num_heads))
    shapes = {
        Shape(max(1, round(base.layers * fd)), min(hidden, base.hidden), min(num_heads, base.heads), ffn_kept)
        for fd in depth
        for hidden, num_heads in pairs
        for ffn_kept in {max(1, round(base.ffn * ff)) for ff in ffn}
    }
    counted = sorted(((s, _count(exponents, base, s)) for s in shapes), key=lambda item: -item[1])
    within = [(s, n) for s, n in counted if n <= budget]
    if not within:
        smallest = counted[-1][1]
        raise ValueError(
            f"`budget` of {budget:,} parameters is below the smallest candidate ({smallest:,}); raise it or add "
            "smaller fractions to the grid."
        )
    close = [(s, n) for s, n in within if n >= (1.0 - slack) * budget]
    return close or within[:8]


def plan_budget(model: nn.Module, budget: int, max_candidates: int = 8) -> list[str]:
    """Dry-run lines of a budget search (``hf-compress check``): the candidates the search would score, with counts.

    Works on a meta-device model. The model is then pruned (arbitrary indices) to the largest candidate, so the plan's
    later rows show a shape the search may pick; the real choice (lowest KL) needs the weights.
    """
    candidates = candidate_shapes(model, budget)[:max_candidates]
    lines = [f"budget {budget:,} parameters -> {len(candidates)} candidate shapes scored by KL (largest shown next):"]
    lines += [
        f"    layers {s.layers:>3}  hidden {s.hidden:>5}  heads {s.heads:>3}  ffn {s.ffn:>6}  params {n:>13,}"
        for s, n in candidates
    ]
    shape = candidates[0][0]
    base = _base_shape(unwrap(model))
    removed = {
        "heads": {i: list(range(base.heads - shape.heads)) for i in range(base.layers) if base.heads > shape.heads},
        "ffn_neurons": {i: list(range(base.ffn - shape.ffn)) for i in range(base.layers) if base.ffn > shape.ffn},
        "hidden": list(range(base.hidden - shape.hidden)),
        "layers": list(range(shape.layers, base.layers)),
    }
    apply_removals(unwrap(model), removed)
    return lines


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(scores.argsort()[:count].tolist()) if count > 0 else []


def shape_removals(model: nn.Module, shape: Shape, scores: ActivationScores, layer_scores: torch.Tensor) -> dict:
    """What pruning ``model`` to ``shape`` removes: the lowest-scoring head groups, neurons, channels and blocks.

    Returns the surgery arguments ``{"heads": {layer: [...]}, "ffn_neurons": {layer: [...]}, "hidden": [...],
    "layers": [...]}``, all indices of the current ``model``.
    """
    inner = unwrap(model)
    base = _base_shape(inner)
    layers = range(base.layers)
    groups = scores.head_group_scores(inner)
    drop_groups = (base.heads - shape.heads) // len(head_groups(inner, 0)[0])
    heads = {}
    for layer in layers:
        units = head_groups(inner, layer)
        heads[layer] = [h for g in _lowest(groups[layer], drop_groups) for h in units[g]]
    return {
        "heads": {layer: h for layer, h in heads.items() if h},
        "ffn_neurons": {
            layer: n for layer in layers if (n := _lowest(scores.ffn_neurons[layer], base.ffn - shape.ffn))
        },
        "hidden": _lowest(scores.hidden, base.hidden - shape.hidden),
        "layers": _lowest(layer_scores, base.layers - shape.layers),
    }


def apply_removals(model: nn.Module, removed: dict) -> nn.Module:
    """Apply :func:`shape_removals`' result in place: heads, neurons, hidden channels, then blocks.

    Heads go first so that, where head width is ``hidden_size / num_heads``, the hidden pruning sees the final head
    count and writes it to the config.
    """
    prune_heads(model, removed.get("heads", {}))
    prune_ffn_neurons(model, removed.get("ffn_neurons", {}))
    if removed.get("hidden"):
        prune_hidden(model, removed["hidden"], verify=False)
    if removed.get("layers"):
        drop_layers(model, removed["layers"])
    return model


def apply_shape(model: nn.Module, shape: Shape, scores: ActivationScores, layer_scores: torch.Tensor) -> nn.Module:
    """Prune ``model`` in place to ``shape`` (:func:`shape_removals` then :func:`apply_removals`)."""
    return apply_removals(model, shape_removals(model, shape, scores, layer_scores))


@torch.no_grad()
def _kl(model: nn.Module, batches: list[dict], references: list[torch.Tensor]) -> float:
    total = 0.0
    for batch, reference in zip(batches, references, strict=True):
        logits = model(**batch, use_cache=False)[0] if hasattr(model.config, "use_cache") else model(**batch)[0]
        total += float(kl_to_reference(logits, reference, batch.get("attention_mask")))
    return total / len(batches)


def format_table(rows: list[dict]) -> str:
    """The candidates table as aligned text (one row per candidate, the chosen one marked ``*``)."""
    header = f"{'':1} {'layers':>6} {'hidden':>6} {'heads':>5} {'ffn':>6} {'params':>14} {'KL':>10}"
    lines = [header]
    for row in rows:
        mark = "*" if row.get("chosen") else " "
        lines.append(
            f"{mark:1} {row['layers']:>6} {row['hidden']:>6} {row['heads']:>5} {row['ffn']:>6} "
            f"{row['params']:>14,} {row['kl']:>10.4g}"
        )
    return "\n".join(lines)


def search_budget(
    model: nn.Module,
    budget: int,
    batches: Iterable[dict],
    max_candidates: int = 8,
    layer_importance: str = "skip_loss",
    verbose: bool = True,
    **grid,
) -> BudgetResult:
    """Prune ``model`` to at most ``budget`` parameters with the candidate shape of lowest KL to the full model.

    Args:
        model (`PreTrainedModel`):
            A uniform supported model with logits (LM or classifier head); left unchanged (candidates are copies).
        budget (`int`):
            Maximum parameter count of the result (tied weights once).
        batches (`Iterable[dict]`):
            Calibration batches of model inputs, used for importance and for the KL of every candidate.
        max_candidates (`int`, *optional*, defaults to `8`):
            How many of the largest shapes within the budget are pruned and scored.
        layer_importance (`str`, *optional*, defaults to `"skip_loss"`):
            `"skip_loss"` (:func:`~hf_compress.pruning.activations.block_skip_scores`) or `"block_influence"`.
        verbose (`bool`, *optional*, defaults to `True`):
            Print the candidates table.
        grid:
            Fractions for :func:`candidate_shapes` (`depth`, `width`, `heads`, `ffn`, `slack`).

    Returns:
        [`BudgetResult`]: the chosen shape, the pruned copy, and the table rows.

    Example:

    >>> from hf_compress.pruning.budget import search_budget
    >>> result = search_budget(model, budget=70_000_000, batches=calibration)  # doctest: +SKIP
    >>> result.shape, result.model.num_parameters()  # doctest: +SKIP
    """
    inner = unwrap(model)
    if layer_importance not in ("skip_loss", "block_influence"):
        raise ValueError(f"`layer_importance` must be 'skip_loss' or 'block_influence', got {layer_importance!r}.")
    if max_candidates < 1:
        raise ValueError(f"`max_candidates` must be >= 1, got {max_candidates}.")
    device = next(inner.parameters()).device
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    if not batches:
        raise ValueError("`batches` is empty; budget search needs calibration batches.")
    candidates = candidate_shapes(inner, budget, **grid)[:max_candidates]
    scores = activation_scores(inner, batches)
    if layer_importance == "skip_loss":
        layer_scores = block_skip_scores(inner, batches)
    else:
        layer_scores = block_influence_scores(inner, batches)
    was_training = inner.training
    inner.eval()
    with torch.no_grad():
        references = [
            inner(**b, use_cache=False)[0] if hasattr(inner.config, "use_cache") else inner(**b)[0] for b in batches
        ]
    rows, best = [], None
    for shape, params in candidates:
        removed = shape_removals(inner, shape, scores, layer_scores)
        candidate = apply_removals(copy.deepcopy(inner), removed).eval()
        kl = _kl(candidate, batches, references)
        rows.append({**asdict(shape), "params": params, "kl": kl})
        if best is None or kl < best[0]:
            best = (kl, shape, candidate, removed)
        else:
            del candidate
    inner.train(was_training)
    kl, shape, pruned, removed = best
    for row in rows:
        row["chosen"] = row["kl"] == kl and Shape(row["layers"], row["hidden"], row["heads"], row["ffn"]) == shape
    if verbose:
        print(format_table(rows))
    if math.isnan(kl):
        raise ValueError("`batches` gave a NaN KL for every candidate; check the calibration inputs.")
    return BudgetResult(shape=shape, model=pruned, table=rows, removed=removed)
