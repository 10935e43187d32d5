"""Unstructured magnitude pruning: hf_compress vs ``torch.nn.utils.prune`` at the same sparsity and fine-tune.

From the fine-tuned all-MiniLM-L6-v2 SST-2 teacher (see ``bench_sst2.py``), on the same weights (every ``nn.Linear``
that ``hf_compress.pruning.unstructured.prunable_weights`` selects: attention, FFN, pooler and classifier), at each
``--sparsities`` value:

* ``hf_compress-S``: ``PruningCallback(target="unstructured", sparsity=S, schedule="one_shot")`` - global L1
  magnitude masks at step 0, held through every optimizer step by zeroing weights / gradients / Adam state;
* ``torch_prune-S``: the classic recipe, ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured,
  amount=S)`` before training (``weight = weight_orig * weight_mask`` in a forward pre-hook), ``prune.remove``
  after it;

each followed by the same short fine-tune (plain ``Trainer`` on the labels, same steps, lr, seed and batches) as
the ``dense`` run without pruning. Reported side by side: sparsity reached (before and after the fine-tune),
accuracy (after one-shot pruning and after the fine-tune; ``magnitude_prune`` gives the hf_compress one-shot
number), median training-step time vs the dense run (same process, same data), CPU latency at batch 1 and 32, and
the saved model: folder bytes, zlib-compressed weight bytes (the only storage gain dense zeros get without a sparse
format), and whether plain ``from_pretrained`` gets the pruned model back - for ``torch.nn.utils.prune`` both with
the re-parametrisation still in place (the checkpoint then holds ``weight_orig`` + ``weight_mask``) and after
``prune.remove``.

Neither method makes the model faster or smaller on dense kernels: zeros are multiplied and stored like any value.

Usage: ``python bench/bench_unstructured.py --size full`` (about 10 min on 2 quiet cores once the teacher is
cached); ``--size tiny`` is a smoke test. Results go to ``bench/results/unstructured.json``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import zlib
from pathlib import Path

import torch
from bench_sst2 import accuracy, add_common_arguments, latency, setup, timed_train, train_args
from common import StepTimer, machine_info, setup_threads, summarize, write_json
from torch.nn.utils import prune as torch_prune
from transformers import AutoModelForSequenceClassification, Trainer
from transformers import logging as hf_logging

from hf_compress import PruningCallback, PruningConfig
from hf_compress.pruning.unstructured import magnitude_prune, prunable_weights, sparsity_report
from hf_compress.reporting.measure import folder_size_bytes, format_table

NOTE = (
    "Neither gives a dense speedup or a smaller dense checkpoint: zeros are multiplied and stored like any other "
    "value. torch.nn.utils.prune is slower while its re-parametrisation is in place (weight_orig * weight_mask "
    "recomputed every forward) and, saved in that state, stores two tensors per pruned weight."
)


def linear_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """``(module, "weight")`` for the weights ``prunable_weights`` selects, the parameter list torch prune takes."""
    modules = dict(model.named_modules())
    return [(modules[name.removesuffix(".weight")], "weight") for name in prunable_weights(model)]


def torch_pruned(teacher: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    model = copy.deepcopy(teacher).requires_grad_(True)
    torch_prune.global_unstructured(linear_modules(model), pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    return model


def remove_reparametrisation(model: torch.nn.Module) -> torch.nn.Module:
    for module, name in linear_modules(model):
        if torch_prune.is_pruned(module):
            torch_prune.remove(module, name)
    return model


def prunable_sparsity(model: torch.nn.Module) -> float:
    """Zero fraction of the selected Linear weights as the forward sees them (``module.weight``; masked for torch)."""
    weights = [module.weight for module, _ in linear_modules(model)]
    return 1 - sum(int(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)


def fine_tune(model: torch.nn.Module, ctx: dict, workdir: Path, callbacks: list) -> dict:
    timer = StepTimer()
    trainer = Trainer(
        model=model,
        args=train_args(workdir, ctx["size"]),
        train_dataset=ctx["train"],
        data_collator=ctx["collator"],
        callbacks=[timer, *callbacks],
    )
    seconds = timed_train(trainer)
    times = timer.step_times(skip=1 if ctx["size"]["steps"] <= 8 else 5)  # skip warm-up steps
    return {"train_s": seconds, "step_s": summarize(times)}


def saved(model: torch.nn.Module, ctx: dict, folder: Path) -> dict:
    """Plain ``save_pretrained`` -> bytes (raw and zlib-compressed weights) -> plain ``from_pretrained``."""
    model.save_pretrained(folder)
    weights = b"".join(f.read_bytes() for f in sorted(folder.glob("*.safetensors")))
    keys = list(model.state_dict())
    out = {
        "disk_bytes": folder_size_bytes(folder),
        "zlib_weights_bytes": len(zlib.compress(weights, 1)),
        "has_weight_orig_and_mask": any(k.endswith("weight_orig") for k in keys),
    }
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    missing = [k for k in reloaded.state_dict() if k not in keys]  # re-initialised: not in the checkpoint
    out["reload"] = {
        "accuracy": accuracy(reloaded, ctx),
        "missing_weights": len(missing),
        "example_missing": missing[0] if missing else None,
        "sparsity": prunable_sparsity(reloaded),
    }
    return out


def print_tables(payload: dict) -> None:
    rows = payload["rows"]
    table = [
        {
            "model": name,
            "target sparsity": r["target_sparsity"],
            "reached": f"{100 * r['sparsity_after']:.1f}%",
            "acc one-shot": "-" if r["accuracy_oneshot"] is None else f"{100 * r['accuracy_oneshot']:.2f}",
            "acc fine-tuned": f"{100 * r['accuracy']:.2f}",
            "step s": r["step_s"]["median"],
            "step ratio": f"{r['step_ratio_vs_dense']:.3f}",
            "b1 ms": r["latency_ms"]["b1"]["median"],
            "b32 ms": r["latency_ms"]["b32"]["median"],
        }
        for name, r in rows.items()
    ]
    print(
        f"\nUnstructured pruning, {payload['steps']} fine-tune steps (median step time, same run)\n"
        + format_table(table)
    )
    table = []
    for name, r in rows.items():
        for state, s in r["saved"].items():
            table.append(
                {
                    "model": name,
                    "saved": state,
                    "disk MB": s["disk_bytes"] / 1e6,
                    "zlib weights MB": s["zlib_weights_bytes"] / 1e6,
                    "weight_orig+mask": s["has_weight_orig_and_mask"],
                    "reload acc": f"{100 * s['reload']['accuracy']:.2f}",
                    "reload sparsity": f"{100 * s['reload']['sparsity']:.1f}%",
                    "missing weights": s["reload"]["missing_weights"],
                }
            )
    print("\nSaved with save_pretrained, reloaded with plain from_pretrained\n" + format_table(table))
    print(f"\nNote: {NOTE}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, "unstructured.json")
    parser.add_argument(
        "--sparsities",
        type=float,
        nargs="+",
        default=[0.5, 0.8],
        help="Fractions of the selected Linear weights zeroed, one pair of runs each.",
    )
    args = parser.parse_args(argv)
    if any(not 0 < s < 1 for s in args.sparsities):
        parser.error(f"`--sparsities` must all be in (0, 1), got {args.sparsities}.")
    setup_threads(args.threads)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    payload = {"benchmark": "unstructured", "size": args.size, "machine": machine_info(), "note": NOTE}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ctx = setup(args, workdir)
        teacher = ctx["teacher"]
        payload |= {
            "teacher": ctx["teacher_info"],
            "steps": ctx["size"]["steps"],
            "sparsities": args.sparsities,
            "pruned_weights": len(prunable_weights(teacher)),
            "scope": "global (one threshold, all weights)",
        }
        models = {"dense": copy.deepcopy(teacher).requires_grad_(True)}
        rows = {"dense": {"target_sparsity": 0.0, "accuracy_oneshot": None, "sparsity_before": 0.0}}
        callbacks = {"dense": []}
        for sparsity in args.sparsities:
            ours, theirs = f"hf_compress-{sparsity:g}", f"torch_prune-{sparsity:g}"
            oneshot = copy.deepcopy(teacher)
            magnitude_prune(oneshot, sparsity)
            models[ours] = copy.deepcopy(teacher).requires_grad_(True)
            callbacks[ours] = [
                PruningCallback(PruningConfig(target="unstructured", sparsity=sparsity, schedule="one_shot"))
            ]
            models[theirs], callbacks[theirs] = torch_pruned(teacher, sparsity), []
            masks_equal = all(
                torch.equal(a == 0, b == 0)
                for a, b in zip(
                    prunable_weights(oneshot).values(), [m.weight for m, _ in linear_modules(models[theirs])]
                )
            )
            rows[ours] = {
                "target_sparsity": sparsity,
                "accuracy_oneshot": accuracy(oneshot, ctx),
                "sparsity_before": sparsity_report(oneshot).prunable_sparsity,
            }
            rows[theirs] = {
                "target_sparsity": sparsity,
                "accuracy_oneshot": accuracy(models[theirs], ctx),
                "sparsity_before": prunable_sparsity(models[theirs]),
                "same_mask_as_ours": masks_equal,
            }
        for name, model in models.items():
            print(f"fine-tuning {name} ...", flush=True)
            rows[name] |= fine_tune(model, ctx, workdir / name, callbacks[name])
            rows[name] |= {"accuracy": accuracy(model, ctx), "sparsity_after": prunable_sparsity(model)}
        for name, model in models.items():
            rows[name]["saved"] = {"as_trained": saved(model, ctx, workdir / "saved" / f"{name}-as-trained")}
        print("timing ...", flush=True)
        for name, value in latency(models, ctx["inputs"], ctx["size"]["repeats"]).items():
            rows[name]["latency_ms"] = value  # torch_prune rows: re-parametrisation still in place
        for name, model in models.items():
            if name.startswith("torch_prune"):
                remove_reparametrisation(model)
                rows[name]["saved"]["after_prune_remove"] = saved(model, ctx, workdir / "saved" / f"{name}-removed")
    dense_step = rows["dense"]["step_s"]["median"]
    for row in rows.values():
        row["step_ratio_vs_dense"] = row["step_s"]["median"] / dense_step
    payload["rows"] = rows
    payload["machine"]["load_average_1m_end"] = machine_info()["load_average_1m"]
    print_tables(payload)
    print(f"\nwrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
