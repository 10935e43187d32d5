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
import subprocess
import sys
import tempfile
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


def time_ms_in_workers(
    specs: Mapping[str, dict],
    batches: Mapping[str, tuple[int, int]],
    threads: int,
    rounds: int = 3,
    workdir: Path | None = None,
    pause_s: float = 0.2,
) -> dict[str, dict[str, dict]]:
    """Wall time in milliseconds of each model of ``specs``, every model in its own process (``latency_worker.py``).

    This is how a deployment runs one model: nothing else in the process, ONNX Runtime with its default threading
    (idle threads spin), PyTorch with ``threads`` intra-op threads. All workers load first; then, ``rounds`` times,
    each worker in turn (order reversed every other round, a ``pause_s`` pause between turns so the previous worker's
    threads are idle) runs each batch size of ``batches`` (``{"b1": (1, repeats), ...}``) ``repeats`` times while the
    others wait. Returns ``{name: {key: summarize(times)}}`` over all rounds.

    Args:
        specs (`Mapping[str, dict]`): ``{name: {"runtime": "pytorch" | "onnxruntime", "path": ..., "inputs": npz}}``.
        batches (`Mapping[str, tuple[int, int]]`): Batch size and timed repeats per turn, by result key.
        threads (`int`): Intra-op threads of every worker.
        rounds (`int`, *optional*, defaults to 3): Turns per worker.
        workdir (`Path`, *optional*): Where the spec files go (a temporary folder by default).
        pause_s (`float`, *optional*, defaults to 0.2): Idle seconds between two turns.
    """
    if rounds < 1 or any(repeats < 1 or batch < 1 for batch, repeats in batches.values()):
        raise ValueError(f"`rounds` and every batch size and repeat count must be >= 1, got {rounds} and {batches}.")
    worker = Path(__file__).resolve().parent / "latency_worker.py"
    times: dict[str, dict[str, list[float]]] = {name: {key: [] for key in batches} for name in specs}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        procs = {}
        try:
            for name, spec in specs.items():
                spec_file = Path(tmp) / f"{len(procs)}.json"
                spec_file.write_text(json.dumps({**spec, "threads": threads, "batches": dict(batches)}))
                procs[name] = subprocess.Popen(
                    [sys.executable, str(worker), str(spec_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    text=True, bufsize=1,
                )  # fmt: skip
            for name, proc in procs.items():
                line = proc.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"the latency worker of {name!r} failed to start (exit {proc.wait()}).")
            names = list(specs)
            for turn in range(rounds):
                for name in names if turn % 2 == 0 else names[::-1]:
                    time.sleep(pause_s)
                    procs[name].stdin.write("time\n")
                    procs[name].stdin.flush()
                    reply = procs[name].stdout.readline()
                    if not reply:
                        raise RuntimeError(f"the latency worker of {name!r} died (exit {procs[name].wait()}).")
                    for key, values in json.loads(reply).items():
                        times[name][key].extend(values)
        finally:  # closing stdin ends a worker; one that does not end is killed
            for proc in procs.values():
                proc.stdin.close()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return {name: {key: summarize(values) for key, values in by_key.items()} for name, by_key in times.items()}


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
