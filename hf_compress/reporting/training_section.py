"""The model card's "Training" section: what a Trainer run knows when it saves a folder (pure formatting).

Status (final or a checkpoint, at which step), teacher and distillation settings, each pruning callback's targets
and how far it got, the last evaluation, and the hyperparameters; :mod:`hf_compress.reporting.card_callback` gathers
these facts from the Trainer and :func:`~hf_compress.reporting.cards.render_card` places the text.
"""

from __future__ import annotations

from collections.abc import Mapping

from hf_compress.reporting.measure import metric_name, quality_metrics


def last_evaluation(
    log_history: list[Mapping], up_to_step: int | None = None
) -> tuple[int | None, dict[str, float]] | None:
    """The step and quality metrics of the last ``eval_*`` entry of a Trainer ``log_history`` (at or before
    ``up_to_step`` when given), or ``None``."""
    for entry in reversed(log_history or []):
        if up_to_step is not None and entry.get("step", 0) > up_to_step:
            continue
        metrics = {k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, int | float)}
        if quality_metrics(metrics):
            return entry.get("step"), quality_metrics(metrics)
    return None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _settings(values: Mapping) -> str:
    return ", ".join(f"{key} {value}" for key, value in values.items())


def _pruning_lines(entry: Mapping) -> list[str]:
    end = entry.get("end_step")
    lines = [
        f"**Pruning** ({entry['importance']} importance, {entry['schedule']} schedule, {entry['scope']} scope, "
        f"steps {entry['start_step']} to {'the last step' if end is None else end}):",
        "",
        "| target | final target | reached in this model |",
        "|---|---|---|",
    ]
    reached = entry.get("sparsity") or {}
    lines += [f"| {t} | {_percent(goal)} | {_percent(reached.get(t))} |" for t, goal in entry["targets"].items()]
    lines.append("")
    state, structured = entry.get("state"), [t for t in entry["targets"] if t != "unstructured"]
    if state == "masked" and structured:
        lines.append(
            f"Pruned {', '.join(structured)} are masked (zeroed in place) in these weights, which keep the "
            "original shapes; they are removed physically at the end of training."
        )
    elif state == "removed":
        counts = ", ".join(f"{n} {name}" for name, n in (entry.get("removed") or {}).items() if n)
        lines.append(f"Training ended: {counts} were removed physically." if counts else "Training ended.")
    elif state != "masked":
        lines.append("No pruning step had run when this model was saved.")
    if "unstructured" in entry["targets"] and state in ("masked", "removed"):
        lines.append("Unstructured zeros stay in the dense weights.")
    return lines


def training_section(
    step: int,
    max_steps: int | None = None,
    final: bool = True,
    teacher: str | None = None,
    distillation: Mapping | None = None,
    pruning: list[Mapping] | None = None,
    evaluation: tuple[int | None, Mapping] | None = None,
    hyperparameters: Mapping | None = None,
) -> str:
    """Markdown of the card's "Training" section: what a Trainer run knows when it saves a folder.

    Args:
        step (`int`): the optimizer step of the saved weights.
        max_steps (`int`, *optional*): the planned number of steps.
        final (`bool`, *optional*, defaults to `True`): `False` for a checkpoint saved while training ran.
        teacher (`str`, *optional*): name of the distillation teacher.
        distillation (`dict`, *optional*): distillation settings, e.g. ``{"temperature": 2.0, "alpha": 0.5}``.
        pruning (`list[dict]`, *optional*): one dict per pruning callback with ``targets``, ``schedule``,
            ``importance``, ``scope``, ``start_step``, ``end_step``, ``sparsity`` (reached so far, per target),
            ``state`` (``"masked"``, ``"removed"`` or ``"none"``) and ``removed`` (counts of removed structures).
        evaluation (`tuple[int, dict]`, *optional*): ``(step, metrics)`` of the last evaluation, from
            :func:`last_evaluation`; `None` means the model was not evaluated.
        hyperparameters (`dict`, *optional*): training hyperparameters to list.

    Example:

    >>> from hf_compress.reporting.training_section import training_section
    >>> print(training_section(40, 100, final=False, teacher="org/teacher", distillation={"temperature": 2.0}))
    **Status:** Checkpoint saved at step 40 of 100, while training was still running.
    <BLANKLINE>
    **Distillation** from teacher `org/teacher`: temperature 2.0.
    <BLANKLINE>
    **Evaluation:** not evaluated before this save.
    """
    of = f" of {max_steps}" if max_steps else ""
    if not final:
        status = f"Checkpoint saved at step {step}{of}, while training was still running."
    elif step == 0:
        status = "Saved before any training step."
    else:
        status = f"Saved after step {step}{of}."
    lines = [f"**Status:** {status}", ""]
    if teacher or distillation:
        lines += [f"**Distillation** from teacher `{teacher or 'unknown'}`: {_settings(distillation or {})}.", ""]
    for entry in pruning or []:
        lines += _pruning_lines(entry) + [""]
    if evaluation is None:
        lines.append("**Evaluation:** not evaluated before this save.")
    else:
        eval_step, metrics = evaluation
        values = ", ".join(f"{metric_name(k)} {v:.4g}" for k, v in metrics.items())
        if eval_step == step:
            lines.append(f"**Evaluation** at step {step}: {values}.")
        else:
            lines.append(
                f"**Evaluation:** this model was not evaluated; the last evaluation, at step {eval_step}, "
                f"gave {values}."
            )
    if hyperparameters:
        lines += ["", f"**Training hyperparameters:** {_settings(hyperparameters)}."]
    return "\n".join(lines)
