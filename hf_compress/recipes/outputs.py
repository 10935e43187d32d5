"""What a finished run folder holds: its stage reports in recipe order, its evaluation, its final model and export.

``hf-compress run`` writes one folder per stage (``<out>/<stage>/report.json``, see
:mod:`hf_compress.recipes.pipeline`); ``report``, ``card``, ``push``, ``export`` and ``demo`` read them back here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from hf_compress.recipes.schema import MODEL_STAGES
from hf_compress.reporting.hub import ONNX_DIR
from hf_compress.reporting.measure import summary_row


def stage_reports(out: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(stage name, report.json)`` of every finished stage folder of ``out``, in recipe order."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"`DIR` {str(out)!r} does not exist; pass the --output-dir of `hf-compress run`.")
    found = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/report.json")}
    if not found:
        raise FileNotFoundError(
            f"`DIR` {str(out)!r} has no stage folder with a report.json; run "
            f"`hf-compress run RECIPE --output-dir {out}` first."
        )
    order: list[str] = []
    if (out / "recipe.yaml").is_file():
        order = [
            s.get("name") or s.get("type")
            for s in (yaml.safe_load((out / "recipe.yaml").read_text()) or {}).get("stages", [])
        ]
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(found, key=lambda n: (rank.get(n, len(rank)), found[n].get("finished_at", ""), n))
    return [(name, found[name]) for name in names]


def evaluation_results(out: str | Path, stages: list[tuple[str, dict]]) -> tuple[dict[str, dict], str | None]:
    """Per-model measurements and the reference name from the latest ``evaluate`` stage's evaluation.json."""
    measured, reference = {}, None
    for name, report in stages:
        path = Path(out) / name / "evaluation.json"
        if report.get("type") == "evaluate" and path.is_file():
            data = json.loads(path.read_text())
            measured, reference = data.get("models", {}), data.get("reference")
    return measured, reference


def report_rows(out: str | Path) -> list[dict[str, str]]:
    """One table row per model (teacher first): params, size, sparsity, metrics, latency and ratios to the teacher."""
    stages = stage_reports(out)
    measured, reference_name = evaluation_results(out, stages)
    entries: dict[str, dict] = {}
    if reference_name in measured:
        entries[reference_name] = measured[reference_name]
    for name, report in stages:
        if report.get("type") in MODEL_STAGES and "model" in report:
            entries[name] = measured.get(name) or {**report["model"], "metrics": report.get("metrics") or {}}
    if reference_name is None:
        reference_name = next((n for n, r in stages if r.get("type") == "finetune_teacher"), None)
    if not entries:
        raise FileNotFoundError(f"`DIR` {str(out)!r} has no finished model stage; run its recipe first.")
    reference = entries.get(reference_name)
    return [
        summary_row(name, report, None if name == reference_name else reference) for name, report in entries.items()
    ]


def final_model_folder(out: str | Path) -> Path:
    """The folder of the last finished model stage of ``out`` (or ``out`` itself when it is a model folder)."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    models = [name for name, report in stage_reports(out) if report.get("type") in MODEL_STAGES]
    if not models:
        raise FileNotFoundError(f"`DIR` {str(out)!r} has no finished model stage; run its recipe first.")
    return out / models[-1]


def exported_onnx(out: str | Path, folder: Path) -> Path | None:
    """The ``onnx/`` export of ``folder``: its own, else the one of the last ``export_onnx`` stage of ``out``."""
    if (folder / ONNX_DIR).is_dir():
        return folder / ONNX_DIR
    if Path(out) == folder:
        return None
    stages = [name for name, report in stage_reports(out) if report.get("type") == "export_onnx"]
    return next((Path(out) / n / ONNX_DIR for n in reversed(stages) if (Path(out) / n / ONNX_DIR).is_dir()), None)
