"""The logged loss components of `DistillationTrainer` (`loss_soft`, `loss_hard`, `loss_hidden`, ...).

Each component is accumulated with the scaling of the returned loss, so the logged components add up to the logged
loss, and averaged over the steps (train) or batches (eval) since the last log line, across processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TOKEN_COMPONENTS = ("loss_soft", "loss_hard")  # normalised by `num_items_in_batch`, like the loss itself


class LossComponents:
    """Running sums of the loss components per mode (`"train"` / `"eval"`), flushed into each log line."""

    def __init__(self):
        self.sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self.calls = {"train": 0, "eval": 0}
        self.window_start = 0

    def record(self, mode: str, step: int, components: dict, token_scale, aux_scale, log_scale) -> None:
        """Add one `compute_loss` call's components (detached) with the scales applied to the returned loss."""
        sums = self.sums[mode]
        if mode == "train" and not sums:
            self.window_start = step
        for key, value in components.items():
            scale = token_scale if key in TOKEN_COMPONENTS else aux_scale
            sums[key] = sums.get(key, 0.0) + value.detach().float() * scale * log_scale
        self.calls[mode] += 1

    def flush(self, mode: str, step: int, gather: Callable, device: torch.device) -> dict[str, float]:
        """The averaged components since the last flush (`eval_`-prefixed in eval), gathered across processes."""
        if not self.sums[mode]:
            return {}
        keys = sorted(self.sums[mode])
        values = torch.stack([self.sums[mode][k] for k in keys]).to(device)
        values = gather(values).view(-1, len(keys)).mean(0)
        divisor = max(step - self.window_start, 1) if mode == "train" else self.calls[mode]
        prefix = "" if mode == "train" else "eval_"
        self.sums[mode], self.calls[mode] = {}, 0
        return {prefix + k: v / divisor for k, v in zip(keys, values.tolist())}
