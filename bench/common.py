"""Shared helpers of the bench scripts: thread setup, machine description, timing statistics and the JSON writer.

Bench scripts run as plain scripts (``python bench/bench_pruning.py``), so they import this module as ``common``.
Timings are wall-clock medians: the median of ``repeats`` runs after ``warmup`` untimed ones, which is robust to the
occasional slow run on a shared machine; min / max / quartiles are kept so the spread stays visible.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def setup_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count when ``threads`` is given; print and return the count in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"`threads` must be >= 1, got {threads}.")
        torch.set_num_threads(threads)
    count = torch.get_num_threads()
    print(f"torch {torch.__version__}, {count} intra-op thread(s), {os.cpu_count()} logical CPU(s)")
    return count


def cpu_model() -> str:
    """The CPU's ``model name`` from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Command line, library versions, threads, CPU and load average: everything needed to read a result later."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "logical_cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min, max, mean and count of ``times`` (same unit as the input)."""
    if not times:
        raise ValueError("`times` is empty; time at least one run.")
    ordered = sorted(times)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "p25": quartiles[0],
        "p75": quartiles[2],
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
        "n": len(ordered),
    }


def time_ms(fns: Mapping[str, Callable[[], object]], repeats: int = 10, warmup: int = 2) -> dict[str, dict]:
    """Wall time in milliseconds of each callable of ``fns``: :func:`summarize` of ``repeats`` timed runs.

    The callables are timed interleaved (run ``i`` of each one back to back) after ``warmup`` untimed rounds, so a
    load change on a shared machine hits all of them alike. Runs under ``torch.inference_mode``, like
    ``hf_compress.reporting.measure.measure_latency``.

    Example:

    >>> stats = time_ms({"dense": lambda: dense(**inputs), "pruned": lambda: pruned(**inputs)}, repeats=20)
    >>> stats["dense"]["median"] / stats["pruned"]["median"]  # doctest: +SKIP
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"`repeats` must be >= 1 and `warmup` >= 0, got {repeats} and {warmup}.")
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for run in range(warmup + repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                if run >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    return {name: summarize(values) for name, values in times.items()}


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step of a ``Trainer`` run.

    A step is timed from one ``on_step_begin`` to the next, so it covers forward, backward, the optimizer step, every
    callback's ``on_pre_optimizer_step`` / ``on_optimizer_step`` / ``on_step_end`` work and fetching the next batch,
    whatever the order of the callbacks. The last step has no successor and is not timed.
    """

    def __init__(self):
        self._starts: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._starts.append(time.perf_counter())

    def step_times(self, skip: int = 0) -> list[float]:
        """Seconds of each timed step, leaving out the first ``skip`` (warm-up) steps."""
        times = [b - a for a, b in zip(self._starts, self._starts[1:])]
        return times[skip:]


def write_json(payload: dict, path: str | os.PathLike) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
