"""Accuracy and Matthews correlation (GLUE's CoLA metric) of every model of an ``hf-compress run`` output folder.

The pipeline's ``evaluate`` stage reports accuracy only; CoLA is scored by Matthews correlation (MCC), which does not
reward predicting the majority class (69% of CoLA dev is "acceptable"). This script re-reads the run's resolved
``recipe.yaml`` (data files, columns, ``max_length``), evaluates the teacher and each model stage with its own
tokenizer (a vocabulary-pruned stage has a smaller one) and prints one table; ``--output`` also writes JSON.

Usage (from the repository root)::

    python bench/glue_metrics.py /tmp/run15x_cola --output bench/results/cola_15x.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import yaml
from common import machine_info, setup_threads, write_json
from transformers import AutoTokenizer

from hf_compress.loading import from_pretrained
from hf_compress.models.builtin import resolve_model_path
from hf_compress.recipes.data import data_collator, load_text_dataset
from hf_compress.recipes.outputs import stage_reports
from hf_compress.recipes.schema import MODEL_STAGES
from hf_compress.reporting.measure import format_table


def matthews(pred: torch.Tensor, gold: torch.Tensor) -> float:
    """Binary Matthews correlation coefficient; 0 when a row or column of the confusion matrix is empty."""
    tp = int(((pred == 1) & (gold == 1)).sum())
    tn = int(((pred == 0) & (gold == 0)).sum())
    fp = int(((pred == 1) & (gold == 0)).sum())
    fn = int(((pred == 0) & (gold == 1)).sum())
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


@torch.inference_mode()
def predict(folder: str, data_spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and gold labels of the eval split, tokenised with ``folder``'s own tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = from_pretrained(folder).eval()
    _, evaluation = load_text_dataset({**data_spec, "max_train_samples": 8}, tokenizer, "sequence-classification")
    collate = data_collator(tokenizer, "sequence-classification")
    preds, gold = [], []
    for start in range(0, len(evaluation), 64):
        batch = collate([evaluation[i] for i in range(start, min(start + 64, len(evaluation)))])
        labels = batch.pop("labels")
        preds.append(model(**batch).logits.argmax(-1))
        gold.append(labels)
    return torch.cat(preds), torch.cat(gold)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="--output-dir of an `hf-compress run` of a binary classification recipe.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--output", default=None, help="JSON result path (default: print only).")
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    run = Path(args.run_dir)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    if recipe["model"].get("task", "sequence-classification") != "sequence-classification":
        raise SystemExit(f"{run}: not a sequence-classification run.")
    stages = stage_reports(run)
    folders = {name: str(run / name) for name, report in stages if report.get("type") in MODEL_STAGES}
    if not any(report.get("type") == "finetune_teacher" for _, report in stages):
        folders = {"teacher (input)": resolve_model_path(recipe["model"]["teacher"]), **folders}
    rows, results = [], {}
    for name, folder in folders.items():
        pred, gold = predict(folder, recipe["data"])
        results[name] = {
            "accuracy": float((pred == gold).float().mean()),
            "mcc": matthews(pred, gold),
            "n": int(gold.numel()),
            "positive_rate": float(pred.float().mean()),
        }
        result = results[name]
        rows.append(
            {
                "model": name,
                "accuracy": f"{100 * result['accuracy']:.2f}%",
                "MCC": f"{result['mcc']:.4f}",
                "predicted positive": f"{result['positive_rate']:.1%}",
            }
        )
    reference = next(iter(results.values()))
    for row, result in zip(rows, results.values()):
        row["MCC retention"] = f"{100 * result['mcc'] / reference['mcc']:.1f}%" if reference["mcc"] else "-"
    print(format_table(rows))
    payload = {"machine": machine_info(), "run_dir": str(run), "eval": recipe["data"]["eval"], "models": results}
    if args.output:
        print(f"wrote {write_json(payload, args.output)}")
    return payload


if __name__ == "__main__":
    main()
