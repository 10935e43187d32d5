"""The reporting stages of a recipe: ``evaluate`` (measure the teacher and every model stage side by side) and
``card`` (write the final model's card), plus :func:`card_metadata`, shared with ``hf-compress card``.

Same signature as every stage in :mod:`hf_compress.recipes.stages`: ``(stage, ctx, out_dir) -> dict``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_compress.recipes.data import base_model_id, data_collator, resolve_model_path

if TYPE_CHECKING:
    from hf_compress.recipes.stages.context import StageContext

logger = logging.getLogger(__name__)


def _latency_inputs(dataset, collator, model, rows: int = 32) -> dict[str, torch.Tensor] | None:
    """Real eval rows (dynamically padded, no labels) for timing; ``None`` lets the report use dummy ids."""
    if dataset is None or len(dataset) == 0:
        return None
    batch = collator([dataset[i] for i in range(min(rows, len(dataset)))])
    from hf_compress.recipes.stages.context import _forward_keys

    keys = _forward_keys(model) - {"labels"}
    return {k: v for k, v in batch.items() if k in keys}


def _reference(ctx: StageContext) -> dict[str, Any]:
    """The teacher entry to compare against: the `finetune_teacher` stage, else the recipe's teacher itself."""
    for entry in ctx.models:
        if entry["type"] == "finetune_teacher":
            return entry
    tokenizer = resolve_model_path(ctx.spec["model"].get("tokenizer") or ctx.spec["model"]["teacher"])
    return {"name": "teacher", "type": "teacher", "path": ctx.reference, "report": {}, "tokenizer": tokenizer}


def evaluate(stage: dict[str, Any], ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Measure the teacher and every model stage (metrics, size, sparsity, CPU latency at batch 1 and 32).

    Writes ``evaluation.json`` (per model: its measurements and ``compare``-ratios to the teacher) and
    ``evaluation.md`` (the table) into the stage folder, and logs the table.
    """
    from hf_compress.recipes.stages.context import evaluate_model, load_model
    from hf_compress.reporting.measure import compare, format_table, model_report, summary_row

    entries = [_reference(ctx)] + [e for e in ctx.models if e["type"] != "finetune_teacher"]
    if not ctx.is_main_process:
        return {}
    measured, rows = {}, []
    for entry in entries:
        model = load_model(entry["path"]).to("cpu")
        folder = entry["path"] if Path(entry["path"]).is_dir() else None
        eval_dataset = ctx.datasets_for(entry["tokenizer"])[1]  # each model with its own (maybe pruned) tokenizer
        collator = data_collator(ctx.tokenizer_for(entry["tokenizer"]), ctx.task)
        report = model_report(model, folder, latency_inputs=_latency_inputs(eval_dataset, collator, model))
        metrics = entry["report"].get("metrics")
        if metrics is None and eval_dataset is not None:
            metrics = evaluate_model(model, eval_dataset, collator, ctx.task)
        if metrics is not None:
            report["metrics"] = metrics
        measured[entry["name"]] = {"type": entry["type"], "path": entry["path"], **report}
        del model
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


def _hub_id(teacher: str) -> str | None:
    """The teacher's Hub id for the card metadata; ``None`` for a local folder (no Hub page to link)."""
    hub_id = base_model_id(teacher)
    return None if Path(hub_id).exists() else hub_id


def card_metadata(spec: dict[str, Any]) -> dict[str, Any]:
    """Card arguments that come from a resolved recipe: the teacher's Hub id, the dataset, the reference row's name."""
    data = spec.get("data") or {}
    dataset = data.get("hub_id") or (Path(data["train"]).parent.name if data.get("train") else None)
    teacher = (spec.get("model") or {}).get("teacher")
    return {
        "base_model": _hub_id(teacher) if teacher else None,
        "datasets": [dataset] if dataset else None,
        "reference_name": "teacher (the recipe's reference)",
    }


def card(stage: dict[str, Any], ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Write the model card (``README.md``) of the final model, with the evaluation table and the recipe."""
    import shutil

    from hf_compress.reporting.cards import render_card

    if not ctx.models:
        raise ValueError(f"`stages.{stage['name']}` (card) needs an earlier model stage; add one before it.")
    final = ctx.models[-1]
    folder = Path(final["path"])
    reference = None
    report = {**final["report"].get("model", {}), "metrics": final["report"].get("metrics", {})}
    if ctx.evaluation is not None and ctx.evaluation.is_file():
        evaluation = json.loads(ctx.evaluation.read_text())
        report = evaluation["models"].get(final["name"], report)
        if final["name"] != evaluation["reference"]:
            reference = evaluation["models"][evaluation["reference"]]
    recipe = ctx.out / "recipe.yaml"
    if ctx.is_main_process:
        card = render_card(
            f"{ctx.spec['name']}-{final['name']}",
            report=report,
            reference_report=reference,
            recipe=recipe.read_text() if recipe.is_file() else None,
            **card_metadata(ctx.spec),
            config=json.loads((folder / "config.json").read_text()),
        )
        card.save(out_dir / "README.md")
        shutil.copyfile(out_dir / "README.md", folder / ".README.md.tmp")
        (folder / ".README.md.tmp").replace(folder / "README.md")
    return {"model_dir": str(folder), "card": str(folder / "README.md")}
