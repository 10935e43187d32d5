"""Cached teacher outputs: run the teacher once over a dataset, then distil from the stored logits.

[`cache_teacher_outputs`] adds the teacher's logits to a `datasets.Dataset` as columns ([`CACHE_COLUMNS`]):

| head | columns | exact? |
|---|---|---|
| sequence classification | `teacher_logits` `[num_labels]` | yes |
| token classification | `teacher_logits` `[seq, num_labels]` | yes |
| question answering | `teacher_start_logits`, `teacher_end_logits` `[seq]` | yes (see padding below) |
| causal / masked LM, `top_k=None` | `teacher_logits` `[seq, vocab]` | yes, but `seq * vocab` floats per example |
| causal / masked LM, `top_k=k` | `teacher_topk_values`, `teacher_topk_indices` `[seq, k]` | renormalised top-k |

With `top_k=k` the soft term uses the teacher distribution `softmax(values / T)` over its `k` largest logits and zero
elsewhere (see [`~hf_compress.distillation.losses.TopKLogits`]): exact for `k = vocab`, and otherwise it drops the
teacher's tail mass beyond the top `k` (small for peaked LM distributions: `k = 64` typically keeps > 95 %), and it
supports only the forward-KL divergence. Values are stored per example without padding; [`TeacherCacheCollator`]
pads them like the batch (zeros, or `-1e4` for QA logits so that padding gets no teacher mass: identical to the
live teacher when no padding is added, e.g. `padding="max_length"`).

The cache is keyed by [`teacher_fingerprint`]: a hash of the teacher's config and every weight byte, the dataset's
fingerprint, the collator's settings, the batch size, `top_k` and the dtype. With `cache_dir`, it is saved with
`save_to_disk` under `cache_dir/<fingerprint>` and reloaded when the fingerprint matches, so a changed teacher or
dataset is never served stale logits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from torch import nn
from transformers import default_data_collator
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import logging

from hf_compress.distillation.losses import TopKLogits
from hf_compress.distillation.teacher import distilled_head
from hf_compress.models.heads import LM_HEADS

logger = logging.get_logger(__name__)

CACHE_COLUMNS = (
    "teacher_logits",
    "teacher_start_logits",
    "teacher_end_logits",
    "teacher_topk_values",
    "teacher_topk_indices",
)
"""Dataset columns holding cached teacher outputs."""
CACHE_FORMAT_VERSION = 1
QA_PAD_LOGIT = -1e4
_TOKEN_LEVEL_ALWAYS = {"teacher_start_logits", "teacher_end_logits", "teacher_topk_values", "teacher_topk_indices"}
_TARGET_COLUMNS = {"labels", "label", "label_ids", "start_positions", "end_positions"}


def has_teacher_cache(dataset: Any) -> bool:
    """Whether `dataset` (a `datasets.Dataset` or anything with `column_names`) holds cached teacher columns."""
    return bool(set(getattr(dataset, "column_names", None) or ()) & set(CACHE_COLUMNS))


def pop_teacher_outputs(inputs: dict[str, Any]) -> dict[str, torch.Tensor | TopKLogits] | None:
    """Remove the cache columns from a collated batch and return them as teacher outputs (`None` if absent)."""
    found = {key: inputs.pop(key) for key in CACHE_COLUMNS if key in inputs}
    if not found:
        return None
    outputs: dict[str, torch.Tensor | TopKLogits] = {}
    if "teacher_topk_values" in found:
        outputs["logits"] = TopKLogits(found["teacher_topk_values"], found["teacher_topk_indices"])
    if "teacher_logits" in found:
        outputs["logits"] = found["teacher_logits"]
    for key in ("start_logits", "end_logits"):
        if f"teacher_{key}" in found:
            outputs[key] = found[f"teacher_{key}"]
    return outputs


@dataclasses.dataclass
class TeacherCacheCollator:
    """
    Wraps a data collator: the cache columns are taken out of the features, the rest is collated by `collator`, and
    the cached values are stacked, padded on `padding_side` to the batch's `input_ids` length when token-level.

    Args:
        collator (`Callable`): The collator of the other columns (e.g. `DataCollatorWithPadding`).
        padding_side (`str`, *optional*, defaults to `"right"`): Must match the collator's tokenizer.
    """

    collator: Callable
    padding_side: Literal["left", "right"] = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [key for key in CACHE_COLUMNS if key in features[0]]
        stripped = [{k: v for k, v in f.items() if k not in CACHE_COLUMNS} for f in features]
        batch = self.collator(stripped)
        if not keys:
            return batch
        length = batch["input_ids"].shape[-1] if "input_ids" in batch else None
        for key in keys:
            values = [torch.as_tensor(f[key]) for f in features]
            token_level = key in _TOKEN_LEVEL_ALWAYS or values[0].dim() >= 2
            if token_level and length is not None:
                fill = QA_PAD_LOGIT if key in ("teacher_start_logits", "teacher_end_logits") else 0
                values = [_pad(v, length, fill, self.padding_side) for v in values]
            batch[key] = torch.stack(values)
        return batch


def _pad(value: torch.Tensor, length: int, fill: float, side: str) -> torch.Tensor:
    missing = length - value.shape[0]
    if missing < 0:
        raise ValueError(
            f"A cached teacher column has {value.shape[0]} positions but the batch has {length}; cache the teacher "
            "outputs with the collator (and truncation) used for training."
        )
    if missing == 0:
        return value
    pad = value.new_full((missing, *value.shape[1:]), fill)
    return torch.cat([pad, value] if side == "left" else [value, pad])


def _describe(obj: Any) -> Any:
    """A stable, JSON-able description of a collator or tokenizer (its settings, not its memory address)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_describe(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _describe(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if hasattr(obj, "get_vocab") and hasattr(obj, "padding_side"):  # a tokenizer
        return {"class": type(obj).__name__, "name": getattr(obj, "name_or_path", None), "size": len(obj),
                "padding_side": obj.padding_side, "truncation_side": getattr(obj, "truncation_side", None),
                "pad_token_id": obj.pad_token_id, "model_max_length": obj.model_max_length}  # fmt: skip
    if dataclasses.is_dataclass(obj):
        fields = {f.name: _describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"class": type(obj).__name__, **fields}
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '')}.{obj.__qualname__}"
    return repr(obj)


def teacher_fingerprint(
    teacher: nn.Module, dataset: datasets.Dataset, collator: Callable | None, batch_size: int, top_k: int | None,
    dtype: str = "float32",
) -> str:  # fmt: skip
    """
    Hex digest identifying a teacher cache: teacher config and all weight bytes, the dataset's fingerprint, the
    collator's settings, `batch_size` (padding changes the numerics), `top_k`, `dtype` and the cache format version.

    Hashing every weight costs about one second per GB of weights: cheap next to one pass of the teacher.
    """
    teacher = unwrap_peft_model(teacher)
    digest = hashlib.blake2b(digest_size=16)
    config = teacher.config.to_dict() if hasattr(teacher, "config") else {}
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version")}
    header = {"version": CACHE_FORMAT_VERSION, "class": type(teacher).__name__, "config": config,
              "dataset": dataset._fingerprint, "collator": _describe(collator), "batch_size": batch_size,
              "top_k": top_k, "dtype": dtype}  # fmt: skip
    digest.update(json.dumps(header, sort_keys=True, default=repr).encode())
    for name, tensor in teacher.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_teacher_outputs(
    teacher: nn.Module,
    dataset: datasets.Dataset,
    collator: Callable | None = None,
    batch_size: int = 32,
    top_k: int | None = None,
    cache_dir: str | Path | None = None,
    dtype: Literal["float32", "float16"] = "float32",
) -> datasets.Dataset:
    """
    Run `teacher` once over `dataset` and return it with the teacher's logits as extra columns (see the module doc).

    Train from the result with `DistillationTrainer(model=student, teacher_model=None, train_dataset=cached, ...)`:
    no teacher forward runs during training. Use the same collator (and truncation) as for training.

    Args:
        teacher (`PreTrainedModel`): Classification, token classification, QA, causal LM or masked LM model, used as
            is (device, dtype); put it in the training dtype first to cache what the live teacher would compute.
        dataset (`datasets.Dataset`): Tokenized examples; columns the teacher's `forward` does not accept and the
            targets (`labels`, `start_positions`, ...) are not passed to the teacher but kept.
        collator (`Callable`, *optional*): Builds teacher batches; defaults to `default_data_collator`.
        batch_size (`int`, *optional*, defaults to 32): Teacher batch size.
        top_k (`int`, *optional*): LM heads only: store the `top_k` largest logits per position (and their indices)
            instead of the full vocabulary. `None` stores every logit (exact, `seq * vocab` floats per example).
        cache_dir (`str`, *optional*): Save under `cache_dir/<fingerprint>` and reuse a matching saved cache.
        dtype (`str`, *optional*, defaults to `"float32"`): Storage dtype of the logits (`"float16"` halves them).

    >>> cached = cache_teacher_outputs(teacher, tokenized, DataCollatorWithPadding(tok), top_k=64)  # doctest: +SKIP
    >>> trainer = DistillationTrainer(model=student, teacher_model=None, train_dataset=cached)  # doctest: +SKIP
    """
    head = distilled_head(teacher)
    if head is None or head == "seq2seq_lm":
        raise ValueError(
            f"`teacher` of class {type(teacher).__name__} cannot be cached; use a classification, QA, causal LM or "
            "masked LM model (or distil with the live teacher)."
        )
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"`dataset` must be a `datasets.Dataset`, got {type(dataset).__name__}; wrap it first.")
    if top_k is not None and (head not in LM_HEADS or top_k < 1):
        raise ValueError(f"`top_k` must be None or a positive int for LM teachers only, got {top_k} for {head}.")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"`dtype` must be one of ['float32', 'float16'], got {dtype!r}.")
    dataset = dataset.remove_columns([c for c in CACHE_COLUMNS if c in dataset.column_names])
    fingerprint = teacher_fingerprint(teacher, dataset, collator, batch_size, top_k, dtype)
    path = None if cache_dir is None else Path(cache_dir) / fingerprint
    if path is not None and (path / "dataset_info.json").is_file():
        logger.info(f"Reusing the cached teacher outputs at {path}.")
        return datasets.load_from_disk(str(path))

    collator = collator or default_data_collator
    tokenizer = getattr(collator, "tokenizer", None)
    side = getattr(tokenizer, "padding_side", "right")
    accepted = set(inspect.signature(unwrap_peft_model(teacher).forward).parameters) - _TARGET_COLUMNS
    inputs_columns = [c for c in dataset.column_names if c in accepted]
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()

    def run(batch: dict[str, list]) -> dict[str, list]:
        features = [{c: batch[c][i] for c in inputs_columns} for i in range(len(batch[inputs_columns[0]]))]
        inputs = {k: v.to(device) for k, v in collator(features).items() if k in accepted}
        flags = {"use_cache": False} if head == "causal_lm" else {}
        with torch.inference_mode():
            outputs = teacher(**inputs, **flags)
        lengths = [len(f["input_ids"]) if "input_ids" in f else None for f in features]
        return _split(head, outputs, lengths, side, top_k, getattr(torch, dtype))

    cached = dataset.map(run, batched=True, batch_size=batch_size, new_fingerprint=fingerprint,
                         desc="Caching teacher outputs")  # fmt: skip
    teacher.train(was_training)
    if path is not None:
        cached.save_to_disk(str(path))
    return cached


def _split(head, outputs, lengths, side, top_k, dtype) -> dict[str, list]:
    """Per-example, unpadded numpy arrays of the teacher outputs of one batch."""

    def rows(tensor: torch.Tensor) -> list:
        out = []
        for i, length in enumerate(lengths):
            value = tensor[i]
            if head != "seq_cls" and length is not None:
                value = value[value.shape[0] - length :] if side == "left" else value[:length]
            out.append(value.cpu().numpy())
        return out

    if head == "qa":
        return {f"teacher_{k}": rows(outputs[k].to(dtype)) for k in ("start_logits", "end_logits")}
    logits = outputs["logits"]
    if top_k is None:
        return {"teacher_logits": rows(logits.to(dtype))}
    values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    return {"teacher_topk_values": rows(values.to(dtype)), "teacher_topk_indices": rows(indices.int())}
