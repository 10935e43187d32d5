"""Short Taylor-importance pruning run of a tiny causal LM, launched by tests/test_callback_distributed.py.

Each rank adds its own noise to the accumulated Taylor scores (as if gradients were not synchronised), so the masks
only agree if PruningCallback averages scores over ranks and broadcasts its decision. Writes
`<output_dir>/rank<r>.json`: world size, the mask fingerprint after every step and what surgery removed.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/prune_script.py --output_dir out
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hf_compress.distributed import shutdown_distributed  # noqa: E402
from hf_compress.pruning.callback import PruningCallback  # noqa: E402
from hf_compress.pruning.config import PruningConfig  # noqa: E402
from tests.conftest import tiny_inputs, tiny_model  # noqa: E402


class RankNoise(TrainerCallback):
    """Perturb the pruning callback's Taylor scores differently on every rank, and record its masks."""

    def __init__(self, pruning: PruningCallback, rank: int):
        self.pruning, self.rank, self.fingerprints = pruning, rank, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        g = torch.Generator().manual_seed(1000 + self.rank + state.global_step)
        for key, value in self.pruning._taylor.items():
            self.pruning._taylor[key] = value + torch.rand(value.shape, generator=g) * value.abs().max()

    def on_step_end(self, args, state, control, **kwargs):
        self.fingerprints.append(self.pruning.masks.fingerprint())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    cli = parser.parse_args()

    ids = tiny_inputs(32, 8, seed=3)["input_ids"]
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    args = TrainingArguments(
        output_dir=cli.output_dir,
        max_steps=cli.steps,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    config = PruningConfig(
        targets={"heads": 0.5, "ffn_neurons": 0.5}, schedule="linear", start_step=1, end_step=4, importance="taylor"
    )
    pruning = PruningCallback(config)
    model = tiny_model("llama", "causal_lm", seed=0).train()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[pruning])
    noise = RankNoise(pruning, trainer.accelerator.process_index)
    trainer.add_callback(noise)
    trainer.train()
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    removed = {
        key: {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
        for key, value in pruning.removed.items()
    }
    with open(os.path.join(cli.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": world, "fingerprints": noise.fingerprints, "removed": removed}, f)
    shutdown_distributed(trainer)


if __name__ == "__main__":
    main()
