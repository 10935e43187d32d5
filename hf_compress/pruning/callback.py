"""``PruningCallback``: prune during any ``Trainer`` run (schedule -> importance -> masks -> surgery).

Event by event (transformers ``Trainer`` loop):

* ``on_train_begin``: refuse PEFT adapters, build masks, restore them from ``checkpoint-<step>`` when resuming, prune
  at step 0 if the schedule says so.
* ``on_pre_optimizer_step``: accumulate Taylor scores from the (already all-reduced) gradients, then zero the
  gradients of removed structure.
* ``on_optimizer_step``: zero removed weights again, so Adam momentum or weight decay cannot revive them.
* ``on_step_end``: on scheduled steps, score units, choose what to remove (monotonically) and apply the masks to the
  weights and the optimizer state.
* ``on_save``: write ``pruning_masks.safetensors`` and ``pruning_state.json`` into the checkpoint folder.
* ``on_log``: add ``sparsity/<target>`` and ``pruning/updates`` to the logs (from a helper callback placed before the
  ``report_to`` integrations, see below).
* ``on_train_end``: physically remove masked heads / neurons / hidden channels / layers (``surgery``), so
  ``trainer.save_model()`` saves the small model. Unstructured zeros stay in the dense weights.

Distributed runs (DDP): importance scores are averaged over ranks and the resulting masks are broadcast from rank 0, so
every rank applies identical masks. The Trainer's FSDP / DeepSpeed paths are refused until verified on a GPU
(``bench/verify_sharded_gpu.py``); raw FSDP2 students use :mod:`hf_compress.pruning.sharded`.

Logging: ``sparsity/<target>`` and ``pruning/updates`` (how many pruning steps changed the masks in this run) are added
to the logs dict and to ``state.log_history``. The ``report_to`` integrations (TensorBoard, W&B, MLflow ...) are
registered before user callbacks and each callback sees ``logs`` in turn, so at its first event the callback registers
a small ``LogFirst`` right after ``DefaultFlowCallback`` in the ``CallbackHandler`` calling it (found on the call
stack: callbacks get no handle on it), which adds the values before any integration writes ``logs``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from accelerate import PartialState
from accelerate.utils import broadcast, reduce
from peft.tuners.tuners_utils import BaseTunerLayer  # already imported by transformers' Trainer
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from hf_compress.distributed import register_auto_shutdown
from hf_compress.models.families import get_family, unwrap
from hf_compress.pruning.checks import check_complete_checkpoint, check_hidden_supported, check_schedule
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.importance import unit_layout
from hf_compress.pruning.log_order import log_before_integrations
from hf_compress.pruning.masks import (
    MASKS_NAME,
    PruningMasks,
    load_masks,
    mask_changes,
    mask_grads,
    mask_optimizer_state,
    mask_weights,
    parameter_masks,
    save_masks,
)
from hf_compress.pruning.ranking import select_units
from hf_compress.pruning.schedules import is_pruning_step, sparsity_at
from hf_compress.pruning.selection import (
    add_taylor_scores,
    budget_masks,
    hidden_step_sparsity,
    masks_from_weights,
    removes_more_units,
    select_heads,
    step_scores,
)
from hf_compress.pruning.sharded import remove_masked
from hf_compress.pruning.surgery import skip_layers
from hf_compress.pruning.unstructured import magnitude_masks, prunable_weights

logger = logging.get_logger(__name__)

STATE_NAME = "pruning_state.json"
SAVED = (MASKS_NAME, STATE_NAME)  # what `on_save` writes, state last: a checkpoint without both was cut short


def _check_not_peft(model: torch.nn.Module) -> None:
    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError(
            "`model` carries PEFT adapters (e.g. LoRA), which PruningCallback cannot prune consistently; merge them "
            "first with `model = model.merge_and_unload()` and train the merged model."
        )


def _mean_over_ranks(scores: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`scores` averaged over the processes (accelerate's `reduce`), on the CPU."""
    if PartialState().num_processes == 1:
        return scores.cpu()
    return reduce(scores.to(device, torch.float32), reduction="mean").cpu()


def _broadcast(masks: PruningMasks, device: torch.device) -> PruningMasks:
    """Rank 0's `masks` on every process (accelerate's `broadcast`), so that all ranks prune the same units."""
    if PartialState().num_processes == 1:
        return masks
    state = {
        key: broadcast(value.to(device, torch.uint8)).cpu().bool() for key, value in sorted(masks.state_dict().items())
    }
    return PruningMasks.from_state_dict(state)


def _check_model(model: torch.nn.Module, config: PruningConfig) -> None:
    """Refuse what no training step can do for ``model``: PEFT adapters, hidden pruning its family refuses."""
    _check_not_peft(model)
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    if config.budget is not None:  # the budget search fills `targets` itself: name what the user set
        check_hidden_supported(model_type, "budget")
    if "hidden" in config.targets:
        check_hidden_supported(model_type, "targets")
    if get_family(model).experts is not None and config.budget is not None:
        raise ValueError(
            f"`budget` is {config.budget!r}, whose search enumerates dense FFN widths that a mixture-of-experts model "
            f"({model_type}) does not have; prune `targets` such as 'hidden', 'heads' or 'layers' (any importance), "
            "and expert neurons with `experts.prune_expert_neurons_by_activation`."
        )


class PruningCallback(TrainerCallback):
    r"""
    Prune a model while it trains with any [`~transformers.Trainer`] (including `DistillationTrainer`).

    Masks grow on the schedule of `config` and hold through every optimizer step; structured targets are removed
    physically at the end of training, so `trainer.save_model()` after `trainer.train()` saves the small model.
    Masks are saved in every checkpoint and restored when training resumes from one in `args.output_dir`. A
    PEFT-wrapped (LoRA) model is refused: merge the adapters first.

    Args:
        config ([`PruningConfig`], *optional*):
            What, how much and when to prune; keyword arguments build one when it is omitted.

    Attributes:
        masks ([`~hf_compress.pruning.masks.PruningMasks`]): Current masks (`None` before training).
        removed (`dict`): After training, what surgery removed: `{"heads": {layer: [...]}, ...}`.

    Example:

    >>> from transformers import Trainer
    >>> from hf_compress import PruningCallback, PruningConfig
    >>> config = PruningConfig(targets={"heads": 0.5, "ffn_neurons": 0.5}, schedule="cubic", end_step=300)
    >>> trainer = Trainer(  # doctest: +SKIP
    ...     model=model, args=args, train_dataset=dataset, callbacks=[PruningCallback(config)]
    ... )
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.save_model("pruned")  # doctest: +SKIP
    """

    def __init__(self, config: PruningConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError(f"Pass either `config` or keyword arguments, got both ({sorted(kwargs)}).")
        self.config = config if config is not None else PruningConfig(**kwargs)
        self.masks: PruningMasks | None = None
        self.removed: dict = {}
        self._taylor: dict[str, torch.Tensor] = {}  # "heads.<layer>" / "ffn_neurons.<layer>" / "layers" -> sums
        self._cached = None  # `parameter_masks` of `self.masks`, rebuilt when they change
        self._layouts: dict = {}  # target -> `unit_layout`, valid until surgery changes the shapes
        self._hooks: list = []
        self._end_step = 0
        self._updates = 0  # pruning steps that changed the masks in this run (logged as `pruning/updates`)
        register_auto_shutdown()  # under a process group: clean exit without an explicit shutdown_distributed()
        self.budget_table: list[dict] = []  # the budget search's candidates (with `config.budget`)

    # ---- schedule -------------------------------------------------------------------------------------------------

    def _is_pruning_step(self, step: int) -> bool:
        c = self.config
        return is_pruning_step(step, c.start_step, self._end_step, c.frequency, c.schedule)

    def _target_sparsity(self, target: str, step: int) -> float:
        c = self.config
        return sparsity_at(step, c.targets[target], c.schedule, c.start_step, self._end_step, c.frequency)

    # ---- events ---------------------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, model=None, **kwargs):
        log_before_integrations(self)
        if model is not None:
            _check_model(model, self.config)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        log_before_integrations(self)  # also covers `trainer.add_callback(...)` after the Trainer was built
        _check_model(model, self.config)
        if args.fsdp or args.deepspeed:
            raise ValueError(
                f"`args.fsdp`={args.fsdp!r} / `args.deepspeed`={args.deepspeed!r} shard parameters through paths "
                "not verified yet (Trainer-level FSDP / ZeRO-3: bench/verify_sharded_gpu.py needs a GPU), which "
                "PruningCallback cannot mask; train with plain DDP (`accelerate launch --multi_gpu`) instead, or "
                "use the raw FSDP2 helpers of `hf_compress.pruning.sharded`."
            )
        if "ffn_neurons" in self.config.targets and get_family(model).experts is not None:
            raise ValueError(
                f"`targets` has 'ffn_neurons', which PruningCallback does not prune in a mixture-of-experts model "
                f"({unwrap(model).config.model_type}); remove expert neurons with "
                "`experts.prune_expert_neurons_by_activation` (or `prune_expert_neurons`)."
            )
        self._layouts = {}
        self._updates = 0
        self._end_step = self.config.end_step if self.config.end_step is not None else state.max_steps
        check_schedule(self.config.start_step, self.config.end_step, state.max_steps)
        if self.masks is None:
            names = list(prunable_weights(model)) if "unstructured" in self.config.targets else None
            self.masks = PruningMasks.full(model, list(self.config.targets), names)
        if state.global_step > 0:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            check_complete_checkpoint(folder, SAVED)
            self._restore(folder, model)
        elif self._is_pruning_step(0):
            self._prune(0, args, model, optimizer, train_dataloader)
        self._apply(model, optimizer)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.masks is None:
            return
        last = self.config.start_step if self.config.schedule == "one_shot" else self._end_step
        if self.config.importance == "taylor" and state.global_step < last:
            self._accumulate_taylor(model)
        mask_grads(model, self.masks, self._cached)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.masks is not None:
            mask_weights(model, self.masks, self._cached)

    def on_step_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if self.masks is not None and self._is_pruning_step(state.global_step):
            before = self.masks
            self._prune(state.global_step, args, model, optimizer, train_dataloader)
            # Unchanged masks are already applied: weights were re-zeroed after this step's optimizer update, and
            # masked gradients kept the optimizer state of removed structure at zero.
            if not self.masks.equals(before):
                self._apply(model, optimizer)

    def add_log_values(self, state, logs: dict | None) -> None:
        """Add ``sparsity/<target>`` and ``pruning/updates`` to ``logs`` and to the matching ``state.log_history``."""
        if self.masks is None or logs is None:
            return
        values = {f"sparsity/{target}": round(value, 6) for target, value in self.masks.sparsity().items()}
        values["pruning/updates"] = self._updates
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.add_log_values(state, logs)  # a no-op update when `LogFirst` already added the values

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.masks is None or not args.should_save or not os.path.isdir(folder):
            return
        save_masks(self.masks, os.path.join(folder, MASKS_NAME), extra=self._taylor)  # unit sums: resumable
        info = {
            "global_step": state.global_step,
            "sparsity": self.masks.sparsity(),
            "config": dataclasses.asdict(self.config),
        }
        with open(os.path.join(folder, STATE_NAME), "w") as f:
            json.dump(info, f, indent=2)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.masks is None:
            return
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and os.path.isfile(os.path.join(best, MASKS_NAME)):
            self.masks, _ = load_masks(os.path.join(best, MASKS_NAME))
            self._cached = None
        mask_weights(model, self.masks, self._cached)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._physical_removal(model)
        self.masks = None
        self._cached = None
        self._layouts = {}
        self._taylor = {}

    # ---- steps ----------------------------------------------------------------------------------------------------

    def _apply(self, model, optimizer) -> None:
        """Rebuild the per-parameter masks and apply them to weights, optimizer state and (for layers) hooks.

        Parameters whose mask did not change since the last call are skipped: their weights were re-zeroed after this
        step's optimizer update and, their gradients being masked, their optimizer state stayed zero where removed.
        """
        if self.masks.weights:
            params = dict(unwrap(model).named_parameters())
            self.masks.weights = {name: keep.to(params[name].device) for name, keep in self.masks.weights.items()}
        layouts = {t: self._layout(model, t) for t in ("heads", "ffn_neurons") if t in self.config.targets}
        previous, self._cached = self._cached, parameter_masks(model, self.masks, layouts)
        changed = mask_changes(previous, self._cached)  # only what `previous` did not already zero
        mask_weights(model, self.masks, changed)
        if optimizer is not None:
            mask_optimizer_state(optimizer, model, self.masks, changed)
        for handle in self._hooks:
            handle.remove()
        self._hooks = skip_layers(model, self.masks.layers) if self.masks.layers is not None else []

    def _layout(self, model, target: str) -> dict:
        if target not in self._layouts:
            self._layouts[target] = unit_layout(model, target)
        return self._layouts[target]

    def _accumulate_taylor(self, model) -> None:
        """Add this step's ``sum |w * grad|`` of every unit; the sums stay on the model's device (no host sync)."""
        for target in self.config.structured_targets:
            layout = self._layout(model, target) if target in ("heads", "ffn_neurons") else None
            add_taylor_scores(self._taylor, model, target, layout)

    def _scores(self, target: str, args, model, train_dataloader) -> dict[int, torch.Tensor]:
        importance = self.config.importance
        if importance == "taylor" and not self._taylor:
            logger.warning(f"No Taylor scores were accumulated before pruning {target}; using magnitude instead.")
            importance = "magnitude"
        layout = self._layout(model, target) if target in ("heads", "ffn_neurons") else None
        batches = self._calibration(args, train_dataloader)  # a generator: read only by calibrated importances
        scores = step_scores(model, target, importance, self._taylor, batches, layout)
        return {layer: _mean_over_ranks(value, args.device) for layer, value in scores.items()}

    def _calibration(self, args, train_dataloader):
        """The first ``calibration_batches`` training batches, read in order by a fresh loader (no shuffling; its
        iterator still draws one base seed from the global RNG)."""
        if train_dataloader is None:
            raise ValueError(
                f"`importance`={self.config.importance!r} needs the Trainer's training data for calibration."
            )
        loader = DataLoader(
            train_dataloader.dataset,
            batch_size=args.per_device_train_batch_size,
            collate_fn=train_dataloader.collate_fn,
        )
        for index, batch in enumerate(loader):
            if index >= self.config.calibration_batches:
                return
            yield {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    @torch.no_grad()
    def _prune(self, step: int, args, model, optimizer, train_dataloader) -> None:
        config, masks = self.config, dataclasses.replace(self.masks)  # a new object: `self.masks` stays as it was
        if config.budget is not None:
            self.masks = _broadcast(self._budget_masks(args, model, train_dataloader), args.device)
            return
        for target in sorted(config.targets, key=lambda t: t == "hidden"):  # hidden last: it reads the head masks
            sparsity = self._target_sparsity(target, step)
            if target == "hidden":
                sparsity = hidden_step_sparsity(model, masks, sparsity)
            # Skip scoring when the masks would come back unchanged. Block influence still runs: its calibration
            # DataLoader advances the global RNG, which the rest of training depends on.
            calibrated = config.importance in ("block_influence", "activation")
            if not calibrated and not self._removes_more(model, target, sparsity):
                continue
            if target == "unstructured":
                weights = prunable_weights(model)
                new = magnitude_masks(weights, sparsity, config.scope, previous=masks.weights)
                masks.weights = {name: keep & masks.weights[name].to(keep.device) for name, keep in new.items()}
                continue
            scores = self._scores(target, args, model, train_dataloader)
            if target in ("layers", "hidden"):
                chosen = select_units(scores, {0: getattr(masks, target)}, sparsity, "local", min_keep=1)[0]
                setattr(masks, target, chosen)
            elif target == "ffn_neurons":
                masks.ffn_neurons = select_units(scores, masks.ffn_neurons, sparsity, config.scope, min_keep=1)
            else:
                layout = self._layout(model, "heads")
                minimum = config.min_heads_per_layer
                masks.heads = select_heads(self.masks.heads, scores, layout, sparsity, config.scope, minimum)
        masks = _broadcast(masks, args.device)
        if not masks.equals(self.masks):
            self._updates += 1
        self.masks = masks
        self._taylor = {}
        if logger.isEnabledFor(logging.INFO):  # `sparsity()` counts every mask
            logger.info(f"Pruning step {step}: sparsity {self.masks.sparsity()}")

    def _budget_masks(self, args, model, train_dataloader) -> PruningMasks:
        """Masks of the shape the budget search picks (rank 0 prints the candidates table)."""
        batches = list(self._calibration(args, train_dataloader))
        masks, self.budget_table = budget_masks(model, self.config, batches, verbose=args.process_index == 0)
        return masks

    def _removes_more(self, model, target: str, sparsity: float) -> bool:
        layout = self._layout(model, "heads") if target == "heads" else None
        return removes_more_units(self.masks, target, sparsity, self.config.scope, layout)

    def _restore(self, checkpoint: str, model) -> None:
        path = os.path.join(checkpoint, MASKS_NAME)
        if os.path.isfile(path):
            self.masks, self._taylor = load_masks(path)
            return
        # Resuming from a checkpoint outside `args.output_dir`: removed structure is exactly zero in the weights.
        logger.warning(f"No {MASKS_NAME} in {checkpoint}; rebuilding head/neuron/weight masks from zeroed weights.")
        masks_from_weights(model, self.masks, self.config.targets)

    def _physical_removal(self, model) -> None:
        targets = self.config.structured_targets
        if targets:
            self.removed = remove_masked(model, self.masks, list(targets))
