"""Run a compression recipe: its stages in order, each in its own folder, resumable and failure-safe.

Every stage writes into ``<out>/.<name>.tmp/`` and is renamed to ``<out>/<name>/`` (with a ``report.json``) only
when it succeeded, so a failure never leaves a half-written folder nor touches earlier stages. A rerun skips a
stage whose ``report.json`` says ``"done"`` with the same configuration hash (``hf_compress.recipes.recipe_hash``:
the stage, the model/data sections, the seed and every earlier stage). The stages live in
:mod:`hf_compress.recipes.stages`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers.utils import logging

from hf_compress.recipes.lock import acquire_output_lock
from hf_compress.recipes.schema import Recipe, Stage, dump_resolved, recipe_hash
from hf_compress.recipes.stages import STAGES
from hf_compress.recipes.stages.context import StageContext
from hf_compress.recipes.validate import validate

logger = logging.get_logger(__name__)

REPORT = "report.json"


def _process_state(recipe: Recipe) -> PartialState:
    """The accelerate ``PartialState``, created as the stages' ``TrainingArguments`` will expect it.

    Created before any ``TrainingArguments`` so that only the main process writes; ``cpu=True`` when a stage asks
    for ``use_cpu`` or when a multi-process launch has no GPU (else every CPU rank would believe it is alone).
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = any(stage.training.get("use_cpu") for stage in recipe.stages) or (
        distributed and not torch.cuda.is_available()
    )
    return PartialState(cpu=cpu)


def _as_recipe(recipe: Recipe | dict[str, Any]) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else validate(recipe)


def read_report(folder: Path) -> dict[str, Any] | None:
    """The ``report.json`` of a stage folder, or ``None`` when there is none."""
    path = Path(folder) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def _finished(folder: Path, digest: str) -> dict[str, Any] | None:
    report = read_report(folder)
    if report and report.get("status") == "done" and report.get("config_hash") == digest:
        return report
    return None


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished stage folder into place, replacing a stale one (only ever called on the main process)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _run_stage(stage: Stage, ctx: StageContext, out: Path, digest: str, state: PartialState) -> dict[str, Any]:
    name, kind = stage.name, stage.type
    tmp, final = out / f".{name}.tmp", out / name
    if state.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state.wait_for_everyone()
    started = time.time()
    logger.info(f"Stage {name!r} ({kind}): running into {tmp}")
    try:
        details = STAGES[kind](stage, ctx, tmp)
    except BaseException:
        # a failed stage leaves nothing behind: no partial folder, earlier stages untouched
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = {
        "name": name,
        "type": kind,
        "status": "done",
        "config_hash": digest,
        **details,
        "elapsed_s": round(time.time() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if state.is_main_process:
        (tmp / REPORT).write_text(json.dumps(report, indent=2, default=str) + "\n")
        _publish(tmp, final)
    state.wait_for_everyone()
    return report


def run_recipe(
    recipe: Recipe | dict[str, Any], output_dir: str | Path, *, force: bool = False
) -> list[dict[str, Any]]:
    """Execute a recipe's stages in order into ``output_dir``, skipping stages already done with the same config.

    Args:
        recipe (`Recipe` or `dict`):
            A recipe from :func:`hf_compress.recipes.load_recipe`, or the same structure as a plain dict (validated
            with :func:`hf_compress.recipes.validate`): ``name``, ``seed``, ``model``, ``data`` and an ordered list
            of ``stages`` of type ``finetune_teacher``, ``distill``, ``prune``, ``prune_vocabulary``, ``quantize``,
            ``evaluate``, ``card``.
        output_dir (`str` or `Path`):
            Folder receiving ``recipe.yaml`` and one ``<stage name>/`` folder per stage (model, tokenizer,
            ``report.json``).
        force (`bool`, *optional*, defaults to `False`):
            Rerun every stage even when its folder says it is done.

    Returns:
        `list[dict]`: one report per stage (the content of its ``report.json`` plus ``"skipped"``: whether a
        finished folder was reused).

    Under ``accelerate launch`` every process trains; only the main process writes reports and renames folders.

    Example:

    ```python
    >>> from hf_compress.recipes.validate import load_recipe
    >>> reports = run_recipe(load_recipe("recipes/minilm-sst2.yaml"), "outputs/minilm-sst2")  # doctest: +SKIP
    >>> [(r["name"], r["skipped"]) for r in reports]  # doctest: +SKIP
    [('teacher', True), ('student', False), ...]

    ```
    """
    recipe = _as_recipe(recipe)
    out = Path(output_dir)
    state = _process_state(recipe)
    lock = acquire_output_lock(out, enabled=state.is_main_process)  # a second run on `out` refuses, never interleaves
    try:
        if state.is_main_process:
            (out / ".recipe.yaml.tmp").write_text(dump_resolved(recipe))
            os.replace(out / ".recipe.yaml.tmp", out / "recipe.yaml")
        state.wait_for_everyone()

        ctx = StageContext.from_recipe(recipe, out, is_main_process=state.is_main_process)
        reports = []
        for stage in recipe.stages:
            digest = recipe_hash(stage, recipe)
            final = out / stage.name
            report = None if force else _finished(final, digest)
            skipped = report is not None
            if skipped:
                logger.info(f"Stage {stage.name!r} ({stage.type}): done with the same config, skipping")
            else:
                report = _run_stage(stage, ctx, out, digest, state)
            ctx.add_finished(stage.name, stage.type, final, report)
            reports.append({**report, "skipped": skipped})
        return reports
    finally:
        lock.release()
