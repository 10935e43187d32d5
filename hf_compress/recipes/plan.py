"""Dry-run plan of a recipe (``hf-compress check``): expected shapes, parameter counts and sizes of every stage.

Every model is built from its config on the meta device: no weight is read and nothing is written. Pruning stages
apply the same fraction to every layer with the real surgery functions.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from hf_compress.distillation.student import make_student
from hf_compress.integrations.sentence_transformers import is_sentence_transformer_folder, transformer_folder
from hf_compress.models.builtin import resolve_model_path
from hf_compress.models.families import ffn_size, get_family, get_layers, head_counts
from hf_compress.models.heads import auto_class_for_task
from hf_compress.models.hidden_sizes import hidden_multiple
from hf_compress.pruning.budget import plan_budget
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.hidden import prune_hidden
from hf_compress.pruning.importance import head_groups
from hf_compress.pruning.schedules import kept_hidden_size, units_to_remove
from hf_compress.pruning.surgery import drop_layers, prune_ffn_neurons, prune_heads
from hf_compress.pruning.unstructured import prunable_weights
from hf_compress.quantization.quantize import Int8Embedding, Int8Linear, quantize_model
from hf_compress.recipes.schema import MODEL_STAGES, Recipe
from hf_compress.recipes.stages.vocabulary import plan_vocabulary
from hf_compress.reporting.measure import human_bytes


def meta_model(path: str, task: str, num_labels: int | None):
    """The model of folder ``path`` built from its config on the meta device: shapes only, no weights, no memory."""
    kwargs = {"num_labels": num_labels} if task == "sequence-classification" and num_labels else {}
    folder = resolve_model_path(path)
    if is_sentence_transformer_folder(folder):  # a SentenceTransformer: the transformers model inside it
        folder = transformer_folder(folder)
    config = AutoConfig.from_pretrained(folder, **kwargs)
    with torch.device("meta"):
        return auto_class_for_task(task).from_config(config)


def _where(model, target: str) -> str:
    """Module names a pruning target acts on, e.g. ``bert.encoder.layer.{0-5}.attention.self.{query,key,value}``."""
    family, layers = get_family(model), get_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers) + f".{{0-{len(layers) - 1}}}"
    roles = {"heads": ("q", "k", "v", "qkv", "o"), "ffn_neurons": ("up", "gate", "down"), "layers": ()}[target]
    paths = [getattr(family, role) for role in roles if getattr(family, role)]
    return prefix + (f".{{{','.join(paths)}}}" if paths else "")


def _prune_plan(model, name: str, pruning: dict[str, Any]) -> tuple[int, list[str]]:
    """Apply the expected structured pruning to a meta ``model`` (uniform per layer); return zeroed weights, lines."""
    config, lines, zeroed = PruningConfig(**pruning), [], 0
    if config.budget is not None:
        return 0, [f"  {name}: {line}" for line in plan_budget(model, config.budget, config.budget_candidates)]
    for target in sorted(config.targets, key=lambda t: t == "hidden"):  # as PruningCallback: hidden after the heads
        sparsity, total = config.targets[target], len(get_layers(model))
        if target == "unstructured":
            weights = sum(w.numel() for w in prunable_weights(model).values())
            zeroed = int(sparsity * weights)
            lines.append(
                f"  {name}: unstructured {sparsity:.0%} of {len(prunable_weights(model))} Linear weights "
                f"({weights:,} values, output head excluded) -> {zeroed:,} zeros"
            )
            continue
        if target == "hidden":
            size = model.config.hidden_size
            k = size - kept_hidden_size(size, sparsity, hidden_multiple(model.config))
            prune_hidden(model, list(range(k)), verify=False)
            lines.append(
                f"  {name}: hidden {sparsity:.0%} of {size} channels -> {k} removed (embeddings, norms, heads)"
            )
            continue
        where = _where(model, target)
        if target == "layers":
            k = units_to_remove(sparsity, total)
            drop_layers(model, list(range(total - 1 - k, total - 1)))
            lines.append(f"  {name}: layers {sparsity:.0%} of {where} -> {k} of {total} blocks dropped")
        elif target == "heads":
            heads = {}
            for i in range(total):
                groups, per = head_groups(model, i), head_counts(model, i)[0] // len(head_groups(model, i))
                k = min(units_to_remove(sparsity, len(groups)), len(groups) - -(-config.min_heads_per_layer // per))
                heads[i] = [h for group in groups[:k] for h in group]
            before = sum(head_counts(model, i)[0] for i in range(total))
            prune_heads(model, heads)
            lines.append(
                f"  {name}: heads {sparsity:.0%} of {where} -> {sum(map(len, heads.values()))} of "
                f"{before} heads removed"
            )
        else:
            neurons = {i: list(range(units_to_remove(sparsity, ffn_size(model, i)))) for i in range(total)}
            before = sum(ffn_size(model, i) for i in range(total))
            prune_ffn_neurons(model, neurons)
            lines.append(
                f"  {name}: ffn_neurons {sparsity:.0%} of {where} -> {sum(map(len, neurons.values())):,} of "
                f"{before:,} neurons removed"
            )
    return zeroed, lines


def _meta_counts(model) -> tuple[int, int]:
    """``(parameters, bytes)`` of a meta-device model; int8 codes count as the weights they encode."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    params = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, Int8Linear | Int8Embedding):
            params += module.qweight.numel() * (2 if getattr(module, "bits", 8) == 4 else 1)
            bias = getattr(module, "bias", None)
            params += bias.numel() if bias is not None and not isinstance(bias, nn.Parameter) else 0
    return params, sum(t.numel() * t.element_size() for t in tensors.values())


def _shape_row(name: str, kind: str, model, zeroed: int, reference_bytes: int | None) -> dict[str, str]:
    def span(values: list[int]) -> str:
        return "-" if not values else str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"

    try:
        total = len(get_layers(model))
    except ValueError:  # a family hf_compress cannot slice: sizes only
        total = 0
    params, size = _meta_counts(model)
    return {
        "stage": name,
        "type": kind,
        "layers": str(total or "-"),
        "heads/layer": span([head_counts(model, i)[0] for i in range(total)]),
        "ffn/layer": span([ffn_size(model, i) for i in range(total)]),
        "params (nonzero)": f"{params - zeroed:,}",
        "size (fp32 / int8)": human_bytes(size),
        "size x": f"{reference_bytes / size:.1f}x" if reference_bytes else "1.0x",
    }


def plan_recipe(recipe: Recipe) -> tuple[list[dict[str, str]], list[str]]:
    """Expected shape, parameter count and size after each model stage, and what each prune target matches.

    Models are built from their configs on the meta device (no weights read, nothing written); pruning removes the
    same fraction in every layer, so `scope: global` runs may distribute the removed units differently.
    """
    teacher = meta_model(recipe.model.teacher, recipe.model.task, recipe.model.num_labels)
    reference = _meta_counts(teacher)[1]
    rows, lines = [_shape_row("teacher (input)", "-", teacher, 0, None)], ["Pruning targets:"]
    current, zeroed = teacher, 0
    for stage in recipe.stages:
        if stage.type == "distill":
            model = stage.student_model
            current = (
                meta_model(model, recipe.model.task, recipe.model.num_labels)
                if model
                else make_student(teacher, **stage.student)
            )
            zeroed = 0
        elif stage.type == "prune":
            current = copy.deepcopy(current)
            extra, found = _prune_plan(current, stage.name, stage.pruning)
            zeroed, lines = zeroed + extra, lines + found
        elif stage.type == "quantize":
            current = quantize_model(copy.deepcopy(current), **stage.quantization)
        elif stage.type == "prune_vocabulary":
            on_teacher = current is teacher
            current, vocab = plan_vocabulary(copy.deepcopy(current), recipe, stage)
            teacher = current if on_teacher else teacher
            lines.append(f"  {stage.name}: vocabulary {vocab.original_vocab_size:,} -> {vocab.kept_vocab_size:,} ids")
        if stage.type in MODEL_STAGES or stage.type == "prune_vocabulary":
            rows.append(_shape_row(stage.name, stage.type, current, zeroed, reference))
    return rows, lines if len(lines) > 1 else []
