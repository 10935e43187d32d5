"""Structured pruning on CPU: does removing 50% of heads and FFN neurons buy the speed its FLOPs promise?

One run measures, side by side:

1. Latency of a MiniLM-shaped BERT (6 layers, 384 wide, 12 heads, FFN 1536) and a SmolLM2-shaped Llama (6 layers,
   576 wide, 9 query / 3 KV heads, FFN 1536, vocab 49152), dense vs pruned by magnitude importance (the same number
   of heads and neurons in every layer, so the result reloads), at batch 1x128 and 32x128; next to it the analytic
   FLOP ratio, the realised speedup per FLOP reduction, parameters, bytes, and a save -> reload logits check.
2. Training-step overhead of ``PruningCallback`` (cubic heads + FFN schedule, active during the measured steps) and
   of ``torch.nn.utils.prune`` masks, against plain ``Trainer`` steps on the same model and data.

Usage (from the repository root): ``python bench/bench_pruning.py --size full``; ``--size tiny`` is a smoke test.
Results go to ``bench/results/pruning.json``. Random weights: latency does not depend on their values.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import tempfile
from pathlib import Path

import torch
from common import RESULTS_DIR, machine_info, setup_threads, time_ms, write_json
from pruning_overhead import training_section
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers import (
    logging as hf_logging,
)

from hf_compress.loading import from_pretrained, needs_loader, save_pretrained
from hf_compress.models.families import get_family
from hf_compress.pruning.importance import head_groups, unit_scores
from hf_compress.pruning.surgery import layer_structure, prune_ffn_neurons, prune_heads
from hf_compress.reporting.measure import count_parameters, folder_size_bytes, format_table, model_size_bytes

BERT = dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)
LLAMA = dict(
    num_hidden_layers=6,
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
)
# Per size: shape overrides, sequence length, (batch, timed repeats) pairs, training batch / steps / warm-up steps.
SIZES = {
    "tiny": dict(
        bert=dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256, vocab_size=1000),
        llama=dict(
            num_hidden_layers=2,
            hidden_size=96,
            num_attention_heads=6,
            num_key_value_heads=3,
            intermediate_size=256,
            vocab_size=1000,
        ),
        seq=32,
        batches=((1, 5), (4, 3)),
        train_batch=4,
        train_steps=10,
        train_skip=3,
    ),
    "small": dict(
        bert=dict(num_hidden_layers=2),
        llama=dict(num_hidden_layers=2),
        seq=128,
        batches=((1, 10), (8, 5)),
        train_batch=8,
        train_steps=14,
        train_skip=4,
    ),
    "full": dict(bert={}, llama={}, seq=128, batches=((1, 20), (32, 5)), train_batch=8, train_steps=20, train_skip=4),
}
FLOPS_METHOD = (
    "analytic from shapes, 2 FLOPs per multiply-add: q/k/v/o projections, attention scores QK^T and AV over the full "
    "seq x seq square (no causal halving), FFN (up/down, + gate for Llama), head (BERT pooler + classifier per "
    "sequence; Llama lm-head per logits position); embedding lookups 0; norms/softmax/activations/residuals ignored"
)


def build_models(size: dict, seq: int) -> dict[str, torch.nn.Module]:
    """The two dense models, in eval mode with SDPA attention, from configs (random weights, seeded)."""
    torch.manual_seed(0)
    bert = BertConfig(**{**BERT, **size["bert"]}, max_position_embeddings=max(512, seq), num_labels=2)
    llama = LlamaConfig(**{**LLAMA, **size["llama"]}, max_position_embeddings=max(2048, seq), tie_word_embeddings=True)
    models = {"bert": BertForSequenceClassification(bert), "llama": LlamaForCausalLM(llama)}
    for model in models.values():
        model.set_attn_implementation("sdpa")
        model.eval()
    return models


def n_removed(fraction: float, units: int) -> int:
    """Units to remove for ``fraction``: nearest whole number, ties rounded down, at least one unit kept."""
    return max(0, min(units - 1, math.ceil(fraction * units - 0.5)))


def magnitude_plan(model: torch.nn.Module, fraction: float) -> tuple[dict, dict]:
    """Lowest-magnitude head groups and FFN neurons, the same count in every layer (``{layer: [indices]}``)."""
    heads, neurons = {}, {}
    for layer, scores in unit_scores(model, "heads").items():
        groups = head_groups(model, layer)
        drop = scores.argsort()[: n_removed(fraction, len(groups))].tolist()
        heads[layer] = sorted(h for g in drop for h in groups[g])
    for layer, scores in unit_scores(model, "ffn_neurons").items():
        neurons[layer] = sorted(scores.argsort()[: n_removed(fraction, len(scores))].tolist())
    return heads, neurons


def forward_flops(model: torch.nn.Module, batch: int, seq: int, logits: int) -> dict[str, int]:
    """Analytic forward FLOPs per component (see ``FLOPS_METHOD``); ``logits`` = lm-head positions per sequence."""
    hidden, gated = model.config.hidden_size, get_family(model).gate is not None
    out = dict(qkvo=0, attention_scores=0, ffn=0, embeddings=0, head=0)
    for layer in layer_structure(model):
        q, kv = layer["num_heads"] * layer["head_dim"], layer["num_kv_heads"] * layer["head_dim"]
        out["qkvo"] += 2 * seq * hidden * (2 * q + 2 * kv)
        out["attention_scores"] += 2 * 2 * seq * seq * q
        out["ffn"] += 2 * seq * hidden * layer["ffn"] * (3 if gated else 2)
    if model.config.model_type == "bert":
        out["head"] = 2 * hidden * hidden + 2 * hidden * model.config.num_labels
    else:
        out["head"] = 2 * logits * hidden * model.config.vocab_size
    out = {key: value * batch for key, value in out.items()}
    out["total"] = sum(out.values())
    return out


def counted_flops(model: torch.nn.Module, inputs: dict) -> int:
    """``torch.utils.flop_counter`` total of one forward with eager attention (CPU SDPA kernels are not counted)."""
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(**inputs)
    finally:
        model.set_attn_implementation("sdpa")
    return counter.get_total_flops()


def random_inputs(model: torch.nn.Module, batch: int, seq: int, logits: int | None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(5, model.config.vocab_size, (batch, seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if logits is not None:
        inputs["logits_to_keep"] = logits
    return inputs


def reload_check(name: str, pruned: torch.nn.Module, inputs: dict, folder: Path) -> dict:
    """Save ``pruned``, reload it (plain transformers for Llama, hf_compress for BERT), compare full logits."""
    save_pretrained(pruned, folder)
    plain = not needs_loader(pruned.config.to_dict())
    if name == "llama":
        reloaded, loader = AutoModelForCausalLM.from_pretrained(folder), "transformers.AutoModelForCausalLM"
    else:
        reloaded, loader = from_pretrained(folder), "hf_compress.loading.from_pretrained"
    reloaded.set_attn_implementation("sdpa")
    reloaded.eval()
    inputs = {k: v for k, v in inputs.items() if k != "logits_to_keep"}
    with torch.inference_mode():
        before, after = pruned(**inputs).logits, reloaded(**inputs).logits
    return {
        "loader": loader,
        "plain_from_pretrained_possible": plain,
        "identical": bool(torch.equal(before, after)),
        "max_abs_diff": float((before - after).abs().max()),
        "weights_disk_bytes": folder_size_bytes(folder, True),
    }


def latency_section(
    name: str, dense: torch.nn.Module, size: dict, fraction: float, logits: int | None, workdir: Path
) -> dict:
    seq = size["seq"]
    pruned = copy.deepcopy(dense)
    heads, neurons = magnitude_plan(pruned, fraction)
    prune_heads(pruned, heads)
    prune_ffn_neurons(pruned, neurons)
    before, after = layer_structure(dense), layer_structure(pruned)
    q_total, q_kept = sum(x["num_heads"] for x in before), sum(x["num_heads"] for x in after)
    kv_total, kv_kept = sum(x["num_kv_heads"] for x in before), sum(x["num_kv_heads"] for x in after)
    f_total, f_kept = sum(x["ffn"] for x in before), sum(x["ffn"] for x in after)
    params = {"dense": count_parameters(dense)["total"], "pruned": count_parameters(pruned)["total"]}
    save_pretrained(dense, workdir / f"{name}-dense")
    result = {
        "shape": {k: getattr(dense.config, k) for k in (*LLAMA, "num_key_value_heads") if hasattr(dense.config, k)},
        "requested_fraction": fraction,
        "rounding": "per layer, the nearest whole number of head groups (query heads sharing a KV head) and of FFN "
        "neurons, ties rounded down; lowest L2 magnitude removed first",
        "achieved": {
            "head_sparsity": 1 - q_kept / q_total,
            "kv_head_sparsity": 1 - kv_kept / kv_total,
            "ffn_sparsity": 1 - f_kept / f_total,
            "layers_after": after[0],
        },
        "params": {**params, "ratio": params["pruned"] / params["dense"]},
        "bytes": {
            "dense_memory": model_size_bytes(dense),
            "pruned_memory": model_size_bytes(pruned),
            "dense_disk": folder_size_bytes(workdir / f"{name}-dense", True),
        },
        "logits_positions": "n/a (classifier on [CLS])" if logits is None else ("all" if logits == 0 else logits),
        "flops_method": FLOPS_METHOD,
        "batches": {},
    }
    check = random_inputs(dense, 1, seq, logits)
    analytic = forward_flops(dense, 1, seq, logits or seq)["total"]
    result["flop_counter_check"] = {"batch": 1, "counted": counted_flops(dense, check), "analytic": analytic}
    result["flop_counter_check"]["ratio"] = result["flop_counter_check"]["counted"] / analytic
    for batch, repeats in size["batches"]:
        inputs = random_inputs(dense, batch, seq, logits)
        fns = {"dense": functools.partial(dense, **inputs), "pruned": functools.partial(pruned, **inputs)}
        stats = time_ms(fns, repeats, warmup=1)
        flops = {
            kind: forward_flops(model, batch, seq, logits or seq)
            for kind, model in (("dense", dense), ("pruned", pruned))
        }
        speedup = stats["dense"]["median"] / stats["pruned"]["median"]
        flop_x = flops["dense"]["total"] / flops["pruned"]["total"]
        result["batches"][f"{batch}x{seq}"] = {
            "dense_ms": stats["dense"],
            "pruned_ms": stats["pruned"],
            "flops": flops,
            "speedup": speedup,
            "flop_reduction": flop_x,
            "speedup_per_flop_reduction": speedup / flop_x,
        }
    reload = reload_check(name, pruned, check, workdir / f"{name}-pruned")
    result["bytes"]["pruned_disk"] = reload.pop("weights_disk_bytes")
    result["reload"] = reload
    return result


def print_tables(latency: dict, training: dict) -> None:
    rows = []
    for name, res in latency.items():
        for shape, b in res["batches"].items():
            rows.append(
                {
                    "model": name,
                    "batch": shape,
                    "dense ms": b["dense_ms"]["median"],
                    "pruned ms": b["pruned_ms"]["median"],
                    "speedup": f"{b['speedup']:.2f}x",
                    "FLOP reduction": f"{b['flop_reduction']:.2f}x",
                    "speedup/FLOP": f"{b['speedup_per_flop_reduction']:.2f}",
                }
            )
    print("\nLatency (median, CPU; goal speedup/FLOP >= 0.9)\n" + format_table(rows))
    rows = [
        {
            "model": name,
            "heads removed": f"{100 * r['achieved']['head_sparsity']:.1f}%",
            "kv heads removed": f"{100 * r['achieved']['kv_head_sparsity']:.1f}%",
            "ffn removed": f"{100 * r['achieved']['ffn_sparsity']:.1f}%",
            "params": r["params"]["dense"],
            "params pruned": r["params"]["pruned"],
            "disk MB": r["bytes"]["dense_disk"] / 1e6,
            "pruned disk MB": r["bytes"]["pruned_disk"] / 1e6,
            "reload": r["reload"]["loader"],
            "identical logits": r["reload"]["identical"],
            "FlopCounter/analytic": r["flop_counter_check"]["ratio"],
        }
        for name, r in latency.items()
    ]
    print("\nStructure and reload\n" + format_table(rows))
    rows = []
    for name, v in training["variants"].items():
        row = {
            "variant": name,
            "median step s": v["step_s"]["median"],
            "p25": v["step_s"]["p25"],
            "p75": v["step_s"]["p75"],
            "ratio": f"{v['ratio_vs_no_callback']:.3f}",
        }
        if "hooks_fraction_of_step" in v:
            row["callback hooks (mean/step)"] = f"{100 * v['hooks_fraction_of_step']:.1f}%"
        rows.append(row)
    if rows:
        print(f"\nTraining step time, {training['batch']} (goal ratio <= 1.03)\n" + format_table(rows))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="full", help="Model / batch sizes (tiny = smoke).")
    parser.add_argument("--fraction", type=float, default=0.5, help="Fraction of heads and of FFN neurons removed.")
    parser.add_argument(
        "--llama-logits",
        choices=("last", "all"),
        default="last",
        help="Llama lm-head positions timed: last (prefill, logits_to_keep=1) or all.",
    )
    parser.add_argument(
        "--prune-every",
        type=int,
        default=10,
        help="Frequency of the second PruningCallback run (the first prunes every step).",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--skip-training", action="store_true", help="Only the latency part.")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "pruning.json", help="JSON result path.")
    args = parser.parse_args(argv)
    if not 0 < args.fraction < 1:
        parser.error(f"`--fraction` must be in (0, 1), got {args.fraction}.")
    if args.prune_every < 1:
        parser.error(f"`--prune-every` must be >= 1, got {args.prune_every}.")
    setup_threads(args.threads)
    hf_logging.disable_progress_bar()
    size = SIZES[args.size]
    payload = {"benchmark": "pruning", "size": args.size, "machine": machine_info(), "latency": {}}
    models = build_models(size, size["seq"])
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            print(f"latency: {name} ...", flush=True)
            logits = None if name == "bert" else (1 if args.llama_logits == "last" else 0)
            payload["latency"][name] = latency_section(name, model, size, args.fraction, logits, Path(tmp))
        if not args.skip_training:
            payload["training"] = training_section(models["bert"], size, Path(tmp), args.prune_every)
    payload["machine"]["load_average_1m_end"] = machine_info()["load_average_1m"]
    print_tables(payload["latency"], payload.get("training", {"variants": {}}))
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
