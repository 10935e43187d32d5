"""Configuration of training-time pruning (what to remove, how much, when, and by which score)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

TARGETS = ("unstructured", "heads", "ffn_neurons", "layers", "hidden")
STRUCTURED = ("heads", "ffn_neurons", "hidden", "layers")
SCHEDULE_NAMES = ("one_shot", "linear", "cubic")
IMPORTANCE_NAMES = ("magnitude", "taylor", "block_influence", "activation")


@dataclass
class PruningConfig:
    r"""
    Configuration of [`PruningCallback`]: which structures to prune, to what final sparsity, on which schedule and
    with which importance score.

    There is one resolved form, `targets`: a dict mapping each target to its final sparsity. It can be given
    directly (`targets={"heads": 0.3, "ffn_neurons": 0.4}`, or as a JSON string on the command line), or through the
    shorthand `target` + `sparsity` (one target, or several sharing one sparsity); giving both forms is an error
    unless they agree. After `__post_init__`, `config.targets` always holds the dict.

    Parameters:
        > What to prune

        target (`str` or `list[str]`, *optional*, defaults to `"unstructured"`):
            `"unstructured"` (individual weights of `nn.Linear` / `Conv1D`), `"heads"` (attention heads, whole
            query groups under grouped-query attention), `"ffn_neurons"`, `"layers"` (whole blocks) or `"hidden"`
            (hidden-size channels of the residual stream, Minitron width pruning; see
            :func:`~hf_compress.pruning.prune_hidden`; the kept size is rounded to one the config can save, a
            multiple of the head count for Llama / Gemma 2 / Gemma 3). A list or a
            comma-separated string prunes several targets to the same `sparsity`. Exclusive with `targets`.
        sparsity (`float`, *optional*, defaults to `0.5`):
            Final fraction of each target removed, in [0, 1). Exclusive with `targets`.
        targets (`dict[str, float]` or `str`, *optional*):
            Per-target final sparsities, e.g. `{"heads": 0.5, "ffn_neurons": 0.5}` (JSON string from the CLI).

        > When

        schedule (`Literal["one_shot", "linear", "cubic"]`, defaults to `"cubic"`):
            How sparsity grows from `start_step` to `end_step` (`"cubic"` is Zhu & Gupta gradual pruning).
        start_step (`int`, defaults to `0`):
            First pruning step (step 0 prunes before the first optimizer step).
        end_step (`int`, *optional*):
            Step at which the final sparsity is reached; defaults to the last training step.
        frequency (`int`, defaults to `1`):
            Prune only every `frequency` steps after `start_step` (and at `end_step`).

        > How

        importance (`Literal["magnitude", "taylor", "block_influence", "activation"]`, defaults to `"magnitude"`):
            Score of each unit: L2 magnitude of its weights, first-order Taylor `|w * grad|` accumulated since the
            previous pruning step, (layers only) ShortGPT block influence `1 - cos(input, output)`, or Minitron
            activations on `calibration_batches` (mean `|activation|` of hidden channels / heads / neurons, and the
            damage of skipping each block for layers).
        scope (`Literal["global", "local"]`, defaults to `"global"`):
            Rank units across all layers (scores normalised per layer) or remove the same fraction in every layer.
        min_heads_per_layer (`int`, defaults to `1`):
            Attention heads every layer keeps.
        budget (`int`, *optional*):
            Prune to at most this many parameters instead of per-target fractions: at `start_step` the budget search
            (:func:`~hf_compress.pruning.budget.search_budget`) enumerates uniform shapes (depth, hidden, heads, FFN),
            prunes each one-shot by activation importance, keeps the one of lowest KL to the current model on
            `calibration_batches`, and masks its heads / neurons / hidden channels / blocks until the end of training.
            Exclusive with `target` / `sparsity` / `targets`; implies `schedule="one_shot"`.
        budget_candidates (`int`, defaults to `8`):
            How many of the largest shapes within `budget` the search prunes and scores.
        calibration_batches (`int`, defaults to `8`):
            Training batches (read in order, without shuffling) used to compute block influence and activations.

    Example:

    >>> from hf_compress import PruningConfig
    >>> config = PruningConfig(targets={"heads": 0.5, "ffn_neurons": 0.5}, schedule="linear", end_step=100)
    >>> config.targets
    {'heads': 0.5, 'ffn_neurons': 0.5}
    """

    target: list[str] | str | None = field(
        default=None,
        metadata={"help": "Target(s) to prune: unstructured, heads, ffn_neurons, layers (comma-separated)."},
    )
    sparsity: float | None = field(
        default=None, metadata={"help": "Final fraction removed of each target, in [0, 1) (default 0.5)."}
    )
    targets: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "Per-target final sparsities as a dict / JSON string, e.g. '{\"heads\": 0.3}'."},
    )
    schedule: Literal["one_shot", "linear", "cubic"] = field(
        default="cubic", metadata={"help": "Sparsity schedule between start_step and end_step."}
    )
    start_step: int = field(default=0, metadata={"help": "First pruning step (0 = before training)."})
    end_step: int | None = field(
        default=None, metadata={"help": "Step reaching the final sparsity (default: last training step)."}
    )
    frequency: int = field(default=1, metadata={"help": "Prune every `frequency` steps after start_step."})
    importance: Literal["magnitude", "taylor", "block_influence", "activation"] = field(
        default="magnitude",
        metadata={"help": "Importance score: magnitude, taylor, block_influence (layers only), activation."},
    )
    scope: Literal["global", "local"] = field(
        default="global", metadata={"help": "Rank units across all layers (global) or within each layer (local)."}
    )
    min_heads_per_layer: int = field(default=1, metadata={"help": "Attention heads every layer keeps (>= 1)."})
    budget: int | None = field(
        default=None, metadata={"help": "Prune to at most this many parameters (budget search at start_step)."}
    )
    budget_candidates: int = field(default=8, metadata={"help": "Shapes within the budget scored by KL."})
    calibration_batches: int = field(
        default=8, metadata={"help": "Training batches used for block influence, activations and the budget search."}
    )

    def __post_init__(self):
        if self.budget is not None:
            if not isinstance(self.budget, int) or self.budget <= 0:
                raise ValueError(f"`budget` must be a positive number of parameters, got {self.budget!r}.")
            if self.target is not None or self.sparsity is not None or self.targets is not None:
                raise ValueError(
                    f"`budget` ({self.budget}) replaces per-target fractions, got "
                    f"{self.targets or self.target or self.sparsity!r} too; pass one of them."
                )
            self.targets = {name: 0.0 for name in STRUCTURED}  # the search decides what each target loses
            self.schedule = "one_shot"
        if self.budget_candidates < 1:
            raise ValueError(f"`budget_candidates` must be >= 1, got {self.budget_candidates}.")
        self.targets = self._resolve_targets()
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"`schedule` must be one of {list(SCHEDULE_NAMES)}, got {self.schedule!r}.")
        if self.importance not in IMPORTANCE_NAMES:
            raise ValueError(f"`importance` must be one of {list(IMPORTANCE_NAMES)}, got {self.importance!r}.")
        if self.scope not in ("global", "local"):
            raise ValueError(f"`scope` must be 'global' or 'local', got {self.scope!r}.")
        if self.start_step < 0:
            raise ValueError(f"`start_step` must be >= 0, got {self.start_step}.")
        if self.end_step is not None and self.end_step < self.start_step:
            raise ValueError(f"`end_step` must be >= `start_step` ({self.start_step}), got {self.end_step}.")
        if self.frequency < 1:
            raise ValueError(f"`frequency` must be >= 1, got {self.frequency}.")
        if self.min_heads_per_layer < 1:
            raise ValueError(f"`min_heads_per_layer` must be >= 1, got {self.min_heads_per_layer}.")
        if self.calibration_batches < 1:
            raise ValueError(f"`calibration_batches` must be >= 1, got {self.calibration_batches}.")
        if self.importance == "block_influence" and set(self.targets) != {"layers"}:
            raise ValueError(
                f"`importance`='block_influence' scores whole layers only, got targets {list(self.targets)}; "
                "use 'magnitude' or 'taylor' for the other targets."
            )
        for name in ("taylor", "activation"):
            if self.importance == name and "unstructured" in self.targets:
                raise ValueError(
                    f"`importance`={name!r} is not supported for the 'unstructured' target; use 'magnitude'."
                )
        if self.importance == "taylor" and self.start_step == 0:
            raise ValueError(
                "`start_step` must be >= 1 with `importance`='taylor' (gradients are needed before pruning), got 0."
            )

    def _resolve_targets(self) -> dict[str, float]:
        shorthand = None
        if self.target is not None or self.sparsity is not None or self.targets is None:
            names = self.target if self.target is not None else "unstructured"
            if isinstance(names, str):
                names = [name.strip() for name in names.split(",") if name.strip()]
            if not names:
                raise ValueError(f"`target` must name at least one of {list(TARGETS)}, got {self.target!r}.")
            sparsity = 0.5 if self.sparsity is None else self.sparsity
            shorthand = {name: sparsity for name in names}
        targets = self.targets
        if isinstance(targets, str):
            targets = json.loads(targets)
        if targets is not None and (not isinstance(targets, dict) or not targets):
            raise ValueError(f"`targets` must be a non-empty dict of target -> sparsity, got {self.targets!r}.")
        if targets is not None and shorthand is not None and dict(targets) != shorthand:
            raise ValueError(
                f"`targets` ({self.targets!r}) disagrees with `target` / `sparsity` ({shorthand}); pass one form."
            )
        targets = dict(targets) if targets is not None else shorthand
        for name, sparsity in targets.items():
            if name not in TARGETS:
                raise ValueError(f"`target` must be one of {list(TARGETS)}, got {name!r}.")
            if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
                raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity!r} for target {name!r}.")
        return {name: float(sparsity) for name, sparsity in targets.items()}

    @property
    def structured_targets(self) -> list[str]:
        """The structured targets (heads, ffn_neurons, hidden, layers) among `targets`, in that order."""
        return [name for name in STRUCTURED if name in self.targets]
