"""Run exported ONNX graphs with ONNX Runtime: sessions with a fixed thread count, accuracy on a tokenised dataset,
and latency at given batch sizes.

Pure functions on a graph path (or an open ``InferenceSession``) and plain arrays: no Trainer, no recipe. The feeds
follow the graph's declared inputs, so the same call serves graphs with and without ``token_type_ids``.
``onnxruntime`` is an optional dependency (``pip install "hf-compress[onnx]"``), imported on first use.
"""

from __future__ import annotations

import importlib
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ONNX_EXTRA = 'pip install "hf-compress[onnx]"'
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def require(module: str) -> Any:
    """Import the optional dependency ``module`` (``onnx``, ``onnxruntime``), or fail naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"ONNX export needs `{module}`, which is not installed; run `{ONNX_EXTRA}`.") from err


def onnx_session(model: str | os.PathLike | Any, num_threads: int | None = None, spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session of the graph file ``model`` with ``num_threads`` intra-op threads.

    Args:
        model (`str`, `os.PathLike` or `onnxruntime.InferenceSession`):
            A `.onnx` file; an open session is returned unchanged.
        num_threads (`int`, *optional*):
            `SessionOptions.intra_op_num_threads` (inter-op is 1: the graphs run sequentially); ONNX Runtime's
            default (all physical cores) when `None`.
        spinning (`bool`, *optional*, defaults to `False`):
            Let idle intra-op threads busy-wait for the next call (ONNX Runtime's default). Off here: spinning threads
            steal the cores from whatever runs next (a PyTorch model timed in the same loop, other processes).

    Example:

    >>> from hf_compress.export import onnx_session
    >>> session = onnx_session("out/pruned/onnx/model_quantized.onnx", num_threads=2)  # doctest: +SKIP
    """
    ort = require("onnxruntime")
    if isinstance(model, ort.InferenceSession):
        return model
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"`model` must be an existing .onnx file, got {str(path)!r}; export it first.")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"`num_threads` must be a positive integer, got {num_threads!r}.")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def session_feeds(session: Any, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The int64 arrays of ``inputs`` that ``session`` declares; ``token_type_ids`` default to zeros if absent."""
    names = [i.name for i in session.get_inputs()]
    feeds = {}
    for name in names:
        if name in inputs:
            value = inputs[name]
            feeds[name] = (value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)).astype(np.int64)
        elif name == "token_type_ids" and "input_ids" in inputs:
            feeds[name] = np.zeros(np.shape(inputs["input_ids"]), dtype=np.int64)
        else:
            raise ValueError(f"`inputs` has no {name!r}, which the graph needs; got {sorted(inputs)}.")
    return feeds


def run_onnx(session: Any, inputs: Mapping[str, Any]) -> np.ndarray:
    """The first output (``logits``) of ``session`` on ``inputs`` (numpy arrays or torch tensors)."""
    return session.run(None, session_feeds(session, inputs))[0]


def pad_batch(rows: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pad the token columns of ``rows`` (``input_ids`` with ``pad_token_id``, the others with 0)."""
    length = max(len(row["input_ids"]) for row in rows)
    batch = {}
    for name in TEXT_INPUTS:
        if name not in rows[0]:
            continue
        fill = pad_token_id if name == "input_ids" else 0
        array = np.full((len(rows), length), fill, dtype=np.int64)
        for i, row in enumerate(rows):
            array[i, : len(row[name])] = row[name]
        batch[name] = array
    return batch


def evaluate_onnx(
    model: str | os.PathLike | Any,
    dataset: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    num_threads: int | None = None,
    pad_token_id: int = 0,
    label_column: str = "labels",
    collator: Callable[[list], Mapping[str, Any]] | None = None,
) -> dict[str, float]:
    """Classification accuracy of an ONNX graph on a tokenised dataset.

    Args:
        model (`str`, `os.PathLike` or `onnxruntime.InferenceSession`):
            The `.onnx` file (or an open session) whose first output is `logits` of shape `(batch, num_labels)`.
        dataset (`Iterable[dict]`):
            Rows with `input_ids`, optionally `attention_mask` / `token_type_ids`, and an integer label (e.g. the eval
            split of `hf_compress.recipes.data.load_text_dataset`).
        batch_size (`int`, *optional*, defaults to 32):
            Rows per ONNX Runtime call.
        num_threads (`int`, *optional*):
            Intra-op threads of the session built from a path.
        pad_token_id (`int`, *optional*, defaults to 0):
            Id used to right-pad `input_ids` (`tokenizer.pad_token_id`); ignored when `collator` is given.
        label_column (`str`, *optional*, defaults to `"labels"`):
            Column holding the label.
        collator (`Callable`, *optional*):
            Builds a batch from a list of rows instead of right padding (e.g. `DataCollatorWithPadding`).

    Returns:
        `dict`: `{"accuracy": float, "samples": int}`.

    Example:

    >>> from hf_compress.export import evaluate_onnx
    >>> evaluate_onnx("out/pruned/onnx/model_quantized.onnx", eval_dataset, num_threads=2)  # doctest: +SKIP
    {'accuracy': 0.8761, 'samples': 872}
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    session = onnx_session(model, num_threads)
    correct = total = 0
    rows: list[Mapping[str, Any]] = []

    def flush() -> None:
        nonlocal correct, total
        if label_column not in rows[0]:
            raise ValueError(f"`label_column` {label_column!r} is not a column of `dataset`; got {sorted(rows[0])}.")
        labels = np.asarray([int(row[label_column]) for row in rows])
        features = [{k: v for k, v in row.items() if k in TEXT_INPUTS} for row in rows]
        batch = collator(features) if collator is not None else pad_batch(features, pad_token_id)
        predictions = run_onnx(session, batch).argmax(-1)
        correct += int((predictions == labels).sum())
        total += len(rows)
        rows.clear()

    for row in dataset:
        rows.append(row)
        if len(rows) == batch_size:
            flush()
    if rows:
        flush()
    if total == 0:
        raise ValueError("`dataset` has no rows to evaluate; pass a non-empty tokenised dataset.")
    return {"accuracy": correct / total, "samples": total}


def batch_rows(inputs: Mapping[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """Rows of ``inputs`` cycled to exactly ``batch_size`` rows (as ``reporting.measure`` does for PyTorch)."""
    out = {}
    for name, value in inputs.items():
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        out[name] = array[np.arange(batch_size) % array.shape[0]]
    return out


def onnx_latency(
    model: str | os.PathLike | Any,
    inputs: Mapping[str, Any],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    num_threads: int | None = None,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, float]:
    """Median wall time in milliseconds of one ONNX Runtime call at each batch size.

    Args:
        model (`str`, `os.PathLike` or `onnxruntime.InferenceSession`):
            The `.onnx` file (or an open session).
        inputs (`dict`):
            Example token arrays (e.g. real sentences padded to 64 tokens) whose rows are cycled to each batch size.
        batch_sizes (`Sequence[int]`, *optional*, defaults to `(1, 32)`):
            Batch sizes to time.
        num_threads (`int`, *optional*):
            Intra-op threads of the session built from a path (use the PyTorch side's `torch.get_num_threads()` for
            a fair comparison).
        repeats (`int`, *optional*, defaults to 10):
            Timed calls per batch size, after `warmup` untimed ones.
        warmup (`int`, *optional*, defaults to 2):
            Untimed calls per batch size.

    Returns:
        `dict[str, float]`: `{"1": ms, "32": ms}`, the layout of `model_report(...)["latency_ms"]`.

    Example:

    >>> from hf_compress.export import onnx_latency
    >>> onnx_latency("out/pruned/onnx/model_quantized.onnx", inputs, num_threads=2)  # doctest: +SKIP
    {'1': 1.9, '32': 31.2}
    """
    if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"`repeats` must be >= 1 and `warmup` >= 0, got {repeats!r} and {warmup!r}.")
    if any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"`batch_sizes` must be positive integers, got {list(batch_sizes)}.")
    session = onnx_session(model, num_threads)
    out = {}
    for batch_size in batch_sizes:
        feeds = session_feeds(session, batch_rows(inputs, batch_size))
        times = []
        for step in range(warmup + repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            if step >= warmup:
                times.append((time.perf_counter() - start) * 1000)
        out[str(batch_size)] = statistics.median(times)
    return out
