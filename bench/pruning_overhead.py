"""The training-step overhead section of ``bench_pruning.py``: ``PruningCallback`` vs ``torch.nn.utils.prune``.

Plain ``Trainer`` steps on one model and data, against the same steps with a ``PruningCallback`` (cubic heads + FFN
schedule, active during the measured steps; its own hooks timed too) and with ``torch.nn.utils.prune`` masks.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from common import StepTimer, summarize
from torch.nn.utils import prune as torch_prune
from transformers import Trainer, TrainingArguments

from hf_compress.models.families import block_module, get_layers
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.schedules import is_pruning_step

MODULE_ROLES = ("q", "k", "v", "o", "up", "down")  # the Linear layers both pruning methods act on


class HookTimed(PruningCallback):
    """``PruningCallback`` that also times its own per-step hooks: a direct, low-noise overhead reading.

    ``hooks[i]`` is ``(seconds, pruning_event)`` of optimizer step ``i``; ``pruning_event`` marks the steps whose
    ``on_step_end`` re-scored and re-selected units (the others only re-apply masks to gradients and weights).
    """

    def __init__(self, config: PruningConfig):
        super().__init__(config)
        self.hooks: list[list] = []

    def _timed(self, event: str, args, state, control, **kwargs) -> None:
        start = time.perf_counter()
        getattr(super(), event)(args, state, control, **kwargs)
        if self.hooks:
            self.hooks[-1][0] += time.perf_counter() - start

    def on_step_begin(self, args, state, control, **kwargs):
        self.hooks.append([0.0, False])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._timed("on_pre_optimizer_step", args, state, control, **kwargs)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._timed("on_optimizer_step", args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.hooks:
            c = self.config
            self.hooks[-1][1] = is_pruning_step(state.global_step, c.start_step, c.end_step, c.frequency, c.schedule)
        self._timed("on_step_end", args, state, control, **kwargs)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, rows: int, seq: int, vocab: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, vocab, (rows, seq), generator=generator)
        self.labels = torch.randint(0, 2, (rows,), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def pruning_config(size: dict, frequency: int) -> PruningConfig:
    """Heads + FFN to 50% on a cubic schedule ending at the last step, so masks grow during the measured steps."""
    return PruningConfig(
        targets={"heads": 0.5, "ffn_neurons": 0.5},
        schedule="cubic",
        start_step=0,
        end_step=size["train_steps"],
        frequency=frequency,
        scope="local",
    )


def train_variant(
    variant: str, base: torch.nn.Module, data: RandomTokens, size: dict, workdir: Path, frequency: int | None
) -> dict:
    """One ``Trainer`` run of ``variant``; per-step times (and the callback's own hook times) after warm-up."""
    model = copy.deepcopy(base).train()
    timer, callbacks, pruning = StepTimer(), [], None
    if frequency is not None:
        pruning = HookTimed(pruning_config(size, frequency))
        callbacks.append(pruning)
    elif variant.startswith("torch_prune"):
        for layer in range(len(get_layers(model))):
            for role in MODULE_ROLES:
                module = block_module(model, layer, role)
                if variant == "torch_prune_l1_unstructured":
                    torch_prune.l1_unstructured(module, "weight", amount=0.5)
                else:
                    torch_prune.ln_structured(module, "weight", amount=0.5, n=2, dim=0)
    args = TrainingArguments(
        output_dir=str(workdir / variant),
        max_steps=size["train_steps"],
        per_device_train_batch_size=size["train_batch"],
        learning_rate=5e-5,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[timer, *callbacks]).train()
    result = {"step_s": summarize(timer.step_times(skip=size["train_skip"]))}
    if pruning is not None:
        hooks = pruning.hooks[size["train_skip"] : size["train_steps"] - 1]  # the timed steps
        result["frequency"] = frequency
        result["hooks_s_per_step"] = summarize([seconds for seconds, _ in hooks])
        for label, event in (("hooks_s_pruning_steps", True), ("hooks_s_mask_only_steps", False)):
            times = [seconds for seconds, is_event in hooks if is_event == event]
            result[label] = summarize(times) if times else None
        result["removed_at_end"] = {
            target: sum(len(units) for units in pruning.removed[target].values())
            for target in ("heads", "ffn_neurons")
        }
    return result


def training_section(base: torch.nn.Module, size: dict, workdir: Path, prune_every: int) -> dict:
    data = RandomTokens(size["train_batch"] * size["train_steps"], size["seq"], base.config.vocab_size)
    variants = {
        "no_callback": None,
        "pruning_callback_every_step": 1,
        f"pruning_callback_every_{prune_every}_steps": prune_every,
        "torch_prune_l1_unstructured": None,
        "torch_prune_ln_structured": None,
    }
    if prune_every == 1:
        del variants["pruning_callback_every_1_steps"]
    config = pruning_config(size, 1)
    out = {
        "model": "bert (BertForSequenceClassification, latency shape)",
        "batch": f"{size['train_batch']}x{size['seq']}",
        "steps": size["train_steps"],
        "warmup_steps_skipped": size["train_skip"],
        "pruning_config": {k: getattr(config, k) for k in ("targets", "schedule", "start_step", "end_step", "scope")},
        "torch_prune_modules": list(MODULE_ROLES),
        "torch_prune_amount": 0.5,
        "goal_max_ratio": 1.03,
        "variants": {},
    }
    for variant, frequency in variants.items():
        print(f"training: {variant} ...", flush=True)
        out["variants"][variant] = train_variant(variant, base, data, size, workdir, frequency)
    baseline = out["variants"]["no_callback"]["step_s"]["median"]
    for result in out["variants"].values():
        result["ratio_vs_no_callback"] = result["step_s"]["median"] / baseline
        if "hooks_s_per_step" in result:  # mean: pruning steps are amortised over the steps between them
            result["hooks_fraction_of_step"] = result["hooks_s_per_step"]["mean"] / baseline
    return out
