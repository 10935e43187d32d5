"""The ``evaluate`` stage: measure the teacher and every model stage side by side (metrics, size, latency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

from hf_compress.recipes.data import data_collator
from hf_compress.recipes.schema import Stage
from hf_compress.recipes.stages import sentence
from hf_compress.recipes.stages.context import (
    StageContext,
    evaluate_model,
    forward_keys,
    load_model,
    recipe_tokenizer,
)
from hf_compress.reporting.measure import compare, format_table, model_report, summary_row

logger = logging.get_logger(__name__)


def latency_inputs(dataset, collator, keys: set[str], rows: int = 32) -> dict[str, torch.Tensor] | None:
    """Real eval rows (dynamically padded, only the columns in ``keys``) for timing; ``None`` without eval rows."""
    if dataset is None or len(dataset) == 0:
        return None
    batch = collator([dataset[i] for i in range(min(rows, len(dataset)))])
    return {k: v for k, v in batch.items() if k in keys and k != "labels"}


def _reference(ctx: StageContext) -> dict[str, Any]:
    """The teacher entry to compare against: the `finetune_teacher` stage, else the recipe's teacher itself."""
    for entry in ctx.models:
        if entry["type"] == "finetune_teacher":
            return entry
    tokenizer = recipe_tokenizer(ctx.recipe)
    return {"name": "teacher", "type": "teacher", "path": ctx.reference, "report": {}, "tokenizer": tokenizer}


def _measure(entry: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Size, CPU latency and metrics of one model (metrics its stage already measured are reused)."""
    metrics = entry["report"].get("metrics")
    folder = entry["path"] if Path(entry["path"]).is_dir() else None
    if ctx.sentence_embedding:  # pair metrics with sentence-transformers' evaluator; timing of its transformer
        model = ctx.load(entry["path"]).to("cpu")
        report = sentence.report(model, folder, ctx.eval_dataset, timed=True, metrics=metrics is None)
        return report if metrics is None else {**report, "metrics": metrics}
    model = load_model(entry["path"]).to("cpu")
    eval_dataset = ctx.datasets_for(entry["tokenizer"])[1]  # each model with its own (maybe pruned) tokenizer
    collator = data_collator(ctx.tokenizer_for(entry["tokenizer"]), ctx.task)
    report = model_report(model, folder, latency_inputs=latency_inputs(eval_dataset, collator, forward_keys(model)))
    if metrics is None and eval_dataset is not None:
        metrics = evaluate_model(model, eval_dataset, collator, ctx.task)
    if metrics is not None:
        report["metrics"] = metrics
    return report


def run(stage: Stage, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Measure the teacher and every model stage (metrics, size, sparsity, CPU latency at batch 1 and 32).

    Writes ``evaluation.json`` (per model: its measurements and ``compare``-ratios to the teacher) and
    ``evaluation.md`` (the table) into the stage folder, and logs the table.
    """
    entries = [_reference(ctx)] + [e for e in ctx.models if e["type"] != "finetune_teacher"]
    if not ctx.is_main_process:
        return {}
    measured, rows = {}, []
    for entry in entries:
        measured[entry["name"]] = {"type": entry["type"], "path": entry["path"], **_measure(entry, ctx)}
    reference = measured[entries[0]["name"]]
    for name, report in measured.items():
        if name != entries[0]["name"]:
            report["vs_teacher"] = compare(reference, report)
        rows.append(summary_row(name, report, None if name == entries[0]["name"] else reference))
    table = format_table(rows)
    evaluation = {"reference": entries[0]["name"], "task": ctx.task, "models": measured}
    (out_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2, default=str) + "\n")
    (out_dir / "evaluation.md").write_text(format_table(rows, markdown=True) + "\n")
    logger.info("Evaluation (reference %r):\n%s", entries[0]["name"], table)
    summary = {
        name: {
            "metrics": r.get("metrics"),
            **{k: r["vs_teacher"][k] for k in ("size_x", "speedup_x", "retention_pct")},
        }
        for name, r in measured.items()
        if "vs_teacher" in r
    }
    return {"reference": entries[0]["name"], "summary": summary}
