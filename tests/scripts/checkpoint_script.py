"""A Trainer run with a PruningCallback and checkpoints every 2 steps, used by tests/test_faults.py.

Run as a script it is killed with SIGKILL while saving `checkpoint-<kill_at>` (after the Trainer's files, before the
callback's masks): the half-written checkpoint a crash leaves.

    python tests/scripts/checkpoint_script.py OUTPUT_DIR 4
"""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_compress import PruningCallback, PruningConfig  # noqa: E402
from tests.tiny_models import tiny_inputs, tiny_model  # noqa: E402

STEPS = 6


class KillWhileSaving(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def build_trainer(output_dir: str, kill_at: int | None = None) -> Trainer:
    inputs = tiny_inputs(batch=16, seed=3)
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": i % 3}
        for i, (ids, mask) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"]))
    ]
    config = PruningConfig(targets={"heads": 0.5, "ffn_neurons": 0.5}, schedule="linear", end_step=STEPS)
    callbacks = [KillWhileSaving(kill_at)] if kill_at else []  # before the pruning callback: its files never come
    args = TrainingArguments(
        output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    model = tiny_model("bert", "seq_cls").train()
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=[*callbacks, PruningCallback(config)])


if __name__ == "__main__":
    build_trainer(sys.argv[1], int(sys.argv[2])).train()
