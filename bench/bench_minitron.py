"""Minitron-style compression of SmolLM2-135M to about half its parameters, three ways, at the same KD token budget.

1. ``depth``: drop the least influential blocks (ShortGPT block influence) until the model fits the budget.
2. ``width``: keep every block; the budget search over hidden size, heads and FFN width only (``depth=(1.0,)``).
3. ``search``: the budget search's choice over depth, hidden, heads and FFN together.

Every student is pruned one-shot from the same calibration batches (activation importance, Minitron), then distilled
from the full teacher (``alpha=1``, forward KL, ``T=1``) for the same steps / batches / learning rate / seed with
``hf_compress.DistillationTrainer``; WikiText-2 test perplexity (method of ``lm_common.py``) and evaluation
throughput (tokens scored per second) are measured before and after recovery.

Usage (from the repository root): ``python bench/bench_minitron.py --size full``; ``--size tiny`` is a smoke test
(the tests pass ``--model`` a tiny saved Llama). Results go to ``bench/results/minitron.json``.

A longer token budget for one variant, with the perplexity curve on the way: ``--variants search --steps 3000
--bf16 --eval-at 60 250 500 1000 2000``. The KD text (WikiText-2 valid) is repeated, epoch after epoch, when the
budget needs more tokens than it has; ``--bf16`` runs the recovery in bfloat16 autocast (the teacher in bfloat16,
the student's weights and the perplexity evaluations in float32). ``--train-text wikitext2_valid:2 ag_news mrpc``
distils on a mix instead: each named text's rows, in that order and repeated ``:N`` times, cut at the budget (the
trainer shuffles them); never on WikiText-2 test, the text every perplexity is measured on. ``--shift-repeats`` cuts
repeat ``r`` of ``N`` ``r * seq / N`` tokens further into its text, so the repeats are the same tokens in new
contexts, not copies. ``--teacher-samples 1200 --prompt 32 --top-p 0.9`` adds sequence-level KD data: 1,200 rows the
teacher writes itself (``hf_compress.distillation.on_policy.generate_completions``), each continuing the first 32
tokens of a WikiText-2 valid row; they take the place of as many text rows in the budget. ``--token-noise 0.1``
replaces each KD input token, with probability 0.1 and new draws every batch, by a token of the KD text (both models
read the changed rows); ``--hidden-loss-weight 0.5`` adds a cosine hidden-state loss between each student block and
the teacher block it was pruned from; ``--calibration-text wikitext2_valid`` scores importance and the budget
candidates on the KD text instead of tinyshakespeare; ``--alpha 0.5`` mixes the KD text's own next-token
cross-entropy (weight ``1 - alpha``) into the forward KL.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import datasets
import torch
from common import RESULTS_DIR, machine_info, setup_threads, write_json
from kd_texts import kd_pool, teacher_samples, text_spec
from lm_common import TEXTS, TokenNoise, blocks, mean_kl, perplexity, token_stream
from lm_recovery import PerplexityCurve, correct_teacher, distil
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import logging as hf_logging

from hf_compress.distillation.on_policy import special_token_ids
from hf_compress.models.builtin import resolve_model_path
from hf_compress.pruning import drop_layers
from hf_compress.pruning.budget import Shape, count_parameters, search_budget
from hf_compress.pruning.importance import block_influence_scores
from hf_compress.reporting.measure import format_table

VARIANTS = ("depth", "width", "search")
SIZES = {
    "tiny": dict(seq=32, batch=2, steps=6, skip=2, calibration=2, eval_tokens=512, chunk=32, candidates=3),
    "full": dict(seq=128, batch=4, steps=60, skip=3, calibration=4, eval_tokens=8192, chunk=256, candidates=4),
}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def depth_only(teacher, batches: list[dict], budget: int) -> tuple[torch.nn.Module, dict]:
    """Drop the lowest block-influence blocks, fewest first, until the model has at most ``budget`` parameters."""
    scores = block_influence_scores(teacher, batches)
    config = teacher.config
    num_layers = len(scores)
    heads, ffn = config.num_attention_heads, config.intermediate_size
    keep = next(
        (
            k
            for k in range(num_layers, 0, -1)
            if count_parameters(teacher, Shape(k, config.hidden_size, heads, ffn)) <= budget
        ),
        None,
    )
    if keep is None:
        raise ValueError(f"`budget` {budget:,} cannot be reached by dropping blocks alone.")
    drop = sorted(torch.argsort(scores)[: num_layers - keep].tolist())
    student = drop_layers(copy.deepcopy(teacher), drop)
    kept = [i for i in range(num_layers) if i not in drop]
    return student, {
        "dropped_layers": drop,
        "kept_layers": kept,
        "shape": vars(Shape(keep, config.hidden_size, heads, ffn)),
    }


def _measure(model, rows) -> dict:
    result = perplexity(model, rows)
    return {**result, "tokens_per_s": result["tokens_scored"] / result["seconds"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full", help="Steps / tokens (tiny = smoke).")
    parser.add_argument("--model", default="builtin:SmolLM2-135M", help="Teacher: builtin name or local folder.")
    parser.add_argument("--fraction", type=float, default=0.5, help="Parameter budget as a fraction of the teacher.")
    parser.add_argument("--steps", type=int, default=None, help="Override the size's recovery steps.")
    parser.add_argument("--lr", type=float, default=2e-4, help="Peak learning rate of every recovery.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="Which students to build and distil."
    )
    parser.add_argument("--bf16", action="store_true", help="Recover in bfloat16 autocast (teacher in bfloat16).")
    parser.add_argument(
        "--eval-at", type=int, nargs="*", default=[], help="Also measure test perplexity after these recovery steps."
    )
    parser.add_argument(
        "--train-text",
        type=text_spec,
        nargs="+",
        default=[("wikitext2_valid", 1)],
        metavar="NAME[:REPEATS]",
        help="KD texts, e.g. wikitext2_valid:2 ag_news mrpc (default: wikitext2_valid).",
    )
    parser.add_argument(
        "--shift-repeats",
        action="store_true",
        help="Repeat r of a text N times starts its rows r*seq/N tokens in (the same text in new contexts).",
    )
    parser.add_argument(
        "--teacher-samples",
        type=int,
        default=0,
        metavar="ROWS",
        help="Also distil on ROWS rows the teacher writes, each from a WikiText-2 valid row's first --prompt tokens.",
    )
    parser.add_argument("--prompt", type=int, default=32, help="Prompt tokens of every --teacher-samples row.")
    parser.add_argument("--top-p", type=float, default=0.9, help="Nucleus mass of the teacher's sampling.")
    parser.add_argument(
        "--token-noise",
        type=float,
        default=0.0,
        metavar="P",
        help="Replace each KD input token with probability P by a token of the KD text (both models read it).",
    )
    parser.add_argument(
        "--hidden-loss-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="Add W x the cosine hidden-state loss, each student block matched to the teacher block it was pruned "
        "from (a learned projection bridges the widths).",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="Weight of the forward KL to the teacher; the KD text's own next-token cross-entropy gets 1 - alpha "
        "(default 1: pure KD).",
    )
    parser.add_argument(
        "--calibration-text",
        choices=[name for name in TEXTS if name != "wikitext2_test"],
        default="tinyshakespeare",
        help="Text of the calibration batches that score importance and the budget candidates.",
    )
    parser.add_argument(
        "--teacher-correction",
        type=int,
        default=0,
        metavar="STEPS",
        help="First fine-tune the teacher for STEPS steps on the KD text (cross-entropy; Minitron's teacher "
        "correction), then prune and distil from it; ratios are given to both teachers.",
    )
    parser.add_argument(
        "--correction-lr", type=float, default=1e-4, help="Peak learning rate of --teacher-correction."
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "minitron.json", help="JSON result path.")
    args = parser.parse_args(argv)
    size = dict(SIZES[args.size])
    if args.steps is not None:
        size["steps"] = args.steps
    if size["steps"] < 1:
        parser.error(f"argument --steps: must be >= 1, got {size['steps']}")
    if any(step < 1 or step >= size["steps"] for step in args.eval_at):
        parser.error(f"argument --eval-at: every step must be in [1, {size['steps'] - 1}], got {args.eval_at}")
    if args.teacher_samples < 0:
        parser.error(f"argument --teacher-samples: must be >= 0, got {args.teacher_samples}")
    if args.teacher_samples and not 0 < args.prompt < SIZES[args.size]["seq"]:
        parser.error(f"argument --prompt: must be in [1, {SIZES[args.size]['seq'] - 1}], got {args.prompt}")
    if not 0 < args.top_p <= 1:
        parser.error(f"argument --top-p: must be in (0, 1], got {args.top_p}")
    if not args.hidden_loss_weight >= 0:
        parser.error(f"argument --hidden-loss-weight: must be >= 0, got {args.hidden_loss_weight}")
    if args.teacher_correction < 0:
        parser.error(f"argument --teacher-correction: must be >= 0, got {args.teacher_correction}")
    if not args.correction_lr > 0:
        parser.error(f"argument --correction-lr: must be > 0, got {args.correction_lr}")
    if not 0 <= args.alpha <= 1:
        parser.error(f"argument --alpha: must be in [0, 1], got {args.alpha}")
    if not 0 <= args.token_noise < 1:
        parser.error(f"argument --token-noise: must be in [0, 1), got {args.token_noise}")
    size["bf16"] = args.bf16
    setup_threads(args.threads)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    start = time.perf_counter()
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    budget = int(args.fraction * _params(teacher))
    payload = {"benchmark": "minitron", "size": args.size, "machine": machine_info(), "budget": budget}
    payload["model"] = {"name": args.model, "params": _params(teacher), "layers": teacher.config.num_hidden_layers}
    print(f"teacher {args.model}: {_params(teacher):,} params; budget {budget:,}", flush=True)

    n = size["calibration"] * size["batch"]
    rows = blocks(token_stream(tokenizer, TEXTS[args.calibration_text], n * size["seq"]), size["seq"])
    batches = [{"input_ids": rows[i : i + size["batch"]]} for i in range(0, n, size["batch"])]
    needed = size["steps"] * size["batch"] * size["seq"]
    sampled, sampling = torch.empty(0, size["seq"], dtype=torch.long), None
    if args.teacher_samples:
        print(f"the teacher writes {args.teacher_samples} KD rows ...", flush=True)
        sample_start = time.perf_counter()
        source = blocks(token_stream(tokenizer, "wikitext2_valid"), size["seq"])
        eos, pad = special_token_ids(teacher, tokenizer)
        sampled, dropped = teacher_samples(teacher, source, args.teacher_samples, args.prompt, args.top_p, eos, pad)
        sampled = sampled[: needed // size["seq"]]  # never more rows than the budget
        sampling = {"rows": len(sampled), "dropped_at_eos": dropped, "prompt_tokens": args.prompt}
        sampling |= {"top_p": args.top_p, "seconds": time.perf_counter() - sample_start}
    text_needed = needed - len(sampled) * size["seq"]
    train_rows, train_texts = (
        kd_pool(tokenizer, args.train_text, size["seq"], text_needed, args.shift_repeats)
        if text_needed >= size["seq"]
        else (sampled[:0], [])
    )
    train_rows = torch.cat([train_rows, sampled])  # the texts first: the held-in KL reads the first rows
    if len(train_rows) < size["batch"]:
        raise ValueError(f"the KD texts have fewer than {size['batch']} rows of {size['seq']} tokens.")
    distinct = sum(t["distinct_tokens"] for t in train_texts) + len(sampled) * size["seq"]
    columns = {"input_ids": train_rows.tolist(), "attention_mask": torch.ones_like(train_rows).tolist()}
    train = datasets.Dataset.from_dict({**columns, "labels": train_rows.tolist()}).with_format("torch")
    rows_eval = blocks(token_stream(tokenizer, TEXTS["wikitext2_test"], size["eval_tokens"]), size["seq"])
    teacher_eval = _measure(teacher, rows_eval)
    payload["teacher"] = teacher_eval
    reference = teacher_eval["ppl"]  # what every student is also compared with: the teacher it learns from
    if args.teacher_correction:
        print(f"teacher correction: {args.teacher_correction} steps on the KD text ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            correction = correct_teacher(teacher, train, size, args.teacher_correction, args.correction_lr, tmp)
        payload["corrected_teacher"] = {**_measure(teacher, rows_eval), "correction": correction}
        reference = payload["corrected_teacher"]["ppl"]
        print(f"  corrected teacher: ppl {reference:.2f} (was {teacher_eval['ppl']:.2f})", flush=True)

    students = {}
    if "depth" in args.variants:
        students["depth"] = depth_only(teacher, batches, budget)
    grid = dict(max_candidates=size["candidates"], layer_importance="block_influence")
    for name, extra in (("width", {"depth": (1.0,)}), ("search", {})):
        if name not in args.variants:
            continue
        print(f"budget search ({name}):", flush=True)
        result = search_budget(teacher, budget, batches, **grid, **extra)
        kept = [i for i in range(teacher.config.num_hidden_layers) if i not in set(result.removed.get("layers", ()))]
        info = {"shape": vars(result.shape), "table": result.table, "kept_layers": kept}
        students[name] = (result.model, info)

    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (student, info) in students.items():
            print(f"{name}: {info['shape']} -> distilling ...", flush=True)
            pruned = _measure(student, rows_eval)
            curve = PerplexityCurve(rows_eval, args.eval_at, teacher_eval["ppl"], size["batch"] * size["seq"])
            noise = TokenNoise(train_rows, args.token_noise) if args.token_noise else None  # fresh seed per variant
            options = {"alpha": args.alpha}
            if args.hidden_loss_weight:  # each student block matched to the teacher block it was pruned from
                layer_map = dict(enumerate(info["kept_layers"]))
                options |= dict(hidden_loss_weight=args.hidden_loss_weight, hidden_loss="cosine", layer_map=layer_map)
            recovery = distil(
                teacher, student.train(), tokenizer, train, size, args.lr, f"{tmp}/{name}", curve, noise, **options
            )
            recovered = _measure(student, rows_eval)
            held_in = train_rows[: len(rows_eval)]  # the first KD rows, as many as the test rows
            kl = {"held_in": mean_kl(teacher, student, held_in), "held_out": mean_kl(teacher, student, rows_eval)}
            print(f"  KL to the teacher: held-in {kl['held_in']:.3f}, held-out {kl['held_out']:.3f} nats/token")
            variants[name] = {
                **info,
                "params": _params(student),
                "pruned": pruned,
                "recovered": recovered,
                "recovery": recovery,
                "ppl_ratio_pruned": pruned["ppl"] / teacher_eval["ppl"],
                "ppl_ratio_recovered": recovered["ppl"] / teacher_eval["ppl"],
                "ppl_ratio_to_distilled_teacher": recovered["ppl"] / reference,
                "tokens_per_s_ratio": recovered["tokens_per_s"] / teacher_eval["tokens_per_s"],
                "kl_to_teacher": kl,
            }
    payload["variants"] = variants
    payload["settings"] = {
        "steps": size["steps"],
        "batch": f"{size['batch']}x{size['seq']}",
        "train_tokens": needed,
        "distinct_train_tokens": distinct,
        "epochs": needed / distinct,
        "train_text": train_texts,
        "shifted_repeats": args.shift_repeats,
        "teacher_samples": sampling,
        "token_noise": args.token_noise,
        "alpha": args.alpha,
        "teacher_correction": payload.get("corrected_teacher", {}).get("correction"),
        "hidden_loss": {"weight": args.hidden_loss_weight, "distance": "cosine", "layers": "the blocks kept"}
        if args.hidden_loss_weight
        else None,
        "precision": "bf16 autocast (teacher bf16)" if args.bf16 else "fp32",
        "calibration": f"{size['calibration']} batches of {args.calibration_text}",
        "learning_rate": args.lr,
        "layer_importance": "block_influence (the search's skip-loss option costs num_layers + 1 forwards per batch)",
    }
    payload["total_seconds"] = time.perf_counter() - start
    table = [
        {
            "variant": name,
            "layers": v["shape"]["layers"],
            "hidden": v["shape"]["hidden"],
            "heads": v["shape"]["heads"],
            "ffn": v["shape"]["ffn"],
            "params": v["params"],
            "ppl/teacher pruned": round(v["ppl_ratio_pruned"], 3),
            "ppl/teacher recovered": round(v["ppl_ratio_recovered"], 3),
            "ppl/corrected teacher": round(v["ppl_ratio_to_distilled_teacher"], 3) if args.teacher_correction else "-",
            "tokens/s": round(v["recovered"]["tokens_per_s"]),
        }
        for name, v in variants.items()
    ]
    print(
        f"\nteacher: {payload['model']['params']:,} params, ppl {teacher_eval['ppl']:.2f}, "
        f"{teacher_eval['tokens_per_s']:.0f} tokens/s; {size['steps']} KD steps of {payload['settings']['batch']}\n"
        + format_table(table)
    )
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
