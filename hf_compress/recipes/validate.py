"""From YAML text to a validated, typed [`Recipe`]: parsing, ``--set`` overrides and validation.

The stage sections ``training``, ``pruning``, ``quantization``, ``vocabulary`` and ``student`` are the fields of
``DistillationConfig`` / ``TrainingArguments`` / ``PruningConfig`` and the keyword arguments of the quantisation /
vocabulary functions / ``make_student``: they are read with ``dataclasses.fields`` / ``inspect.signature`` (so they
follow those classes) and the config classes are instantiated once so that their own ``__post_init__`` checks run
before any model is loaded. Every error is a [`RecipeError`] of one sentence naming the key path, the value and the
fix; nothing is written.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from hf_compress.export import export_onnx
from hf_compress.export.embeddings import EMBEDDING_BITS
from hf_compress.quantization.layers import check_group_size
from hf_compress.quantization.quantize import quantize_model
from hf_compress.recipes.checks import check_corpus_files, check_data, check_stage_order, check_teacher
from hf_compress.recipes.schema import (
    REPO_ROOT,
    STAGE_SECTIONS,
    DataSpec,
    ModelSpec,
    Recipe,
    RecipeError,
    Stage,
)
from hf_compress.recipes.sections import (
    check_keys,
    coerce,
    config_kwargs,
    function_kwargs,
    student_kwargs,
    suggest,
    type_hints,
)
from hf_compress.vocabulary.prune import prune_vocabulary


def _section(cls, raw: Any, path: str, label: str) -> dict[str, Any]:
    """Check a mapping against the YAML fields of recipe dataclass ``cls``: unknown / missing keys and types."""
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]
    values = check_keys(raw, names, path, label)
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in values:
            values[f.name] = coerce(values[f.name], hints.get(f.name, Any), _join(path, f.name))
        elif missing:
            raise RecipeError(f"`{_join(path, f.name)}` is missing; the {label} section requires it.")
    return values


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# --------------------------------------------------------------------------------------------------- parsing


def _stage(raw: Any, index: int) -> Stage:
    path = f"stages[{index}]"
    if not isinstance(raw, dict):
        raise RecipeError(f"`{path}` must be a mapping with a `type`, got {raw!r}.")
    kind = raw.get("type")
    if kind is None:
        raise RecipeError(f"`{path}.type` is missing; use one of {', '.join(STAGE_SECTIONS)}.")
    if kind not in STAGE_SECTIONS:
        raise RecipeError(f"`{path}.type` is {kind!r}, not a stage type; {suggest(str(kind), list(STAGE_SECTIONS))}")
    allowed = ["name", "type", *STAGE_SECTIONS[kind]]
    for key in raw:
        owners = [t for t, sections in STAGE_SECTIONS.items() if key in sections]
        if key not in allowed and owners:
            raise RecipeError(
                f"`{path}.{key}` is not allowed in a `{kind}` stage (only in {', '.join(owners)} stages); remove it."
            )
    stage = Stage(**_section(Stage, {k: v for k, v in raw.items()}, path, f"`{kind}` stage"))
    stage.name = stage.name or kind
    if not isinstance(stage.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", stage.name):
        raise RecipeError(
            f"`{path}.name` is {stage.name!r}; a stage name is a folder name (letters, digits, '_', '.', '-')."
        )
    if kind == "prune" and stage.recovery == "none" and stage.training:
        raise RecipeError(
            f"`{path}.training` is set but `{path}.recovery` is 'none'; remove `training` or set `recovery: distill`."
        )
    if "training" in allowed:
        stage.training = config_kwargs("training", stage.training, f"{path}.training", distills=stage.distills)
    if kind == "prune":
        stage.pruning = config_kwargs("pruning", stage.pruning, f"{path}.pruning")
    if kind == "quantize":
        stage.quantization = function_kwargs(quantize_model, stage.quantization, f"{path}.quantization")
    if kind == "prune_vocabulary":
        # model, tokenizer and corpus come from the pipeline (the corpus: train texts + `corpus_files`)
        stage.vocabulary = function_kwargs(prune_vocabulary, stage.vocabulary, f"{path}.vocabulary", skip=3)
    if kind == "export_onnx":  # folder and output come from the pipeline
        stage.export = function_kwargs(export_onnx, stage.export, f"{path}.export", skip=2)
        check_export_values(stage.export, f"{path}.export")
    if kind == "distill":
        stage.student = student_kwargs(stage.student, f"{path}.student")
    return stage


def check_export_values(export: dict[str, Any], path: str) -> None:
    """The ``export_onnx`` values that can be judged before training: table bits, their quantize flag, group size."""
    bits = export.get("embedding_bits", 8)
    if bits not in EMBEDDING_BITS:
        raise RecipeError(f"`{path}.embedding_bits` is {bits!r}; use one of {list(EMBEDDING_BITS)}.")
    if bits == 4 and export.get("quantize", True) is False:
        raise RecipeError(
            f"`{path}.embedding_bits` is 4 but `{path}.quantize` is false; the 4-bit table lives in "
            "`model_quantized.onnx`: drop one of them."
        )
    try:
        check_group_size(export.get("embedding_group_size", 64), name=f"{path}.embedding_group_size")
    except ValueError as err:
        raise RecipeError(str(err)) from None


def validate(recipe: dict[str, Any] | Recipe, base_dir: str | Path | None = None) -> Recipe:
    """Validate a recipe and resolve its paths, before anything is trained or written.

    Args:
        recipe (`dict` or [`Recipe`]):
            The parsed YAML (or an already built recipe, which is checked again).
        base_dir (`str` or `Path`, *optional*):
            Folder that relative paths are resolved against first (then the current directory, then the
            repository root); defaults to the current directory.

    Returns:
        [`Recipe`]: typed, every stage named, numbers coerced (`"1e-4"` becomes `1e-4`), data files and the teacher
        folder resolved to absolute paths, `data.label_column` defaulting to `"label"` for classification.

    Raises:
        [`RecipeError`]: one sentence naming the key path, the value received and the fix. Nothing is written.

    Example:

    ```python
    >>> from hf_compress.recipes.validate import validate
    >>> raw = {"name": "demo", "model": {"teacher": "builtin:all-MiniLM-L6-v2", "num_labels": 2},
    ...        "data": {"train": "data/sst2/train.tsv", "text_column": "sentence"},
    ...        "stages": [{"type": "distill", "student": {"num_layers": 3}, "training": {"max_stepz": 10}}]}
    >>> validate(raw)  # doctest: +SKIP
    RecipeError: `stages[0].training.max_stepz` is not a DistillationConfig field; did you mean `max_steps`?

    ```
    """
    source = None
    if isinstance(recipe, Recipe):
        source, recipe = recipe.source, recipe.to_dict()
    if not isinstance(recipe, dict):
        raise RecipeError(f"`recipe` must be a YAML mapping with `name`, `model`, `data`, `stages`, got {recipe!r}.")
    scalars = {k: {"model": {}, "data": {}, "stages": []}.get(k, v) for k, v in recipe.items()}  # sections below
    top = _section(Recipe, scalars, "", "recipe")
    if not isinstance(top["name"], str) or not top["name"].strip():
        raise RecipeError(f"`name` must be a non-empty string, got {top['name']!r}.")
    model = ModelSpec(**_section(ModelSpec, recipe["model"], "model", "model"))
    data = DataSpec(**_section(DataSpec, recipe.get("data"), "data", "data"))
    raw_stages = recipe["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise RecipeError(f"`stages` must be a non-empty list, got {raw_stages!r}; add e.g. `- type: distill`.")
    stages = [_stage(raw, i) for i, raw in enumerate(raw_stages)]
    bases = [Path(base_dir) if base_dir is not None else Path.cwd(), Path.cwd(), REPO_ROOT]
    check_stage_order(stages, model)
    check_teacher(model, stages, bases)
    check_data(data, model, stages, bases)
    check_corpus_files(stages, bases)
    return Recipe(
        name=top["name"],
        model=model,
        data=data,
        stages=stages,
        seed=top.get("seed", 42),
        description=top.get("description"),
        source=source,
    )


# ------------------------------------------------------------------------------------- overrides and loading


def _set(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = [p for p in re.split(r"\.|\[(\d+)\]", key.strip()) if p]
    if not sep or not parts or re.search(r"\.\.|^\.|\.$", key.strip()):
        raise RecipeError(f"`--set {item}` is not of the form key.path=value; e.g. `--set data.max_length=64`.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(
            f"`--set {item}` has a value that is not valid YAML ({getattr(err, 'problem', err)}); quote it."
        ) from None
    node: Any = raw
    for depth, part in enumerate(parts):
        here, last = ".".join(parts[:depth]) or "recipe", depth == len(parts) - 1
        if isinstance(node, list):
            names = [str(s.get("name") or s.get("type")) if isinstance(s, dict) else "" for s in node]
            if part.isdigit() and int(part) < len(node):
                part = int(part)
            elif part in names:
                part = names.index(part)
            else:
                raise RecipeError(f"`--set {item}`: `{here}` has no stage {part!r}; {suggest(part, names)}")
        elif not isinstance(node, dict):
            raise RecipeError(f"`--set {item}`: `{here}` is {node!r}, not a mapping, so it has no key {part!r}.")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def apply_overrides(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of ``raw`` with ``key.path=value`` overrides applied (stages addressed by name or index)."""
    if not isinstance(raw, dict):
        raise RecipeError(f"`recipe` must be a YAML mapping with `name`, `model`, `data` and `stages`, got {raw!r}.")
    raw = copy.deepcopy(raw)
    for item in overrides:
        _set(raw, item)
    if isinstance(raw.get("stages"), list):  # `--set stages.teacher=null` removes that stage
        raw["stages"] = [stage for stage in raw["stages"] if stage is not None]
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read (``yaml.safe_load``), override and validate a recipe file; nothing is written.

    Args:
        path (`str` or `Path`):
            The recipe YAML file. Relative paths inside it resolve against its folder, then the current directory,
            then the repository root.
        overrides (`list[str]`, *optional*):
            ``key.path=value`` items with YAML values, e.g. ``["stages.student.training.max_steps=50"]``;
            ``stages.<name>=null`` removes a stage (e.g. the teacher fine-tuning when ``model.teacher`` already is
            a fine-tuned classifier folder).

    Returns:
        [`Recipe`]: the validated recipe.

    Example:

    ```python
    >>> from hf_compress.recipes.validate import load_recipe
    >>> recipe = load_recipe("recipes/quickstart.yaml", ["stages.student.training.max_steps=20"])
    >>> recipe.stage("student").training["max_steps"]
    20

    ```
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"`recipe` file {str(path)!r} does not exist; pass the path of a recipe YAML file.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(
            f"`recipe` file {str(path)!r} is not valid YAML{where} "
            f"({getattr(err, 'problem', err)}); fix the indentation or quoting there."
        ) from None
    recipe = validate(apply_overrides(raw, overrides), base_dir=path.resolve().parent)
    recipe.source = str(path.resolve())
    return recipe
