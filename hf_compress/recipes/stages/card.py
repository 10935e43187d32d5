"""The ``card`` stage: write the final model's card, and :func:`card_metadata`, shared with ``hf-compress card``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hf_compress.integrations.sentence_transformers import transformer_folder
from hf_compress.models.builtin import base_model_id
from hf_compress.recipes.schema import Stage
from hf_compress.recipes.stages.context import StageContext
from hf_compress.reporting.cards import card_base_model, render_card


def card_metadata(spec: dict[str, Any]) -> dict[str, Any]:
    """Card arguments that come from a resolved recipe: the teacher's Hub id, the dataset, the reference row's name."""
    data = spec.get("data") or {}
    dataset = data.get("hub_id") or (Path(data["train"]).parent.name if data.get("train") else None)
    teacher = (spec.get("model") or {}).get("teacher")
    return {
        "base_model": card_base_model(base_model_id(teacher)) if teacher else None,
        "datasets": [dataset] if dataset else None,
        "reference_name": "teacher (the recipe's reference)",
    }


def run(stage: Stage, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Write the model card (``README.md``) of the final model, with the evaluation table and the recipe."""
    if not ctx.models:
        raise ValueError(f"`stages.{stage.name}` (card) needs an earlier model stage; add one before it.")
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
    config_folder = transformer_folder(folder) if ctx.sentence_embedding else folder
    if ctx.is_main_process:
        card = render_card(
            f"{ctx.recipe.name}-{final['name']}",
            report=report,
            reference_report=reference,
            recipe=recipe.read_text() if recipe.is_file() else None,
            **card_metadata(ctx.recipe.to_dict()),
            config=json.loads((config_folder / "config.json").read_text()),
            sentence_transformers=ctx.sentence_embedding,
        )
        card.save(out_dir / "README.md")
        shutil.copyfile(out_dir / "README.md", folder / ".README.md.tmp")
        (folder / ".README.md.tmp").replace(folder / "README.md")
    return {"model_dir": str(folder), "card": str(folder / "README.md")}
