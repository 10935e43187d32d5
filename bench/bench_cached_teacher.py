"""Cached teacher outputs vs a live teacher on SST-2: same accuracy, no teacher forward, one-time cache cost.

One run, on the fine-tuned MiniLM teacher shared with ``bench_sst2.py`` (same sizes, data, seed and hyper-parameters):

* ``live``: ``DistillationTrainer`` with the teacher running a forward pass on every batch;
* ``cached``: ``cache_teacher_outputs`` over the training rows once (timed), then ``DistillationTrainer`` with
  ``teacher_model=None`` from the cached logit columns.

Both train the same 3-layer ``make_student`` student on the same batches (seed 0) for the size's steps on exactly the
rows they use (``steps x batch`` rows, so the cache covers one pass). Reported: GLUE-dev accuracy of each, the largest
difference between their logged loss curves, training wall time, and the cache build time. Goal: accuracy equal within
noise, ``cached`` training faster by about the teacher forward, cache + cached training about the live run.

Usage (from the repository root): ``python bench/bench_cached_teacher.py --size full``; writes
``bench/results/cached.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_sst2 import SIZES, accuracy, add_common_arguments, setup, timed_train, train_args
from common import machine_info, setup_threads, write_json
from transformers import logging as hf_logging

from hf_compress import DistillationTrainer, cache_teacher_outputs, make_student
from hf_compress.reporting.measure import format_table


def train_student(ctx: dict, workdir: Path, name: str, dataset, teacher) -> dict:
    student = make_student(ctx["teacher"], num_layers=3).requires_grad_(True)
    args = train_args(workdir / name, ctx["size"], distill=True, logging_strategy="steps", logging_steps=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  data_collator=ctx["collator"])  # fmt: skip
    seconds = timed_train(trainer)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"accuracy": accuracy(student, ctx), "train_s": seconds, "losses": losses, "mode": trainer.teacher_mode}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "cached.json")
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    hf_logging.set_verbosity_error()
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ctx = setup(args, workdir)
        size = ctx["size"]
        rows = ctx["train"].select(range(min(len(ctx["train"]), size["steps"] * size["batch"])))
        print(f"caching the teacher's logits on {len(rows)} rows ...", flush=True)
        start = time.perf_counter()
        cached = cache_teacher_outputs(ctx["teacher"], rows, ctx["collator"], batch_size=64)
        cache_s = time.perf_counter() - start
        print("training: live teacher ...", flush=True)
        live = train_student(ctx, workdir, "live", rows, ctx["teacher"])
        print("training: cached teacher ...", flush=True)
        from_cache = train_student(ctx, workdir, "cached", cached, None)
    machine["load_average_1m_end"] = machine_info()["load_average_1m"]
    diff = max((abs(a - b) for a, b in zip(live["losses"], from_cache["losses"])), default=float("nan"))
    payload = {
        "benchmark": "cached_teacher", "size": args.size, "machine": machine, "config": SIZES[args.size],
        "teacher": ctx["teacher_info"], "rows": len(rows), "cache_s": cache_s, "live": live, "cached": from_cache,
        "max_loss_curve_diff": diff, "accuracy_diff_points": 100 * (from_cache["accuracy"] - live["accuracy"]),
        "cached_train_over_live_train": from_cache["train_s"] / live["train_s"],
        "cache_plus_cached_over_live": (cache_s + from_cache["train_s"]) / live["train_s"],
    }  # fmt: skip
    table = [{"teacher": name, "mode": r["mode"], "accuracy": f"{100 * r['accuracy']:.2f}%",
              "train s": f"{r['train_s']:.1f}", "cache s": f"{cache_s:.1f}" if name == "cached" else "-"}
             for name, r in (("live", live), ("cached", from_cache))]  # fmt: skip
    print("\nCached vs live teacher (3-layer student, SST-2 GLUE dev)\n" + format_table(table))
    ratios = payload["cached_train_over_live_train"], payload["cache_plus_cached_over_live"]
    print(
        f"max |loss difference| over {len(live['losses'])} logged steps: {diff:.2e}; cached / live training time "
        f"{ratios[0]:.3f}; (cache + cached) / live {ratios[1]:.3f}"
    )
    print(f"wrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
