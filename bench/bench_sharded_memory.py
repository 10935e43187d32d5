"""Per-rank memory of a teacher replicated vs sharded with FSDP2 (``fully_shard``), on 2 CPU processes (gloo).

Each layout runs in its own ``torchrun --nproc_per_node 2`` launch (so one layout's allocations never count against
the other) with the SmolLM2-135M teacher (``builtin:SmolLM2-135M``, fp32) and the same batch on every rank
(``--batch`` x ``--seq`` random tokens, default 4 x 128):

* ``replicated``: every rank holds the whole frozen teacher;
* ``sharded``: ``hf_compress.distributed.shard_teacher`` (what ``DistillationTrainer`` does under FSDP2), one FSDP2
  unit per transformer layer plus the root, on a ``init_device_mesh("cpu", (2,))`` mesh.

What is measured, per rank (the table shows the mean of the two ranks):

* ``param MB``: bytes of the teacher parameters the rank holds (the local shard of each ``DTensor``), counted exactly;
* ``RSS held MB``: resident set size after the teacher is prepared and has run one warm-up forward, minus the RSS
  before it was loaded (both after ``gc.collect()`` and glibc's ``malloc_trim(0)``, so freed full weights are
  returned to the OS rather than kept by the allocator). After the warm-up because safetensors weights are
  memory-mapped: a replicated teacher's pages become resident only when a forward first reads them (the JSON keeps
  ``rss_after_prepare_bytes`` too, the RSS before that first forward);
* ``forward peak MB``: the highest RSS sampled (every 1 ms, by a thread: torch releases the GIL during its kernels)
  during a teacher forward, minus the RSS just before it; the maximum over ``--repeats`` forwards after one warm-up.
  It includes the ``[batch, seq, vocab]`` fp32 logits (4 x 128 x 49152 x 4 B = 96 MiB) in both layouts, and for the
  sharded teacher the gathered weights of the unit being run (FSDP2 reshards each layer after its forward);
* ``forward s``: median wall time of those forwards (the sharded one all-gathers each layer over gloo);
* ``process peak MB``: ``getrusage`` peak RSS of the whole process, loading included: each rank loads the full
  teacher before sharding it, so this peak is about the same in both layouts (shard-on-load is not done here).

``max |dlogit|`` is the largest absolute difference between rank 0's sharded and replicated logits.

Usage (from the repository root): ``OMP_NUM_THREADS=1 python bench/bench_sharded_memory.py``; writes
``bench/results/sharded_memory.json``. ``--model tiny`` runs a random tiny Llama instead (a smoke test).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS_DIR, machine_info, write_json  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hf_compress.distributed import local_parameter_bytes, shard_teacher  # noqa: E402
from hf_compress.models.builtin import resolve_model_path  # noqa: E402
from hf_compress.reporting.measure import format_table  # noqa: E402

LAYOUTS = ("replicated", "sharded")
MB = 2**20


def rss() -> int:
    return psutil.Process().memory_info().rss


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that RSS reflects what is still held."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may then keep freed pages
        pass


class PeakSampler:
    """Highest RSS seen by a background thread sampling every `interval` seconds while the block runs."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def load_teacher(model: str) -> torch.nn.Module:
    if model == "tiny":
        torch.manual_seed(0)
        config = LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=512)  # fmt: skip
        return LlamaForCausalLM(config)
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)


def worker(cli: argparse.Namespace) -> None:
    """One rank of one layout: prepare the teacher, time and sample its forwards, write this rank's numbers."""
    import torch.distributed as dist  # only the launched processes set up a process group
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    rank = dist.get_rank()
    release_freed_memory()
    before = rss()
    teacher = load_teacher(cli.model).eval().requires_grad_(False)
    if cli.layout == "sharded":
        teacher = shard_teacher(teacher, mesh)
    release_freed_memory()
    after_prepare = rss() - before
    vocab = teacher.config.vocab_size
    ids = torch.randint(0, vocab, (cli.batch, cli.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times, peaks = [], []
    with torch.inference_mode():
        logits = teacher(**batch, use_cache=False).logits  # warm-up (FSDP2's lazy initialisation included)
        del logits
        release_freed_memory()
        held = rss() - before
        for i in range(cli.repeats):
            release_freed_memory()
            start_rss, start = rss(), time.perf_counter()
            with PeakSampler() as sampler:
                logits = teacher(**batch, use_cache=False).logits
            times.append(time.perf_counter() - start)
            peaks.append(sampler.peak - start_rss)
            if i < cli.repeats - 1:  # keep the last one for the comparison
                del logits
    if rank == 0:
        torch.save(logits.clone(), Path(cli.workdir) / f"logits_{cli.layout}.pt")
    result = {
        "param_bytes": local_parameter_bytes(teacher),
        "rss_held_bytes": held,
        "rss_after_prepare_bytes": after_prepare,
        "forward_peak_delta_bytes": max(peaks),
        "forward_s": statistics.median(times),
        "forward_s_all": times,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
    }
    (Path(cli.workdir) / f"{cli.layout}_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(cli: argparse.Namespace, layout: str, workdir: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(cli.port + LAYOUTS.index(layout)), str(Path(__file__).resolve()), "--worker", "--layout", layout,
               "--workdir", str(workdir), "--model", cli.model, "--batch", str(cli.batch), "--seq", str(cli.seq),
               "--repeats", str(cli.repeats)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return [json.loads((workdir / f"{layout}_rank{r}.json").read_text()) for r in range(2)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:SmolLM2-135M", help="a causal LM path / builtin id, or tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up")
    parser.add_argument("--port", type=int, default=29533, help="first of the two rendezvous ports")
    parser.add_argument("--output", default=str(RESULTS_DIR / "sharded_memory.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    for name in ("batch", "seq", "repeats"):
        if getattr(cli, name) < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {getattr(cli, name)}.")
    if cli.worker:
        worker(cli)
        return {}
    rows, layouts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for layout in LAYOUTS:
            ranks = launch(cli, layout, workdir)
            layouts[layout] = {"ranks": ranks}
        logits = {layout: torch.load(workdir / f"logits_{layout}.pt") for layout in LAYOUTS}
        diff = float((logits["sharded"] - logits["replicated"]).abs().max())
    for layout, entry in layouts.items():
        ranks = entry["ranks"]
        mean = {k: statistics.mean(r[k] for r in ranks) for k in ranks[0] if k != "forward_s_all"}
        entry["mean"] = mean
        rows.append({"layout": layout, "param MB": round(mean["param_bytes"] / MB, 1),
                     "RSS held MB": round(mean["rss_held_bytes"] / MB, 1),
                     "forward peak MB": round(mean["forward_peak_delta_bytes"] / MB, 1),
                     "forward s": round(mean["forward_s"], 3),
                     "process peak MB": round(mean["process_peak_rss_bytes"] / MB, 1)})  # fmt: skip
    replicated, sharded = layouts["replicated"]["mean"], layouts["sharded"]["mean"]
    ratios = {
        "param_bytes": sharded["param_bytes"] / replicated["param_bytes"],
        "rss_held_bytes": sharded["rss_held_bytes"] / max(replicated["rss_held_bytes"], 1),
        "forward_peak_delta_bytes": sharded["forward_peak_delta_bytes"]
        / max(replicated["forward_peak_delta_bytes"], 1),
        "forward_s": sharded["forward_s"] / replicated["forward_s"],
    }
    payload = {"benchmark": "sharded_memory", "model": cli.model, "batch": cli.batch, "seq": cli.seq,
               "repeats": cli.repeats, "world_size": 2, "machine": machine_info(), "layouts": layouts,
               "sharded_over_replicated": ratios, "max_abs_logit_diff": diff}  # fmt: skip
    print(f"Teacher {cli.model}, batch {cli.batch} x {cli.seq}, 2 CPU ranks (gloo); per-rank means")
    print(format_table(rows))
    print(f"max |dlogit| sharded vs replicated: {diff:.3g}")
    print("sharded / replicated:", {k: round(v, 3) for k, v in ratios.items()})
    path = write_json(payload, cli.output)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
