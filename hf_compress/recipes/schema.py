"""Recipes: one YAML file describing a whole compression run, validated before any training starts.

A recipe names a teacher (``model``), a dataset (``data``) and an ordered list of ``stages``. The stage sections
``training``, ``pruning``, ``quantization``, ``vocabulary`` and ``student`` are the fields of ``DistillationConfig`` /
``TrainingArguments`` / ``PruningConfig`` and the keyword arguments of ``quantize_int8`` / ``prune_vocabulary`` /
``make_student``: the validator reads them with ``dataclasses.fields`` / ``inspect.signature`` (so it follows those
classes) and instantiates the config classes so that their own ``__post_init__`` checks run before any model is
loaded. Every error is a [`RecipeError`] of one sentence naming the key path, the value and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hf_compress.recipes.validate import (
    RecipeError,
    check_corpus_files,
    check_data,
    check_keys,
    check_stage_order,
    check_teacher,
    coerce,
    config_kwargs,
    function_kwargs,
    student_kwargs,
    suggest,
    type_hints,
)

Task = Literal["sequence-classification", "causal-lm"]
StageType = Literal["finetune_teacher", "distill", "prune", "prune_vocabulary", "quantize", "evaluate", "card"]
Recovery = Literal["distill", "finetune", "none"]

# stage type -> the sections (besides `name` and `type`) it accepts
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "finetune_teacher": ("training",),
    "distill": ("student", "training"),
    "prune": ("pruning", "recovery", "training"),
    "prune_vocabulary": ("vocabulary", "corpus_files"),
    "quantize": ("quantization",),
    "evaluate": (),
    "card": (),
}
REPO_ROOT = Path(__file__).resolve().parents[2]  # the source checkout (data/ and recipes/ resolve against it)


@dataclass
class ModelSpec:
    """The ``model`` section; validation makes a local ``teacher`` folder absolute (``builtin:`` / Hub ids stay)."""

    teacher: str
    task: Task = "sequence-classification"
    num_labels: int | None = None
    tokenizer: str | None = None


@dataclass
class DataSpec:
    """The ``data`` section (the keys of ``hf_compress.recipes.data.DATA_DEFAULTS``); file paths become absolute."""

    train: str | None = None
    eval: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    column_names: list[str] | None = None  # headerless csv/tsv files (GLUE CoLA): one name per column
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = None  # validation sets "label" for classification
    label_names: list[str] | None = None  # names of the integer labels 0..n-1 (config.id2label)
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    block_size: int = 128


@dataclass
class Stage:
    """One stage; its sections are plain dicts of config fields / function kwargs, already type-checked."""

    type: StageType
    name: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    recovery: Recovery = "distill"
    vocabulary: dict[str, Any] = field(default_factory=dict)  # prune_vocabulary kwargs (min_count, extra_ids, ...)
    corpus_files: list[str] = field(default_factory=list)  # .txt files (one text a line) counted with the train set

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, **{key: getattr(self, key) for key in STAGE_SECTIONS[self.type]}}


@dataclass
class Recipe:
    """A validated recipe, built by [`load_recipe`] or [`validate`]."""

    name: str
    model: ModelSpec
    data: DataSpec
    stages: list[Stage]
    seed: int = 42
    description: str | None = None
    source: str | None = field(default=None, metadata={"yaml": False})  # the YAML file it came from

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"`stage` {name!r} is not in recipe {self.name!r}; stages: {[s.name for s in self.stages]}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able data that [`validate`] turns back into the same recipe."""
        out = {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "model": _yaml_fields(self.model),
            "data": _yaml_fields(self.data),
            "stages": [stage.to_dict() for stage in self.stages],
        }
        return {key: value for key, value in out.items() if value is not None}


def _yaml_fields(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.metadata.get("yaml", True)}


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
        distills = kind == "distill" or (kind == "prune" and stage.recovery == "distill")
        stage.training = config_kwargs("training", stage.training, f"{path}.training", distills=distills)
    if kind == "prune":
        stage.pruning = config_kwargs("pruning", stage.pruning, f"{path}.pruning")
    if kind == "quantize":
        from hf_compress.quantization.quantize import quantize_int8

        stage.quantization = function_kwargs(quantize_int8, stage.quantization, f"{path}.quantization")
    if kind == "prune_vocabulary":
        from hf_compress.vocabulary.prune import prune_vocabulary

        # model, tokenizer and corpus come from the pipeline (the corpus: train texts + `corpus_files`)
        stage.vocabulary = function_kwargs(prune_vocabulary, stage.vocabulary, f"{path}.vocabulary", skip=3)
    if kind == "distill":
        stage.student = student_kwargs(stage.student, f"{path}.student")
    return stage


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
    >>> from hf_compress.recipes.schema import validate
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
    >>> from hf_compress.recipes.schema import load_recipe
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


def recipe_hash(stage: Stage, recipe: Recipe | None = None) -> str:
    """A short stable hash of a stage's resolved config, to decide whether a finished stage can be reused.

    With ``recipe`` the hash also covers what the stage's input depends on (seed, model, data and every earlier
    stage), so editing an earlier stage invalidates the later ones.

    Example:

    ```python
    >>> recipe_hash(Stage(type="evaluate", name="evaluate")) == recipe_hash(Stage(type="evaluate", name="evaluate"))
    True
    ```
    """
    payload: dict[str, Any] = {"stage": stage.to_dict()}
    if recipe is not None:
        index = next(i for i, s in enumerate(recipe.stages) if s.name == stage.name)
        full = recipe.to_dict()
        payload |= {key: full[key] for key in ("seed", "model", "data")} | {"before": full["stages"][:index]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dump_resolved(recipe: Recipe) -> str:
    """The resolved recipe as YAML: absolute paths, coerced values, every stage named; loads back identically."""
    header = "# Resolved by hf-compress" + (f" from {recipe.source}" if recipe.source else "") + "\n"
    return header + yaml.safe_dump(recipe.to_dict(), sort_keys=False)
