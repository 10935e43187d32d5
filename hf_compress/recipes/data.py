"""Datasets for recipes: local files or Hub datasets, tokenised for one task.

``load_text_dataset`` turns a recipe's ``data`` section (a :class:`~hf_compress.recipes.schema.DataSpec`) into
tokenised ``(train, eval)`` datasets: classification rows keep their token ids and a ``labels`` column (padding is
left to ``DataCollatorWithPadding``), causal-LM text is concatenated and cut into ``block_size`` blocks whose labels
are the inputs. Sentence-embedding pairs stay text (``sentence1``, ``sentence2``, a 0/1 ``label``): the
``SentenceTransformer`` tokenises them itself.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, load_dataset
from transformers import DataCollatorWithPadding, default_data_collator

from hf_compress.recipes.schema import TASKS, DataSpec, Task

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
# sentence-embedding recipes read .txt files as MRPC's: UTF-8 with BOM, tab-separated, a header, quotes literal
PAIR_TXT_FORMAT = ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "na_filter": False, "encoding": "utf-8-sig"})
PAIR_COLUMNS = ("sentence1", "sentence2")  # the text columns of a sentence-embedding dataset (then `label`)


def file_format(path: str | Path, task: str | None = None) -> tuple[str, dict[str, Any]]:
    """The ``datasets`` builder and its kwargs for a data file of ``task`` (by extension; see ``FILE_FORMATS``)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".txt" and task == "sentence-embedding":
        return PAIR_TXT_FORMAT
    return FILE_FORMATS[suffix]


def as_data_spec(data: DataSpec | Mapping[str, Any] | None) -> DataSpec:
    """A recipe's ``data`` section as a :class:`DataSpec` (a plain mapping of its fields is accepted too)."""
    if isinstance(data, DataSpec):
        return data
    if data is None or isinstance(data, Mapping):
        return DataSpec(**{k: v for k, v in (data or {}).items() if v is not None})
    raise TypeError(f"`data` must be a DataSpec or a mapping of its fields, got {type(data).__name__}.")


def load_raw_split(path: str | Path, column_names: list[str] | None = None, task: str | None = None) -> Dataset:
    """Load one local csv/tsv/json/jsonl/parquet/txt file as a ``Dataset`` (txt files give one ``text`` column).

    ``column_names`` names the columns of a csv/tsv file without a header line (its first line is then data). For
    ``task="sentence-embedding"`` a txt file is read as MRPC's tab-separated format (see :func:`file_format`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(
            f"`data` file {str(path)!r} has unsupported extension {suffix!r}; use one of {sorted(FILE_FORMATS)}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"`data` file {str(path)!r} does not exist; check the path in the recipe.")
    builder, kwargs = file_format(path, task)
    if column_names:
        if builder != "csv":
            raise ValueError(f"`data.column_names` only applies to csv/tsv files, got {str(path)!r}; remove it.")
        kwargs = {**kwargs, "column_names": list(column_names), "header": None}
    return load_dataset(builder, data_files=str(path), split="train", **kwargs)


def _load_splits(spec: DataSpec, task: str | None = None) -> tuple[Dataset, Dataset | None]:
    if spec.hub_id:
        train = load_dataset(spec.hub_id, spec.hub_config, split=spec.train_split)
        evaluation = load_dataset(spec.hub_id, spec.hub_config, split=spec.eval_split) if spec.eval_split else None
        return train, evaluation
    if not spec.train:
        raise ValueError("`data.train` is missing; give a file path or a `data.hub_id`.")
    names = spec.column_names
    evaluation = load_raw_split(spec.eval, names, task) if spec.eval else None
    return load_raw_split(spec.train, names, task), evaluation


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


def _tokenize_classification(dataset: Dataset, tokenizer, spec: DataSpec, labels: ClassLabel | None):
    text, pair, label = spec.text_column, spec.text_pair_column, spec.label_key("sequence-classification")

    def encode(batch):
        args = (batch[text],) if pair is None else (batch[text], batch[pair])
        out = tokenizer(*args, truncation=True, max_length=spec.max_length)
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


def _sentence_pairs(dataset: Dataset, spec: DataSpec, split: str) -> Dataset:
    """``dataset`` as ``sentence1``, ``sentence2`` and an integer 0/1 ``label`` (the pair evaluator's labels)."""
    label = spec.label_key("sentence-embedding")
    values = sorted({int(v) for v in dataset[label]} if len(dataset) else set())
    if set(values) - {0, 1}:
        raise ValueError(
            f"`data.label_column` {label!r} of the {split} data must hold 0/1 pair labels (1 = similar), got "
            f"{values[:5]}; map the labels to 0 and 1."
        )
    first, second = PAIR_COLUMNS
    return Dataset.from_dict(
        {
            first: [str(t) for t in dataset[spec.text_column]],
            second: [str(t) for t in dataset[spec.text_pair_column]],
            "label": [int(v) for v in dataset[label]],
        }
    )


def _tokenize_causal_lm(dataset: Dataset, tokenizer, spec: DataSpec) -> Dataset:
    text, block_size = spec.text_column, spec.block_size
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


def load_text_dataset(
    data_spec: DataSpec | Mapping[str, Any], tokenizer, task: Task, seed: int = 42
) -> tuple[Dataset, Dataset | None]:
    """Load and tokenise a recipe's ``data`` section for ``task``.

    Args:
        data_spec (`DataSpec` or `dict`):
            The recipe's ``data`` section (the fields of `DataSpec`): ``train``/``eval`` file paths (csv, tsv,
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
    spec = as_data_spec(data_spec)
    train, evaluation = _load_splits(spec, task)
    if task == "causal-lm":
        keys = ["text_column"]
    else:
        keys = ["text_column", "text_pair_column", "label_column"]
    for split, dataset in (("train", train), ("eval", evaluation)):
        if dataset is not None:
            columns = [spec.label_key(task) if k == "label_column" else getattr(spec, k) for k in keys]
            _check_columns(dataset, columns, split, keys)

    if task == "causal-lm":
        train = _limit(_tokenize_causal_lm(train, tokenizer, spec), spec.max_train_samples, seed)
        if evaluation is not None:
            evaluation = _limit(_tokenize_causal_lm(evaluation, tokenizer, spec), spec.max_eval_samples, seed)
        return train, evaluation

    if task == "sentence-embedding":
        if spec.text_pair_column is None:
            raise ValueError("`data.text_pair_column` is missing; a sentence-embedding dataset holds sentence pairs.")
        train = _sentence_pairs(_limit(train, spec.max_train_samples, seed), spec, "train")
        if evaluation is not None:
            evaluation = _sentence_pairs(_limit(evaluation, spec.max_eval_samples, seed), spec, "eval")
        return train, evaluation

    labels = _label_feature(train, spec.label_key(task))
    train = _tokenize_classification(_limit(train, spec.max_train_samples, seed), tokenizer, spec, labels)
    if evaluation is not None:
        evaluation = _limit(evaluation, spec.max_eval_samples, seed)
        evaluation = _tokenize_classification(evaluation, tokenizer, spec, labels)
    return train, evaluation


def token_rows(dataset: Dataset, tokenizer, task: Task) -> list[list[int]]:
    """The token id sequences of a split: its ``input_ids``, or (sentence pairs) both sentences tokenised plainly."""
    if task != "sentence-embedding":
        return list(dataset["input_ids"])
    texts = [text for column in PAIR_COLUMNS for text in dataset[column]]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def data_collator(tokenizer, task: Task):
    """The collator for ``task``: dynamic padding for classification, plain stacking for equal-length LM blocks."""
    return DataCollatorWithPadding(tokenizer) if task == "sequence-classification" else default_data_collator
