r"""The typed recipe: what a validated YAML file becomes, and what every stage of the pipeline reads.

A recipe names a teacher (:class:`ModelSpec`), a dataset (:class:`DataSpec`) and an ordered list of
:class:`Stage`\ s. The stage sections ``training``, ``pruning``, ``quantization``, ``vocabulary`` and ``student``
hold keyword arguments of ``DistillationConfig`` / ``TrainingArguments`` / ``PruningConfig`` / the quantisation and
vocabulary functions / ``make_student``, type-checked by :mod:`hf_compress.recipes.validate`. Each rule about the
shape of a recipe (stage kinds, the sections they take, defaults) is written here once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml


class RecipeError(ValueError):
    """A recipe (or a ``--set`` override) is malformed; the message is one sentence naming the key and the fix."""


Task = Literal["sequence-classification", "causal-lm", "sentence-embedding"]
TASKS: tuple[str, ...] = get_args(Task)
StageType = Literal[
    "finetune_teacher", "distill", "prune", "prune_vocabulary", "quantize", "evaluate", "card", "export_onnx"
]
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
    "export_onnx": ("export",),
}
MODEL_STAGES = ("finetune_teacher", "distill", "prune", "prune_vocabulary", "quantize")  # stages that write a model
TRAINING_STAGES = ("finetune_teacher", "distill", "prune")
RESERVED_TRAINING_KEYS = ("output_dir",)  # the pipeline writes each stage into its own folder
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
    """The ``data`` section, with its defaults; validation makes the file paths absolute."""

    train: str | None = None
    eval: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    column_names: list[str] | None = None  # headerless csv/tsv files (GLUE CoLA): one name per column
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = None  # classification: "label" unless set (see `label_key`)
    label_names: list[str] | None = None  # names of the integer labels 0..n-1 (config.id2label)
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    block_size: int = 128

    def label_key(self, task: str) -> str | None:
        """The label column of ``task``: ``label_column`` (default ``"label"``) for classification and sentence
        pairs, none for LM."""
        return None if task == "causal-lm" else self.label_column or "label"


@dataclass
class Stage:
    """One stage; its sections are plain dicts of config fields / function kwargs, already type-checked."""

    type: StageType
    name: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)  # export_onnx kwargs (quantize, opset, per_channel, ...)
    recovery: Recovery = "distill"
    vocabulary: dict[str, Any] = field(default_factory=dict)  # prune_vocabulary kwargs (min_count, extra_ids, ...)
    corpus_files: list[str] = field(default_factory=list)  # .txt files (one text a line) counted with the train set

    @property
    def distills(self) -> bool:
        """Whether the stage trains with a teacher (``distill``, or ``prune`` recovering by distillation)."""
        return self.type == "distill" or (self.type == "prune" and self.recovery == "distill")

    @property
    def student_model(self) -> str | None:
        """The folder of a given student (``student: {model: ...}``), or ``None`` when ``make_student`` builds it."""
        return self.student.get("model")

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
            "model": yaml_fields(self.model),
            "data": yaml_fields(self.data),
            "stages": [stage.to_dict() for stage in self.stages],
        }
        return {key: value for key, value in out.items() if value is not None}


def yaml_fields(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.metadata.get("yaml", True)}


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
