"""Accuracy vs compression on SST-2 (GLUE dev, 872 sentences): what distillation, pruning and int8 buy and cost.

One run trains and measures, side by side, from one fine-tuned all-MiniLM-L6-v2 teacher:

* ``teacher``;
* ``student-3L-distilled`` (``make_student`` keeps 3 of 6 blocks, ``DistillationTrainer``) vs
  ``student-3L-labels`` (the same student, plain ``Trainer`` on the labels, same steps / lr / batches);
* ``pruned-XX-distilled``: heads + FFN neurons pruned to XX% by ``PruningCallback`` (cubic schedule over the first
  half of the steps, then recovery) while distilling from the teacher, vs ``pruned-XX-oneshot``: the same
  ``PruningCallback`` in one shot with no training at all (one optimizer step at learning rate 0);
* ``<best>-int8``: ``quantize_model`` (embeddings included) of the most compressed distilled pruned model that keeps
  ``--retention-goal`` of the teacher's accuracy (else the most accurate one).

Columns: parameters, bytes on disk (the saved folder, config included), CPU latency at batch 1 and 32 (sequence 64,
median, every model timed interleaved in the same loop), accuracy, retention vs the teacher, size x and speed x.

Usage (from the repository root): ``python bench/bench_sst2.py --size full`` (about 30 min on 2 quiet cores, plus
about 10 min once to fine-tune the teacher when it is not cached); ``--size small`` (a few minutes) and ``--size
tiny`` (smoke test) train fewer steps on slices of the data. Results go to ``bench/results/sst2.json``. The other
SST-2 benchmarks (``bench_torch_pruning.py``, ``bench_unstructured.py``) import the data / teacher helpers below.
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
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)
from transformers import logging as hf_logging

from hf_compress import DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig, make_student
from hf_compress.loading import save_pretrained
from hf_compress.models.builtin import cache_dir, resolve_model_path
from hf_compress.quantization.quantize import is_quantized, quantize_model
from hf_compress.recipes.data import data_collator, load_raw_split, load_text_dataset
from hf_compress.recipes.stages.context import evaluate_model
from hf_compress.reporting.measure import count_parameters, folder_size_bytes, format_table

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"
BASE_MODEL = "builtin:all-MiniLM-L6-v2"
TEACHER_CACHE = cache_dir() / "minilm-sst2-teacher"
SEQ = 64  # max_length of training / eval rows and the sequence length of the latency inputs
# Per size: training steps per row and batch, learning rate, teacher fine-tune steps (when not cached), train / eval
# rows (None = all: 60,614 train, 872 eval), timed repeats at batch 1 and at batch 32.
SIZES = {
    "tiny": dict(steps=4, batch=8, lr=5e-5, teacher_steps=6, train_rows=256, eval_rows=64, repeats=(3, 2)),
    "small": dict(steps=60, batch=32, lr=5e-5, teacher_steps=300, train_rows=8000, eval_rows=None, repeats=(10, 3)),
    "full": dict(steps=350, batch=32, lr=5e-5, teacher_steps=1500, train_rows=None, eval_rows=None, repeats=(30, 8)),
}
DISTILLATION = dict(temperature=4.0, alpha=0.5)  # DistillationConfig defaults, recorded in the JSON


# ---------------------------------------------------------------------------------- shared with the other benches


def load_sst2(tokenizer, size: dict) -> tuple:
    """Tokenised SST-2 train (``data/sst2/train.tsv``, optionally a seeded slice) and GLUE dev (``test.tsv``)."""
    spec = {
        "train": str(SST2 / "train.tsv"),
        "eval": str(SST2 / "test.tsv"),
        "text_column": "sentence",
        "max_length": SEQ,
        "max_train_samples": size["train_rows"],
        "max_eval_samples": size["eval_rows"],
    }
    return load_text_dataset(spec, tokenizer, "sequence-classification", seed=0)


def latency_inputs(tokenizer, rows: int = 32) -> dict[str, torch.Tensor]:
    """The first ``rows`` GLUE dev sentences padded / truncated to exactly ``SEQ`` tokens (real attention masks)."""
    sentences = load_raw_split(SST2 / "test.tsv")["sentence"][:rows]
    return dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt"))


def train_args(output_dir: Path, size: dict, distill: bool = False, **overrides) -> TrainingArguments:
    """The arguments every training row shares: same steps, batch, lr, seed (hence the same batches), no saving."""
    cls = DistillationConfig if distill else TrainingArguments
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=size["steps"],
        per_device_train_batch_size=size["batch"],
        learning_rate=size["lr"],
        seed=0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if distill:
        kwargs |= DISTILLATION
    return cls(**{**kwargs, **overrides})


def timed_train(trainer: Trainer) -> float:
    """Run ``trainer.train()``; return its wall time in seconds."""
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def get_teacher(
    path: Path | None, size_name: str, train, collator, workdir: Path, teacher_steps: int | None = None
) -> tuple[torch.nn.Module, dict]:
    """The fine-tuned SST-2 teacher at ``path`` (default: the cache), fine-tuned from the packaged model if missing.

    A teacher fine-tuned here is saved to ``path`` when it was given explicitly or when ``size_name`` is ``"full"``;
    a default-path teacher fine-tuned at a smaller size is kept in ``workdir`` only, so it never pollutes the cache.
    """
    target = Path(path) if path is not None else TEACHER_CACHE
    if (target / "config.json").is_file():
        model = AutoModelForSequenceClassification.from_pretrained(target)
        return model.eval(), {"source": str(target), "fine_tuned_here": False}
    size = SIZES[size_name]
    steps = teacher_steps or size["teacher_steps"]
    base = resolve_model_path(BASE_MODEL)
    print(f"teacher: none at {target}; fine-tuning {BASE_MODEL} for {steps} steps ...", flush=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    args = train_args(workdir / "teacher", size, max_steps=steps, warmup_steps=steps // 10)
    seconds = timed_train(Trainer(model=model, args=args, train_dataset=train, data_collator=collator))
    save_to = target if path is not None or size_name == "full" else workdir / "teacher-model"
    model.save_pretrained(save_to)
    AutoTokenizer.from_pretrained(base).save_pretrained(save_to)
    info = {
        "source": BASE_MODEL,
        "fine_tuned_here": True,
        "steps": steps,
        "train_s": seconds,
        "saved_to": str(save_to),
    }
    return model.eval(), info


def disk_bytes(model: torch.nn.Module, folder: Path) -> int:
    """Save ``model`` (hf_compress format when pruned, with the int8 record when quantised); sum the folder's files."""
    if is_quantized(model.config):
        model.save_pretrained(folder)
    else:
        save_pretrained(model, folder)
    return folder_size_bytes(folder)


def latency(models: dict[str, torch.nn.Module], inputs: dict, repeats: tuple[int, int]) -> dict[str, dict]:
    """Batch-1 and batch-32 latency (ms) of every model, all timed interleaved in one loop per batch size."""
    out: dict[str, dict] = {name: {} for name in models}
    for batch, count in ((1, repeats[0]), (32, repeats[1])):
        rows = {k: v[:batch] for k, v in inputs.items()}
        for model in models.values():
            model.eval()
        stats = time_ms({name: functools.partial(model, **rows) for name, model in models.items()}, count, warmup=1)
        for name, value in stats.items():
            out[name][f"b{batch}"] = value
    return out


def setup(args: argparse.Namespace, workdir: Path) -> dict:
    """Tokenizer, data, collator, teacher and latency inputs shared by the SST-2 benchmarks."""
    size = SIZES[args.size]
    tokenizer = AutoTokenizer.from_pretrained(
        args.teacher if args.teacher and Path(args.teacher).is_dir() else resolve_model_path(BASE_MODEL)
    )
    train, evaluation = load_sst2(tokenizer, size)
    collator = data_collator(tokenizer, "sequence-classification")
    teacher, info = get_teacher(args.teacher, args.size, train, collator, workdir, args.teacher_steps)
    return dict(
        size=size,
        tokenizer=tokenizer,
        train=train,
        eval=evaluation,
        collator=collator,
        teacher=teacher,
        teacher_info=info,
        inputs=latency_inputs(tokenizer),
    )


def accuracy(model: torch.nn.Module, ctx: dict) -> float:
    return evaluate_model(model, ctx["eval"], ctx["collator"], "sequence-classification")["accuracy"]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    parser.add_argument(
        "--size",
        choices=list(SIZES),
        default="full",
        help="tiny = smoke test (seconds), small = a few minutes, full = the reported numbers.",
    )
    parser.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help=f"Fine-tuned SST-2 teacher folder (default {TEACHER_CACHE}; fine-tuned if missing).",
    )
    parser.add_argument(
        "--teacher-steps",
        type=positive_int,
        default=None,
        help="Fine-tune steps when the teacher is missing (default: the size's).",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)."
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / output, help="JSON result path.")


# ------------------------------------------------------------------------------------------------------- rows


def distill_student(ctx: dict, workdir: Path, distill: bool) -> tuple[torch.nn.Module, dict]:
    student = make_student(ctx["teacher"], num_layers=3).requires_grad_(True)  # the teacher is frozen once used
    common = dict(train_dataset=ctx["train"], data_collator=ctx["collator"])
    name = "student-distilled" if distill else "student-labels"
    if distill:
        trainer = DistillationTrainer(
            model=student,
            teacher_model=ctx["teacher"],
            args=train_args(workdir / name, ctx["size"], distill=True),
            **common,
        )
    else:
        trainer = Trainer(model=student, args=train_args(workdir / name, ctx["size"]), **common)
    seconds = timed_train(trainer)
    return student, {
        "train_steps": ctx["size"]["steps"],
        "train_s": seconds,
        "teacher_layers": student.config.hf_compress["teacher_layers"],
    }


def pruned(ctx: dict, workdir: Path, ratio: float, recover: bool) -> tuple[torch.nn.Module, dict]:
    """Heads + FFN neurons pruned to ``ratio``: gradually while distilling, or one-shot without training."""
    model = copy.deepcopy(ctx["teacher"]).requires_grad_(True)
    steps = ctx["size"]["steps"]
    targets = {"heads": ratio, "ffn_neurons": ratio}
    if recover:
        config = PruningConfig(
            targets=targets, schedule="cubic", start_step=0, end_step=max(1, steps // 2), frequency=max(1, steps // 20)
        )
        args = train_args(workdir / f"prune-{ratio}", ctx["size"], distill=True)
    else:  # one optimizer step at lr 0: masks at step 0, surgery at the end, weights untouched
        config = PruningConfig(targets=targets, schedule="one_shot")
        args = train_args(workdir / f"oneshot-{ratio}", ctx["size"], max_steps=1, learning_rate=0.0, weight_decay=0.0)
    callback = PruningCallback(config)
    common = dict(args=args, train_dataset=ctx["train"], data_collator=ctx["collator"], callbacks=[callback])
    if recover:
        trainer = DistillationTrainer(model=model, teacher_model=ctx["teacher"], **common)
    else:
        trainer = Trainer(model=model, **common)
    seconds = timed_train(trainer)
    removed = {t: sum(len(units) for units in callback.removed[t].values()) for t in ("heads", "ffn_neurons")}
    return model, {
        "train_steps": steps if recover else 0,
        "train_s": seconds,
        "removed": removed,
        "pruning": {
            "targets": targets,
            "schedule": config.schedule,
            "end_step": config.end_step,
            "frequency": config.frequency,
            "scope": config.scope,
            "importance": config.importance,
        },
    }


def pick_best(rows: dict[str, dict], teacher_accuracy: float, goal: float) -> str:
    """The most compressed distilled pruned row keeping ``goal`` of the teacher's accuracy, else the most accurate."""
    candidates = [name for name in rows if name.startswith("pruned-") and name.endswith("-distilled")]
    keeping = [name for name in candidates if rows[name]["accuracy"] >= goal * teacher_accuracy]
    if keeping:
        return min(keeping, key=lambda name: rows[name]["params"])
    return max(candidates, key=lambda name: rows[name]["accuracy"])


def print_table(rows: dict[str, dict]) -> None:
    table = [
        {
            "model": name,
            "params": r["params"],
            "disk MB": r["disk_bytes"] / 1e6,
            "b1 ms": r["latency_ms"]["b1"]["median"],
            "b32 ms": r["latency_ms"]["b32"]["median"],
            "accuracy": f"{100 * r['accuracy']:.2f}",
            "retention": f"{r['retention_pct']:.1f}%",
            "size x": f"{r['size_x']:.2f}",
            "speed x b1": f"{r['speed_x_b1']:.2f}",
            "speed x b32": f"{r['speed_x_b32']:.2f}",
            "train steps": r["train_steps"],
        }
        for name, r in rows.items()
    ]
    print("\nSST-2 (GLUE dev) accuracy vs compression, CPU latency at seq 64 (median)\n" + format_table(table))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "sst2.json")
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.3, 0.5, 0.7],
        help="Fractions of heads and of FFN neurons pruned, one pair of rows each.",
    )
    parser.add_argument(
        "--retention-goal",
        type=float,
        default=0.97,
        help="Accuracy fraction of the teacher the int8 row's source must keep.",
    )
    args = parser.parse_args(argv)
    if any(not 0 < r < 1 for r in args.ratios):
        parser.error(f"`--ratios` must all be in (0, 1), got {args.ratios}.")
    setup_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    payload = {"benchmark": "sst2", "size": args.size, "machine": machine_info(), "config": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ctx = setup(args, workdir)
        payload["teacher"] = ctx["teacher_info"]
        payload["config"] = {
            **{k: v for k, v in ctx["size"].items() if k != "repeats"},
            "seq": SEQ,
            "eval_sentences": len(ctx["eval"]),
            "distillation": DISTILLATION,
            "student_layers": 3,
            "ratios": args.ratios,
            "retention_goal": args.retention_goal,
            "without_recovery": "one-shot PruningCallback, one optimizer step at lr 0 (no training)",
        }
        models, info = {"teacher": ctx["teacher"]}, {"teacher": {"train_steps": 0}}
        for distill in (True, False):
            name = "student-3L-distilled" if distill else "student-3L-labels"
            print(f"training {name} ...", flush=True)
            models[name], info[name] = distill_student(ctx, workdir, distill)
        for ratio in args.ratios:
            for recover in (True, False):
                name = f"pruned-{round(100 * ratio)}-{'distilled' if recover else 'oneshot'}"
                print(f"{name} ...", flush=True)
                models[name], info[name] = pruned(ctx, workdir, ratio, recover)
        rows = {}
        for name, model in models.items():
            rows[name] = {**info[name], "accuracy": accuracy(model, ctx), "params": count_parameters(model)["total"]}
        best = pick_best(rows, rows["teacher"]["accuracy"], args.retention_goal)
        name = f"{best}-int8"
        models[name] = quantize_model(copy.deepcopy(models[best]), include_embeddings=True)
        rows[name] = {
            "train_steps": 0,
            "source": best,
            "accuracy": accuracy(models[name], ctx),
            "params": count_parameters(models[name])["total"],
        }
        for name, model in models.items():
            rows[name]["disk_bytes"] = disk_bytes(model, workdir / "saved" / name)
        print("timing ...", flush=True)
        for name, value in latency(models, ctx["inputs"], ctx["size"]["repeats"]).items():
            rows[name]["latency_ms"] = value
    reference = rows["teacher"]
    for row in rows.values():
        row["retention_pct"] = 100 * row["accuracy"] / reference["accuracy"]
        row["size_x"] = reference["disk_bytes"] / row["disk_bytes"]
        for batch in ("b1", "b32"):
            row[f"speed_x_{batch}"] = reference["latency_ms"][batch]["median"] / row["latency_ms"][batch]["median"]
    payload["rows"] = rows
    payload["int8_source"] = best
    payload["machine"]["load_average_1m_end"] = machine_info()["load_average_1m"]
    print_table(rows)
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
