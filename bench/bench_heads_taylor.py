"""Taylor head pruning + distillation recovery on SST-2: what removing half of the attention heads costs and buys.

One run measures, side by side, from the fine-tuned all-MiniLM-L6-v2 SST-2 teacher (GLUE dev, 872 sentences):

1. ``teacher``: accuracy of the unpruned model;
2. ``pruned``: first-order Taylor importance ``sum |w * dL/dw|`` of every head, accumulated over ``calib_batches``
   batches of training data with the label cross-entropy (eval mode, no dropout; per-head sums from
   ``hf_compress.pruning.importance.unit_layout`` / ``layer_unit_scores``), then the lowest 50% of the heads of
   **each layer** (6 of 12: per layer, so every layer keeps the same head count) removed physically with
   ``hf_compress.pruning.prune_heads`` — no training in between;
3. ``recovered``: ``recovery_steps`` steps of ``DistillationTrainer`` (temperature 4, alpha 0.7, batch 32, lr 5e-5)
   from the unpruned teacher into the pruned model.

Also: parameters, CPU latency of the teacher vs the pruned model at batch 1x64 and 32x64 (median, interleaved; the
pruned and recovered models have the same shapes, so one measurement serves both rows), and a save ->
``hf_compress.from_pretrained`` round trip of the recovered model (identical logits, recorded as a boolean).

Usage (from the repository root): ``python bench/bench_heads_taylor.py --size full --threads 2`` (about 5 min on 2
quiet cores; needs the cached teacher at ``~/.cache/hf_compress/minilm-sst2-teacher``, see ``bench_sst2.py``);
``--size tiny`` is the smoke test. Results go to ``bench/results/heads_taylor.json``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, machine_info, setup_threads, time_ms, write_json
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers import logging as hf_logging

from hf_compress import DistillationConfig, DistillationTrainer, from_pretrained, save_pretrained
from hf_compress.models.builtin import cache_dir
from hf_compress.models.families import get_layers, head_counts
from hf_compress.pruning import prune_heads
from hf_compress.pruning.importance import layer_unit_scores, unit_layout
from hf_compress.recipes.data import data_collator, load_raw_split, load_text_dataset
from hf_compress.recipes.stages.context import evaluate_model
from hf_compress.reporting.measure import count_parameters, format_table

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"
TEACHER = cache_dir() / "minilm-sst2-teacher"
SEQ = 64  # max_length of every row and the sequence length of the latency inputs
BATCH = 32  # calibration, recovery and batch-32 latency
RATIO = 0.5  # fraction of the heads of every layer removed
# Per size: calibration batches, recovery steps, train rows tokenised (None = all 60,614), dev rows (None = all 872),
# timed repeats at batch 1 and batch 32.
SIZES = {
    "tiny": dict(calib_batches=2, recovery_steps=3, train_rows=128, eval_rows=32, repeats=(3, 2)),
    "full": dict(calib_batches=32, recovery_steps=400, train_rows=None, eval_rows=None, repeats=(30, 8)),
}
DISTILLATION = dict(temperature=4.0, alpha=0.7, per_device_train_batch_size=BATCH, learning_rate=5e-5)


def load_data(tokenizer, args: argparse.Namespace, size: dict) -> tuple:
    """Tokenised train rows (seeded slice when limited) and dev rows, unpadded (the collator pads per batch)."""
    spec = {
        "train": str(args.train),
        "eval": str(args.eval),
        "text_column": "sentence",
        "max_length": SEQ,
        "max_train_samples": size["train_rows"],
        "max_eval_samples": size["eval_rows"],
    }
    return load_text_dataset(spec, tokenizer, "sequence-classification", seed=0)


def latency_inputs(tokenizer, path: Path, rows: int = BATCH) -> dict[str, torch.Tensor]:
    """The first ``rows`` sentences of ``path`` (cycled when fewer) padded / truncated to exactly ``SEQ`` tokens."""
    sentences = load_raw_split(path)["sentence"]
    sentences = [sentences[i % len(sentences)] for i in range(rows)]
    return dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt"))


def taylor_head_scores(model: torch.nn.Module, train, collator, batches: int) -> dict[int, torch.Tensor]:
    """Per-layer ``sum |w * dCE/dw|`` of every head, summed over ``batches`` shuffled training batches."""
    model.eval()  # no dropout: the scores depend on the weights and the data only
    model.requires_grad_(True)
    layout = unit_layout(model, "heads")
    totals = {layer: torch.zeros(n) for layer, (n, _) in layout.items()}
    loader = DataLoader(
        train, batch_size=BATCH, shuffle=True, collate_fn=collator, generator=torch.Generator().manual_seed(0)
    )
    seen = 0
    for batch in loader:
        if seen == batches:
            break
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for layer, (n, rows) in layout.items():
            totals[layer] += layer_unit_scores(n, rows, "taylor").cpu()
        seen += 1
    model.zero_grad(set_to_none=True)
    if seen < batches:
        raise ValueError(f"`--size` needs {batches} calibration batches but the train data gives only {seen}.")
    return totals


def lowest_heads(scores: dict[int, torch.Tensor], ratio: float) -> dict[int, list[int]]:
    """The ``round(ratio * heads)`` lowest-scoring heads of every layer (ties: lower index first), sorted."""
    plan = {}
    for layer, values in scores.items():
        count = int(round(ratio * len(values)))
        order = sorted(range(len(values)), key=lambda h: (float(values[h]), h))
        plan[layer] = sorted(order[:count])
    return plan


def accuracy(model: torch.nn.Module, evaluation, collator) -> float:
    with torch.inference_mode():
        return evaluate_model(model, evaluation, collator, "sequence-classification")["accuracy"]


def latency(models: dict[str, torch.nn.Module], inputs: dict, repeats: tuple[int, int]) -> dict[str, dict]:
    """Batch-1 and batch-32 latency (ms) of every model, timed interleaved in one loop per batch size."""
    out: dict[str, dict] = {name: {} for name in models}
    for model in models.values():
        model.eval()
    for batch, count in ((1, repeats[0]), (BATCH, repeats[1])):
        rows = {k: v[:batch] for k, v in inputs.items()}
        stats = time_ms({name: functools.partial(model, **rows) for name, model in models.items()}, count, warmup=1)
        for name, value in stats.items():
            out[name][f"b{batch}"] = value
    return out


def round_trip(model: torch.nn.Module, folder: Path, inputs: dict) -> dict:
    """Save ``model`` with hf_compress, reload it with ``hf_compress.from_pretrained``; compare full logits."""
    save_pretrained(model, folder)
    reloaded = from_pretrained(folder).eval()
    model.eval()
    with torch.inference_mode():
        before, after = model(**inputs).logits, reloaded(**inputs).logits
    return {
        "identical": bool(torch.equal(before, after)),
        "max_abs_diff": float((before - after).abs().max()),
        "reloaded_class": type(reloaded).__name__,
    }


def heads_per_layer(model: torch.nn.Module) -> list[int]:
    return [head_counts(model, layer)[0] for layer in range(len(get_layers(model)))]


def run(args: argparse.Namespace, workdir: Path) -> dict:
    size = SIZES[args.size]
    if not (Path(args.teacher) / "config.json").is_file():
        raise FileNotFoundError(
            f"`--teacher` {str(args.teacher)!r} has no config.json; fine-tune the SST-2 teacher "
            "first (`python bench/bench_sst2.py --size full` caches it) or pass its folder."
        )
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    train, evaluation = load_data(tokenizer, args, size)
    collator = data_collator(tokenizer, "sequence-classification")
    inputs = latency_inputs(tokenizer, args.eval)
    timings: dict[str, float] = {}

    print("1/4 teacher accuracy ...", flush=True)
    acc = {"teacher": accuracy(teacher, evaluation, collator)}

    print(
        f"2/4 Taylor importance over {size['calib_batches']} batches, pruning {RATIO:.0%} of heads per layer ...",
        flush=True,
    )
    student = copy.deepcopy(teacher)
    start = time.perf_counter()
    scores = taylor_head_scores(student, train, collator, size["calib_batches"])
    removed = lowest_heads(scores, RATIO)
    prune_heads(student, removed)
    timings["importance_and_prune_s"] = time.perf_counter() - start
    acc["pruned"] = accuracy(student, evaluation, collator)

    print(f"3/4 distillation recovery, {size['recovery_steps']} steps ...", flush=True)
    config = DistillationConfig(
        output_dir=str(workdir / "recovery"),
        max_steps=size["recovery_steps"],
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **DISTILLATION,
    )
    student.requires_grad_(True).train()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=train, data_collator=collator
    )
    start = time.perf_counter()
    trainer.train()
    timings["recovery_s"] = time.perf_counter() - start
    student.eval()
    acc["recovered"] = accuracy(student, evaluation, collator)

    print("4/4 latency and save/reload ...", flush=True)
    lat = latency({"teacher": teacher, "pruned": student}, inputs, size["repeats"])
    reload = round_trip(student, workdir / "recovered", inputs)

    params = {"teacher": count_parameters(teacher)["total"], "pruned": count_parameters(student)["total"]}
    heads = {"teacher": heads_per_layer(teacher), "pruned": heads_per_layer(student)}
    rows = {}
    for stage in ("teacher", "pruned", "recovered"):
        shape = "teacher" if stage == "teacher" else "pruned"
        rows[stage] = {
            "heads": sum(heads[shape]),
            "heads_per_layer": heads[shape],
            "params": params[shape],
            "accuracy": acc[stage],
            "retention_pct": 100 * acc[stage] / acc["teacher"] if acc["teacher"] else None,
            "latency_ms": lat[shape],
            **{f"speedup_{b}": lat["teacher"][b]["median"] / lat[shape][b]["median"] for b in ("b1", "b32")},
        }
    return {
        "benchmark": "heads_taylor",
        "size": args.size,
        "config": {
            "teacher": str(args.teacher),
            "train": str(args.train),
            "eval": str(args.eval),
            "train_rows": len(train),
            "eval_sentences": len(evaluation),
            "max_length": SEQ,
            "importance": "taylor |w*grad| per head, CE loss, eval mode",
            "scope": "per_layer",
            "ratio": RATIO,
            "calib_batches": size["calib_batches"],
            "calib_batch_size": BATCH,
            "recovery_steps": size["recovery_steps"],
            "distillation": DISTILLATION,
            "latency_seq": SEQ,
            "latency_repeats": {"b1": size["repeats"][0], "b32": size["repeats"][1]},
            "latency_note": "pruned and recovered share shapes: one measurement of the recovered model serves both",
        },
        "removed_heads": {str(layer): heads for layer, heads in removed.items()},
        "head_scores": {str(layer): values.tolist() for layer, values in scores.items()},
        "rows": rows,
        "reload": reload,
        "timings_s": timings,
    }


def table(rows: dict) -> str:
    lines = []
    for stage, row in rows.items():
        lines.append(
            {
                "stage": stage,
                "heads": row["heads"],
                "params": f"{row['params'] / 1e6:.2f}M",
                "accuracy": f"{row['accuracy']:.4f}",
                "retention %": "-" if row["retention_pct"] is None else f"{row['retention_pct']:.1f}",
                "b1 ms": f"{row['latency_ms']['b1']['median']:.2f}",
                "b32 ms": f"{row['latency_ms']['b32']['median']:.1f}",
                "speedup b1/b32": f"{row['speedup_b1']:.2f}x / {row['speedup_b32']:.2f}x",
            }
        )
    return format_table(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        choices=list(SIZES),
        default="full",
        help="tiny = smoke test (seconds), full = the reported numbers (about 5 min on 2 cores).",
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        default=TEACHER,
        help="Fine-tuned SST-2 BertForSequenceClassification folder with its tokenizer.",
    )
    parser.add_argument("--train", type=Path, default=SST2 / "train.tsv", help="Training tsv (sentence, label).")
    parser.add_argument("--eval", type=Path, default=SST2 / "test.tsv", help="Evaluation tsv (GLUE dev).")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "heads_taylor.json", help="JSON result path.")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    setup_threads(args.threads)
    torch.manual_seed(0)
    machine = machine_info()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        payload = run(args, Path(tmp))
    machine["load_average_1m_end"] = machine_info()["load_average_1m"]
    payload = {
        "benchmark": payload.pop("benchmark"),
        "size": payload.pop("size"),
        "machine": machine,
        "total_s": time.perf_counter() - start,
        **payload,
    }
    print(table(payload["rows"]))
    print(f"save -> hf_compress.from_pretrained identical logits: {payload['reload']['identical']}")
    print(f"wrote {write_json(payload, args.output)}")


if __name__ == "__main__":
    main()
