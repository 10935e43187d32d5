"""Measure a (compressed) model: parameters, sparsity, bytes, CPU latency and eval metrics, as plain JSON dicts.

Pure functions, no Trainer: :func:`model_report` measures one model, :func:`compare` turns a reference report and a
compressed one into ratios, :func:`summary_row` and :func:`format_table` print them. The library's one byte counter
(:func:`model_size_bytes`), one dummy-input builder (:func:`dummy_inputs`) and one byte formatter (:func:`human_bytes`)
live here.
"""

from __future__ import annotations

import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from hf_compress.quantization.layers import Int8Embedding, Int8Linear, is_conv1d, unpack_int4

LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "wer", "cer")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
NOT_QUALITY = ("runtime", "per_second", "epoch", "steps", "flos")  # Trainer bookkeeping in eval dicts


def quality_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """The metrics that measure model quality (drops Trainer bookkeeping such as ``eval_runtime`` or ``epoch``)."""
    return {k: v for k, v in (metrics or {}).items() if not any(word in k for word in NOT_QUALITY)}


def metric_name(key: str) -> str:
    """A metric's name without the Trainer's split prefix: ``eval_accuracy`` -> ``accuracy``."""
    return re.sub(r"^(eval|test)_", "", key)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and non-zero weights of ``model`` (int8-quantised weights count as the weights they encode).

    Returns a dict with ``total``, ``nonzero``, ``linear_total`` and ``linear_nonzero`` (the 2-D Linear weights that
    pruning targets; embeddings, norms and biases excluded).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch `nn.Module`, got {type(model).__name__}.")
    counts = dict(total=0, nonzero=0, linear_total=0, linear_nonzero=0)
    seen: set[int] = set()
    for module in model.modules():
        own = list(module.named_parameters(recurse=False))
        if isinstance(module, Int8Linear | Int8Embedding):
            codes = module.qweight
            if isinstance(module, Int8Embedding) and module.group_size:  # asymmetric: code 0 is not weight 0
                codes = module.weight
            elif isinstance(module, Int8Embedding) and module.bits == 4:
                codes = unpack_int4(codes, module.embedding_dim)
            own.append(("weight", codes))
            if isinstance(module, Int8Linear) and module.bias is not None:
                own.append(("bias", module.bias))
        is_linear = isinstance(module, nn.Linear | Int8Linear) or is_conv1d(module)
        for name, tensor in own:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total, nonzero = tensor.numel(), int(torch.count_nonzero(tensor.detach()))
            counts["total"] += total
            counts["nonzero"] += nonzero
            if is_linear and name == "weight":
                counts["linear_total"] += total
                counts["linear_nonzero"] += nonzero
    return counts


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers of ``model``, counting shared tensors once.

    >>> model_size_bytes(nn.Linear(4, 2))  # 8 weights + 2 biases, 4 bytes each
    40
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch `nn.Module`, got {type(model).__name__}.")
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def folder_size_bytes(path: str | Path, weights_only: bool = False) -> int:
    """Sum of the sizes of the files under ``path`` (only weight files when ``weights_only``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"`path` must be an existing folder, got {str(path)!r}.")
    files = (f for f in path.rglob("*") if f.is_file())
    return sum(f.stat().st_size for f in files if not weights_only or f.name.endswith(WEIGHT_SUFFIXES))


def _device(model: nn.Module) -> torch.device:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def measure_latency(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], repeats: int = 10, warmup: int = 2
) -> dict[str, float]:
    """Median / min / max wall time in milliseconds of ``model(**inputs)`` under ``torch.inference_mode``.

    Example:

    >>> timing = measure_latency(nn.Linear(4, 2), {"input": torch.ones(8, 4)}, repeats=3)
    >>> timing["repeats"], timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
    (3, True)
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive integer, got {repeats!r}.")
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError(f"`inputs` must be a non-empty dict of tensors, got {type(inputs).__name__}.")
    device = _device(model)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    times = []
    with torch.inference_mode():
        for step in range(warmup + repeats):
            start = time.perf_counter()
            model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    model.train(was_training)
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), repeats=repeats)


def _batch_of(inputs: Mapping[str, torch.Tensor], batch_size: int) -> dict[str, torch.Tensor]:
    """Rows of ``inputs`` cycled to exactly ``batch_size`` rows."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            index = torch.arange(batch_size) % value.shape[0]
            out[key] = value[index]
        else:
            out[key] = value
    return out


def dummy_inputs(vocab_size: int, batch_size: int = 1, seq_len: int = 8) -> dict[str, torch.Tensor]:
    """Fixed (seeded) random token ids and an all-ones attention mask, avoiding the first ids (usually special).

    >>> inputs = dummy_inputs(100, batch_size=2, seq_len=4)
    >>> inputs["input_ids"].shape, bool(inputs["attention_mask"].all())
    (torch.Size([2, 4]), True)
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be a positive integer, got {vocab_size!r}.")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab_size - 1), vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def model_report(
    model: nn.Module,
    path: str | Path | None = None,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    latency_inputs: Mapping[str, torch.Tensor] | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 10,
    seq_len: int = 64,
) -> dict:
    """Measure ``model`` into a JSON-serialisable dict.

    Args:
        model (`nn.Module`): the model to measure (float, pruned or int8-quantised).
        path (`str` or `Path`, *optional*): the folder it was saved to; adds ``disk_bytes`` and
            ``weights_disk_bytes``.
        eval_fn (`Callable[[nn.Module], dict[str, float]]`, *optional*): returns eval metrics, stored as ``metrics``.
        latency_inputs (`dict[str, torch.Tensor]`, *optional*): example inputs whose rows are cycled to each batch
            size; by default random token ids of length ``seq_len``.
        batch_sizes (`Sequence[int]`, *optional*, defaults to `(1, 32)`): batch sizes to time; empty to skip timing.
        repeats (`int`, *optional*, defaults to 10): timed runs per batch size (the median is reported).
        seq_len (`int`, *optional*, defaults to 64): length of the default dummy inputs.

    Example:

    >>> from hf_compress.reporting.measure import compare, model_report
    >>> teacher, student = nn.Linear(8, 8), nn.Linear(8, 2)
    >>> report = model_report(student, batch_sizes=())
    >>> report["params"], report["memory_bytes"]
    ({'total': 18, 'nonzero': 18}, 72)
    >>> compare(model_report(teacher, batch_sizes=()), report)["size_x"]
    4.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch `nn.Module`, got {type(model).__name__}.")
    if any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"`batch_sizes` must be positive integers, got {list(batch_sizes)}.")
    counts = count_parameters(model)
    report = {
        "params": {"total": counts["total"], "nonzero": counts["nonzero"]},
        "sparsity": 1 - counts["nonzero"] / counts["total"] if counts["total"] else 0.0,
        "linear_sparsity": 1 - counts["linear_nonzero"] / counts["linear_total"] if counts["linear_total"] else 0.0,
        "memory_bytes": model_size_bytes(model),
        "quantized": any(isinstance(m, Int8Linear | Int8Embedding) for m in model.modules()),
    }
    if path is not None:
        report["disk_bytes"] = folder_size_bytes(path)
        report["weights_disk_bytes"] = folder_size_bytes(path, weights_only=True)
    if batch_sizes:
        inputs = latency_inputs
        if inputs is None:
            vocab = getattr(getattr(model, "config", None), "vocab_size", None)
            if not vocab:
                raise ValueError("`latency_inputs` must be given for a model without `config.vocab_size`.")
            inputs = dummy_inputs(vocab, seq_len=seq_len)
        report["latency_ms"] = {
            str(b): measure_latency(model, _batch_of(inputs, b), repeats=repeats)["median_ms"] for b in batch_sizes
        }
        report["latency_setup"] = {
            "device": str(_device(model)),
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "repeats": repeats,
        }
    if eval_fn is not None:
        metrics = eval_fn(model)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"`eval_fn` must return a dict of metrics, got {type(metrics).__name__}.")
        report["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return report


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _bytes(report: Mapping) -> int | None:
    return report.get("disk_bytes", report.get("memory_bytes"))


def compare(reference_report: Mapping, report: Mapping) -> dict:
    """Ratios of ``report`` against ``reference_report`` (both from :func:`model_report`).

    Returns ``size_x`` (reference bytes / bytes; disk bytes when both were saved, else memory), ``params_x``,
    ``speedup_x`` per batch size (reference latency / latency) and ``retention_pct`` per shared metric
    (100 * value / reference, inverted for lower-is-better metrics such as ``loss`` or ``perplexity``).
    """
    for name, value in (("reference_report", reference_report), ("report", report)):
        if not isinstance(value, Mapping) or "params" not in value:
            raise ValueError(f"`{name}` must be a dict returned by `model_report`, got {type(value).__name__}.")
    both_disk = "disk_bytes" in reference_report and "disk_bytes" in report
    ref_bytes = reference_report["disk_bytes"] if both_disk else reference_report["memory_bytes"]
    new_bytes = report["disk_bytes"] if both_disk else report["memory_bytes"]
    out = {
        "size_x": _ratio(ref_bytes, new_bytes),
        "size_basis": "disk" if both_disk else "memory",
        "params_x": _ratio(reference_report["params"]["nonzero"], report["params"]["nonzero"]),
        "sparsity": report["sparsity"],
        "linear_sparsity": report.get("linear_sparsity"),
        "speedup_x": {},
        "retention_pct": {},
    }
    for batch, ref_ms in reference_report.get("latency_ms", {}).items():
        if batch in report.get("latency_ms", {}):
            out["speedup_x"][batch] = _ratio(ref_ms, report["latency_ms"][batch])
    ref_metrics, metrics = quality_metrics(reference_report.get("metrics")), quality_metrics(report.get("metrics"))
    for key in sorted(ref_metrics.keys() & metrics.keys()):
        lower_better = any(word in key.lower() for word in LOWER_IS_BETTER)
        value = _ratio(ref_metrics[key], metrics[key]) if lower_better else _ratio(metrics[key], ref_metrics[key])
        out["retention_pct"][key] = None if value is None else 100 * value
    return out


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units.

    >>> human_bytes(512), human_bytes(1_234_567), human_bytes(3e12)
    ('512 B', '1.2 MB', '3000.0 GB')
    """
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def summary_row(name: str, report: Mapping, reference: Mapping | None = None) -> dict[str, str]:
    """One human-readable table row for ``report`` (with ratios to ``reference`` when given)."""
    row = {
        "model": name,
        "params (nonzero)": f"{report['params']['nonzero']:,}",
        "size": human_bytes(_bytes(report)),
        "sparsity (linear)": f"{100 * report.get('linear_sparsity', report['sparsity']):.1f}%",
    }
    for batch, ms in report.get("latency_ms", {}).items():
        row[f"latency bs={batch}"] = f"{ms:.1f} ms"
    for key, value in quality_metrics(report.get("metrics")).items():
        row[key] = f"{value:.4g}"
    if reference is not None:
        ratios = compare(reference, report)
        row["size x"] = "-" if ratios["size_x"] is None else f"{ratios['size_x']:.2f}x"
        for batch, speed in ratios["speedup_x"].items():
            row[f"speedup bs={batch}"] = "-" if speed is None else f"{speed:.2f}x"
        for key, pct in ratios["retention_pct"].items():
            row[f"{key} retention"] = "-" if pct is None else f"{pct:.1f}%"
    return row


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[Mapping], markdown: bool = False) -> str:
    """A plain-text (or Markdown) table of ``rows``; columns are the union of their keys, in first-seen order.

    Example:

    >>> print(format_table([{"model": "teacher", "params": 22_000_000}, {"model": "student", "params": 11_000_000}]))
    model    params
    -------  ----------
    teacher  22,000,000
    student  11,000,000
    """
    if isinstance(rows, Mapping) or not all(isinstance(r, Mapping) for r in rows):
        raise TypeError("`rows` must be a list of dicts, one per table row.")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(col)) if col in row else "" for col in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)
