"""LLM layer dropping + KD recovery: SmolLM2-135M loses 1/3 of its blocks, then hf_compress and TRL distil it back.

One run:

1. Loads the teacher (``builtin:SmolLM2-135M``: 30 Llama blocks, vocab 49152, tied embeddings) and scores every block
   by ShortGPT block influence ``1 - cos(h_in, h_out)`` on calibration batches of ``data/tinyshakespeare/train.txt``.
2. Drops the ``num_layers // 3`` least influential blocks (10 of 30) with ``hf_compress.pruning.drop_layers``.
3. Recovers the student by pure logit distillation from the full teacher (``alpha=1``, forward KL, ``T=1``) for the
   same steps / batches / learning rate / seed with ``hf_compress.DistillationTrainer`` and with TRL's ``GKDTrainer``
   (off-policy, ``lmbda=0``; ``beta=0`` is its forward KL(teacher || student), the same per-token loss as ours).
4. Measures WikiText-2 test perplexity of the teacher, the pruned student and both recovered students.

Usage (from the repository root): ``python bench/bench_llm.py --size full``; ``--size tiny`` is a smoke test (the
tests pass ``--model`` a tiny saved Llama). Results go to ``bench/results/llm.json``.

The two recoveries run one after the other, so their wall-clock step times are only comparable on an idle machine;
``step_cpu_s`` (process CPU seconds per step, all threads) is recorded next to them as a load-robust cross-check.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import tempfile
import time
import traceback
from pathlib import Path

import datasets
import torch
from common import RESULTS_DIR, machine_info, setup_threads, summarize, write_json
from lm_common import (
    PPL_METHOD,
    TEXTS,
    CpuStepTimer,
    blocks,
    common_args,
    kd_trainer,
    perplexity,
    token_stream,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, default_data_collator
from transformers import logging as hf_logging

from hf_compress.models.builtin import resolve_model_path
from hf_compress.pruning import drop_layers
from hf_compress.pruning.importance import block_influence_scores
from hf_compress.reporting.measure import count_parameters, format_table

# Per size: sequence length, train batch, recovery steps, warm-up steps left out of the timing, calibration batches,
# evaluation tokens (WikiText-2 test prefix) and the loss chunk size (token positions per chunk).
SIZES = {
    "tiny": dict(seq=32, batch=2, steps=8, skip=2, calibration=2, eval_tokens=512, chunk=32),
    "small": dict(seq=128, batch=4, steps=8, skip=3, calibration=2, eval_tokens=2048, chunk=256),
    "full": dict(seq=128, batch=4, steps=120, skip=5, calibration=8, eval_tokens=16384, chunk=256),
}


def prune(teacher, tokenizer, size: dict) -> tuple[torch.nn.Module, dict]:
    """A copy of ``teacher`` without its ``num_layers // 3`` lowest block-influence blocks, and what was done."""
    n = size["calibration"] * size["batch"]
    rows = blocks(token_stream(tokenizer, TEXTS["tinyshakespeare"], n * size["seq"]), size["seq"])
    batches = [{"input_ids": rows[i : i + size["batch"]]} for i in range(0, n, size["batch"])]
    start = time.perf_counter()
    scores = block_influence_scores(teacher, batches)
    num_layers = len(scores)
    drop = sorted(torch.argsort(scores)[: num_layers // 3].tolist())
    student = drop_layers(copy.deepcopy(teacher), drop)
    return student, {
        "importance": "block_influence (ShortGPT: 1 - cos(h_in, h_out), mean over tokens and batches)",
        "calibration": {
            "text": "tinyshakespeare",
            "batches": size["calibration"],
            "batch": f"{size['batch']}x{size['seq']}",
        },
        "scores": [round(float(s), 6) for s in scores],
        "dropped_layers": drop,
        "layers_before": num_layers,
        "layers_after": num_layers - len(drop),
        "params_before": count_parameters(teacher)["total"],
        "params_after": count_parameters(student)["total"],
        "seconds": time.perf_counter() - start,
    }


def run_trainer(trainer, timer: CpuStepTimer, student, rows_eval: torch.Tensor, size: dict) -> dict:
    trainer.remove_callback(PrinterCallback)  # losses are read from the log history instead
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "step_s": summarize(timer.step_times(skip=size["skip"])),
        "step_cpu_s": summarize(timer.cpu_times(skip=size["skip"])),
        "train_seconds": wall,
        "losses": [round(x, 5) for x in losses],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "perplexity": perplexity(student, rows_eval),
    }


def recover_hf_compress(teacher, student, tokenizer, train, rows_eval, size, lr, out) -> dict:
    trainer, timer = kd_trainer(teacher, student, tokenizer, train, size, lr, out)
    result = run_trainer(trainer, timer, student, rows_eval, size)
    result["loss"] = (
        f"DistillationConfig(alpha=1.0, temperature=1.0, distillation_loss='kl', "
        f"loss_chunk_size={size['chunk']}): forward KL(teacher || student) per shifted token, summed "
        "over the vocabulary, divided by the tokens in the batch"
    )
    return result


def recover_trl_gkd(teacher, student, tokenizer, train, rows_eval, size, lr, out) -> dict:
    """TRL's GKDTrainer off-policy on the same batches; a failure is recorded, not raised."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        version = importlib.metadata.version("trl")
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except (ImportError, importlib.metadata.PackageNotFoundError) as err:  # trl is optional: not a dependency
        return {"ran": False, "error": f"{type(err).__name__}: {err}"}
    result = {"trl_version": version}
    try:
        config = GKDConfig(
            **common_args(size, lr, out),
            lmbda=0.0,
            beta=0.0,
            seq_kd=False,
            temperature=1.0,
            max_length=size["seq"],
            disable_dropout=True,
            gradient_checkpointing=False,
        )
        timer = CpuStepTimer()
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=train,
            processing_class=tokenizer,
            data_collator=default_data_collator,
            callbacks=[timer],
        )
        result.update(run_trainer(trainer, timer, student, rows_eval, size))
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError, ImportError) as err:
        return {
            **result,
            "ran": False,
            "error": f"{type(err).__name__}: {err}",
            "traceback_tail": traceback.format_exc()[-1500:],
        }
    result["ran"] = True
    result["loss"] = (
        "GKDConfig(lmbda=0, beta=0, seq_kd=False): generalized JSD at beta=0 = forward KL(teacher || "
        "student) per shifted token at T=1 (GKD's loss ignores `temperature`), summed over the "
        "vocabulary, divided by the tokens in the batch"
    )
    return result


TRL_DISTILLATION_SHORT = "on-policy only (generates completions from prompts); see the JSON"
TRL_DISTILLATION_SKIPPED = (
    "trl.DistillationTrainer (TRL >= 1.x main API) distils on completions it generates itself from a `prompt` column "
    "(on-policy, with a chunked JSD); it has no off-policy mode on fixed text, so it cannot run the same data / steps "
    "as ours. GKDTrainer with lmbda=0 is TRL's off-policy equivalent and is what is compared."
)


def print_tables(payload: dict) -> None:
    ppl = payload["perplexity"]
    rows = [
        {"model": "teacher", "layers": payload["pruning"]["layers_before"], "ppl": ppl["teacher"]["ppl"]},
        {"model": "pruned (no recovery)", "layers": payload["pruning"]["layers_after"], "ppl": ppl["pruned"]["ppl"]},
    ]
    for name, res in payload["recovery"].items():
        if res.get("ran"):
            rows.append(
                {
                    "model": f"recovered: {name}",
                    "layers": payload["pruning"]["layers_after"],
                    "ppl": res["perplexity"]["ppl"],
                    "median step s": res["step_s"]["median"],
                    "median step CPU s": res["step_cpu_s"]["median"],
                    "first loss": res["first_loss"],
                    "last loss": res["last_loss"],
                }
            )
        else:
            reason = res.get("short") or res.get("error") or res.get("skipped", "")
            rows.append({"model": f"recovered: {name}", "ppl": f"not run: {reason[:90]}"})
    print(
        f"\nWikiText-2 test perplexity ({ppl['tokens']} tokens, blocks of {ppl['block_size']}) and KD recovery "
        f"({payload['settings']['steps']} steps of {payload['settings']['batch']})\n" + format_table(rows)
    )
    print("\n" + format_table([{k: v for k, v in payload["comparison"].items() if not isinstance(v, str)}]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full", help="Steps / tokens (tiny = smoke).")
    parser.add_argument("--model", default="builtin:SmolLM2-135M", help="Teacher: builtin name or local folder.")
    parser.add_argument(
        "--train-text",
        choices=("wikitext2_valid", "tinyshakespeare"),
        default="wikitext2_valid",
        help="Text the recovery distils on (the evaluation is always WikiText-2 test).",
    )
    parser.add_argument("--steps", type=int, default=None, help="Override the size's recovery steps.")
    parser.add_argument("--lr", type=float, default=2e-4, help="Peak learning rate of both recoveries.")
    parser.add_argument("--skip-trl", action="store_true", help="Only hf_compress's recovery.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "llm.json", help="JSON result path.")
    args = parser.parse_args(argv)
    size = dict(SIZES[args.size])
    if args.steps is not None:
        if args.steps <= size["skip"] + 1:
            parser.error(f"`--steps` must be > {size['skip'] + 1} (warm-up + 1 untimed last step), got {args.steps}.")
        size["steps"] = args.steps
    setup_threads(args.threads)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    payload = {"benchmark": "llm", "size": args.size, "machine": machine_info()}

    start = time.perf_counter()
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    payload["model"] = {
        "name": args.model,
        "path": path,
        "layers": teacher.config.num_hidden_layers,
        "vocab_size": teacher.config.vocab_size,
        "params": count_parameters(teacher)["total"],
        "tie_word_embeddings": teacher.config.tie_word_embeddings,
        "load_seconds": time.perf_counter() - start,
    }
    print(
        f"teacher {args.model}: {payload['model']['layers']} layers, {payload['model']['params']:,} params", flush=True
    )
    student, payload["pruning"] = prune(teacher, tokenizer, size)
    print(f"dropped layers {payload['pruning']['dropped_layers']}", flush=True)

    train_ids = token_stream(tokenizer, TEXTS[args.train_text], size["steps"] * size["batch"] * size["seq"])
    train_rows = blocks(train_ids, size["seq"])
    train = datasets.Dataset.from_dict(
        {
            "input_ids": train_rows.tolist(),
            "attention_mask": torch.ones_like(train_rows).tolist(),
            "labels": train_rows.tolist(),
        }
    ).with_format("torch")
    rows_eval = blocks(token_stream(tokenizer, TEXTS["wikitext2_test"], size["eval_tokens"]), size["seq"])
    payload["settings"] = {
        "train_text": args.train_text,
        "batch": f"{size['batch']}x{size['seq']}",
        "steps": size["steps"],
        "warmup_steps_skipped_in_timing": size["skip"],
        "learning_rate": args.lr,
        "lr_schedule": "linear, 10% warm-up",
        "optimizer": "AdamW (Trainer default), weight_decay 0, max_grad_norm 1",
        "seed": 0,
        "teacher": "the full model, fp32, frozen",
        "student": "the same layer-dropped copy for every trainer",
        "train_tokens": int(train_rows.numel()),
        "loss_chunk_size": size["chunk"],
        "timing": "per optimizer step, on_step_begin to the next, median after the warm-up steps; the trainers run "
        "sequentially (hf_compress first), so compare wall times on an idle machine",
    }
    print("perplexity: teacher, pruned ...", flush=True)
    payload["perplexity"] = {
        "method": PPL_METHOD,
        "tokens": int(rows_eval.numel()),
        "block_size": size["seq"],
        "teacher": perplexity(teacher, rows_eval),
        "pruned": perplexity(student, rows_eval),
    }

    trl_student = copy.deepcopy(student)  # identical starting weights for TRL
    recovery = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("recovery: hf_compress DistillationTrainer ...", flush=True)
        recovery["hf_compress"] = recover_hf_compress(
            teacher, student, tokenizer, train, rows_eval, size, args.lr, f"{tmp}/ours"
        )
        recovery["hf_compress"]["ran"] = True
        del student
        if args.skip_trl:
            recovery["trl_gkd"] = {"ran": False, "skipped": "--skip-trl"}
        else:
            print("recovery: TRL GKDTrainer (lmbda=0, beta=0) ...", flush=True)
            recovery["trl_gkd"] = recover_trl_gkd(
                teacher, trl_student, tokenizer, train, rows_eval, size, args.lr, f"{tmp}/trl"
            )
    recovery["trl_distillation"] = {"ran": False, "skipped": TRL_DISTILLATION_SKIPPED, "short": TRL_DISTILLATION_SHORT}
    payload["recovery"] = recovery
    payload["perplexity"]["recovered"] = {name: res["perplexity"] for name, res in recovery.items() if res.get("ran")}

    ours, trl = recovery["hf_compress"], recovery["trl_gkd"]
    comparison = {"hf_compress_median_step_s": ours["step_s"]["median"], "hf_compress_ppl": ours["perplexity"]["ppl"]}
    if trl.get("ran"):
        comparison.update(
            {
                "trl_median_step_s": trl["step_s"]["median"],
                "trl_ppl": trl["perplexity"]["ppl"],
                "step_time_ratio_hf_compress_over_trl": ours["step_s"]["median"] / trl["step_s"]["median"],
                "step_cpu_ratio_hf_compress_over_trl": ours["step_cpu_s"]["median"] / trl["step_cpu_s"]["median"],
                "first_loss_rel_diff": abs(ours["first_loss"] - trl["first_loss"])
                / max(abs(trl["first_loss"]), 1e-12),
            }
        )
    else:
        comparison["trl"] = "not run: " + trl.get("error", trl.get("skipped", "unknown"))
    payload["comparison"] = comparison
    payload["machine"]["load_average_1m_end"] = machine_info()["load_average_1m"]
    payload["total_seconds"] = time.perf_counter() - start
    print_tables(payload)
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
