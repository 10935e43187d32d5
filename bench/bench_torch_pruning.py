"""hf_compress structured pruning vs Torch-Pruning on the same SST-2 teacher, ratio, criterion and recovery.

Both prune the fine-tuned all-MiniLM-L6-v2 SST-2 teacher (see ``bench_sst2.py``) to ``--ratio`` (default 50%) of its
attention heads and FFN neurons in every layer, by L2 weight magnitude, keeping the hidden width:

* **hf_compress**: ``pruning.importance.unit_scores`` picks the heads / neurons (the same count per layer, as in
  ``bench_pruning.py``), ``pruning.surgery.prune_heads`` / ``prune_ffn_neurons`` slice them out and record the
  per-layer shapes in the config;
* **Torch-Pruning** (``pip install --no-deps torch-pruning``): ``tp.pruner.MetaPruner`` with
  ``MagnitudeImportance(p=2)``, ``num_heads`` for the query / key / value projections, ``prune_num_heads=True``,
  ``prune_head_dims=False``, ``head_pruning_ratio`` = ``pruning_ratio`` = the ratio, and the attention-output /
  FFN-down projections, pooler and classifier ignored so the residual width stays; traced with eager attention,
  then the attention modules' ``num_attention_heads`` / ``attention_head_size`` / ``all_head_size`` patched by hand
  (as Torch-Pruning's BERT example does). The config is left as Torch-Pruning leaves it.

Then each pruned model gets the same recovery fine-tune (plain ``Trainer`` on the labels, same steps, lr, seed and
batches). Reported side by side: parameters, accuracy before / after recovery, CPU latency at batch 1 and 32
(sequence 64, median, interleaved with the teacher), and whether the saved model reloads: ``save_pretrained`` then
``AutoModelForSequenceClassification.from_pretrained`` (the exception is recorded verbatim), the same with
``ignore_mismatched_sizes=True`` (accuracy of what loads), and ``hf_compress.loading.save_pretrained`` +
``from_pretrained`` (logits compared with ``torch.equal``).

``--llm`` runs ``bench_torch_pruning_llm.py`` instead (Torch-Pruning's LLM example on SmolLM2-135M; the other
arguments go to it).

Usage: ``python bench/bench_torch_pruning.py --size full`` (about 10 min on 2 quiet cores once the teacher is cached);
``--size tiny`` is a smoke test. Results go to ``bench/results/torch_pruning.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import sys
import tempfile
from pathlib import Path

import bench_torch_pruning_llm
import torch
from bench_pruning import magnitude_plan
from bench_sst2 import accuracy, add_common_arguments, latency, setup, timed_train, train_args
from common import machine_info, setup_threads, write_json
from transformers import AutoModelForSequenceClassification, Trainer
from transformers import logging as hf_logging

from hf_compress.loading import from_pretrained, needs_loader, save_pretrained
from hf_compress.models.families import get_layers
from hf_compress.pruning.surgery import layer_structure, prune_ffn_neurons, prune_heads
from hf_compress.reporting.measure import count_parameters, folder_size_bytes, format_table

try:
    import torch_pruning as tp
except ImportError:  # the benchmark's only extra dependency
    tp = None


def prune_ours(teacher: torch.nn.Module, ratio: float) -> torch.nn.Module:
    model = copy.deepcopy(teacher).requires_grad_(True)
    heads, neurons = magnitude_plan(model, ratio)
    prune_heads(model, heads)
    prune_ffn_neurons(model, neurons)
    return model


def prune_torch_pruning(teacher: torch.nn.Module, ratio: float, inputs: dict) -> torch.nn.Module:
    """Torch-Pruning's MetaPruner on heads (whole heads, head width kept) and FFN neurons; hidden width untouched."""
    model = copy.deepcopy(teacher).requires_grad_(True).eval()
    model.set_attn_implementation("eager")  # the dependency graph must see the q/k/v matmuls that couple heads
    num_heads, ignored = {}, [model.classifier, model.bert.pooler]
    for layer in get_layers(model):
        attention = layer.attention.self
        for linear in (attention.query, attention.key, attention.value):
            num_heads[linear] = attention.num_attention_heads
        ignored += [layer.attention.output.dense, layer.output.dense]  # their outputs are the residual stream
    example = {k: v[:2] for k, v in inputs.items()}
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=False,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        ignored_layers=ignored,
        output_transform=lambda out: out.logits.sum(),
    )
    pruner.step()
    for layer in get_layers(model):  # Torch-Pruning slices weights; the module attributes are ours to fix
        attention = layer.attention.self
        attention.num_attention_heads = pruner.num_heads[attention.query]
        attention.attention_head_size = attention.query.out_features // attention.num_attention_heads
        attention.all_head_size = attention.query.out_features
    model.set_attn_implementation("sdpa")
    return model


def structure(model: torch.nn.Module) -> dict:
    layers = layer_structure(model)
    return {
        "heads_per_layer": [x["num_heads"] for x in layers],
        "head_dim": layers[0]["head_dim"],
        "ffn_per_layer": [x["ffn"] for x in layers],
        "params": count_parameters(model)["total"],
    }


def recover(model: torch.nn.Module, ctx: dict, workdir: Path) -> float:
    trainer = Trainer(
        model=model, args=train_args(workdir, ctx["size"]), train_dataset=ctx["train"], data_collator=ctx["collator"]
    )
    return timed_train(trainer)


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(**inputs).logits


def reload_report(name: str, model: torch.nn.Module, ctx: dict, folder: Path) -> dict:
    """Plain ``save_pretrained`` -> ``from_pretrained`` (strict, then ignoring mismatches), and hf_compress's pair."""
    inputs, expected = ctx["inputs"], logits(model, ctx["inputs"])
    plain, ours = folder / f"{name}-plain", folder / f"{name}-hf_compress"
    model.save_pretrained(plain)
    fresh = AutoModelForSequenceClassification.from_config(model.config).state_dict()
    mismatched = {
        k: (list(v.shape), list(fresh[k].shape))
        for k, v in model.state_dict().items()
        if k in fresh and v.shape != fresh[k].shape
    }
    out = {
        "config_heads": model.config.num_attention_heads,
        "config_ffn": model.config.intermediate_size,
        "tensors_mismatching_config": len(mismatched),
        "example_mismatch": next((f"{k}: saved {a} vs config {b}" for k, (a, b) in mismatched.items()), None),
    }
    try:
        reloaded = AutoModelForSequenceClassification.from_pretrained(plain)
        out["plain_from_pretrained"] = {"ok": True, "identical": bool(torch.equal(expected, logits(reloaded, inputs)))}
    except Exception as error:  # noqa: BLE001 - what transformers raises is the result being reported
        out["plain_from_pretrained"] = {"ok": False, "error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
    loose = AutoModelForSequenceClassification.from_pretrained(plain, ignore_mismatched_sizes=True)
    out["plain_ignore_mismatched_sizes"] = {
        "accuracy": accuracy(loose, ctx),
        "identical": bool(torch.equal(expected, logits(loose, inputs))),
    }
    save_pretrained(model, ours)
    reloaded = from_pretrained(ours)
    reloaded.set_attn_implementation("sdpa")
    diff = (expected - logits(reloaded, inputs)).abs().max()
    out["hf_compress_from_pretrained"] = {
        "needs_loader": needs_loader(reloaded.config.to_dict()),
        "identical": bool(diff == 0),
        "max_abs_diff": float(diff),
        "disk_bytes": folder_size_bytes(ours),
    }
    return out


def print_tables(payload: dict) -> None:
    rows = payload["rows"]
    table = [
        {
            "model": name,
            "params": r["structure"]["params"],
            "heads/layer": r["structure"]["heads_per_layer"][0],
            "ffn/layer": r["structure"]["ffn_per_layer"][0],
            "acc pruned": "-" if r["accuracy_pruned"] is None else f"{100 * r['accuracy_pruned']:.2f}",
            "acc recovered": f"{100 * r['accuracy']:.2f}",
            "b1 ms": r["latency_ms"]["b1"]["median"],
            "b32 ms": r["latency_ms"]["b32"]["median"],
            "speed x b1": f"{r['speed_x_b1']:.2f}",
            "speed x b32": f"{r['speed_x_b32']:.2f}",
        }
        for name, r in rows.items()
    ]
    print(
        f"\nStructured pruning at {payload['ratio']:.0%} heads + FFN, {payload['recovery_steps']} recovery steps "
        f"(torch-pruning {payload['torch_pruning_version']})\n" + format_table(table)
    )
    table = []
    for name, r in rows.items():
        if "reload" in r:
            reload = r["reload"]
            plain = reload["plain_from_pretrained"]
            table.append(
                {
                    "model": name,
                    "plain from_pretrained": "ok" if plain["ok"] else plain["error"][:60],
                    "ignore_mismatched acc": f"{100 * reload['plain_ignore_mismatched_sizes']['accuracy']:.2f}",
                    "hf_compress reload identical": reload["hf_compress_from_pretrained"]["identical"],
                }
            )
    print("\nSave -> reload\n" + format_table(table))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--llm" in argv:
        return bench_torch_pruning_llm.main([a for a in argv if a != "--llm"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "torch_pruning.json")
    parser.add_argument("--ratio", type=float, default=0.5, help="Fraction of heads and of FFN neurons pruned.")
    args = parser.parse_args(argv)
    if not 0 < args.ratio < 1:
        parser.error(f"`--ratio` must be in (0, 1), got {args.ratio}.")
    if tp is None:
        parser.error("`torch_pruning` is not installed; run `pip install --no-deps torch-pruning`.")
    setup_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    payload = {
        "benchmark": "torch_pruning",
        "size": args.size,
        "machine": machine_info(),
        "ratio": args.ratio,
        "torch_pruning_version": importlib.metadata.version("torch-pruning"),
        "torch_pruning_module_version": getattr(tp, "__version__", None),
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ctx = setup(args, workdir)
        payload["teacher"] = ctx["teacher_info"]
        payload["recovery_steps"] = ctx["size"]["steps"]
        payload["recovery"] = "plain Trainer on the labels, same steps / lr / seed / batches for both"
        teacher = ctx["teacher"]
        models = {
            "teacher": teacher,
            "hf_compress": prune_ours(teacher, args.ratio),
            "torch_pruning": prune_torch_pruning(teacher, args.ratio, ctx["inputs"]),
        }
        rows = {
            name: {
                "structure": structure(model),
                "accuracy_pruned": None if name == "teacher" else accuracy(model, ctx),
            }
            for name, model in models.items()
        }
        diff = logits(models["hf_compress"], ctx["inputs"]) - logits(models["torch_pruning"], ctx["inputs"])
        payload["pruned_logits_max_abs_diff"] = float(diff.abs().max())  # 0: both removed the same units
        for name in ("hf_compress", "torch_pruning"):
            print(f"recovering {name} ...", flush=True)
            rows[name]["train_s"] = recover(models[name], ctx, workdir / name)
        for name, model in models.items():
            rows[name]["accuracy"] = accuracy(model, ctx)
        for name in ("hf_compress", "torch_pruning"):
            rows[name]["reload"] = reload_report(name, models[name], ctx, workdir / "saved")
        print("timing ...", flush=True)
        for name, value in latency(models, ctx["inputs"], ctx["size"]["repeats"]).items():
            rows[name]["latency_ms"] = value
    reference = rows["teacher"]["latency_ms"]
    for row in rows.values():
        for batch in ("b1", "b32"):
            row[f"speed_x_{batch}"] = reference[batch]["median"] / row["latency_ms"][batch]["median"]
    payload["rows"] = rows
    payload["machine"]["load_average_1m_end"] = machine_info()["load_average_1m"]
    print_tables(payload)
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
