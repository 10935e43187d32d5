"""Short Taylor-importance pruning runs of tiny models, launched by tests/pruning/test_callback_distributed.py.

Each rank adds its own noise to the accumulated Taylor scores (as if gradients were not synchronised), so the masks
only agree if PruningCallback averages scores over ranks and broadcasts its decision. Writes
`<output_dir>/rank<r>.json`: world size, the mask fingerprint after every step and what surgery removed. With
`--family` given (one or more), each family trains a tiny model (Llama: causal LM, others: sequence classification)
with `--targets`, records the hidden mask after every step, the final config's sizes and logits on fixed inputs, and
saves the pruned model to `<output_dir>/<family>` (rank 0); `rank<r>.json` then maps each family to its record.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/prune_script.py --output_dir out
    accelerate launch ... tests/scripts/prune_script.py --output_dir out --family bert llama \
        --targets '{"hidden": 0.25, "heads": 0.5}'
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
from tests.tiny_models import tiny_inputs, tiny_model  # noqa: E402


class RankNoise(TrainerCallback):
    """Perturb the pruning callback's Taylor scores differently on every rank, and record its masks."""

    def __init__(self, pruning: PruningCallback, rank: int):
        self.pruning, self.rank, self.fingerprints, self.hidden = pruning, rank, [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        g = torch.Generator().manual_seed(1000 + self.rank + state.global_step)
        for key, value in self.pruning._taylor.items():
            self.pruning._taylor[key] = value + torch.rand(value.shape, generator=g) * value.abs().max()

    def on_step_end(self, args, state, control, **kwargs):
        masks = self.pruning.masks
        self.fingerprints.append(masks.fingerprint())
        self.hidden.append(masks.removed("hidden"))


def train(
    family: str | None, targets: dict, output_dir: str, steps: int
) -> tuple[Trainer, PruningCallback, RankNoise]:
    """A short pruning run of a tiny ``family`` model (Llama causal LM by default)."""
    ids = tiny_inputs(32, 8, seed=3)["input_ids"]
    causal = family in (None, "llama")
    data = [
        {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x if causal else torch.tensor(i % 3)}
        for i, x in enumerate(ids)
    ]
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    config = PruningConfig(targets=targets, schedule="linear", start_step=1, end_step=4, importance="taylor")
    pruning = PruningCallback(config)
    model = tiny_model(family or "llama", "causal_lm" if causal else "seq_cls", seed=0).train()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[pruning])
    noise = RankNoise(pruning, trainer.accelerator.process_index)
    trainer.add_callback(noise)
    trainer.train()
    return trainer, pruning, noise


def removed_lists(pruning: PruningCallback) -> dict:
    return {
        key: {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
        for key, value in pruning.removed.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--family", nargs="+", default=None)
    parser.add_argument("--targets", default='{"heads": 0.5, "ffn_neurons": 0.5}')
    cli = parser.parse_args()
    targets = json.loads(cli.targets)
    if cli.family is None:
        trainer, pruning, noise = train(None, targets, cli.output_dir, cli.steps)
        record = {"fingerprints": noise.fingerprints, "removed": removed_lists(pruning)}
    else:
        record = {}
        for family in cli.family:
            trainer, pruning, noise = train(family, targets, os.path.join(cli.output_dir, f"run-{family}"), cli.steps)
            model = trainer.model.eval()
            with torch.no_grad():
                logits = model(**tiny_inputs()).logits
            trainer.save_model(os.path.join(cli.output_dir, family))  # rank 0 writes
            record[family] = {
                "fingerprints": noise.fingerprints,
                "hidden_removed": noise.hidden,
                "removed": removed_lists(pruning),
                "hidden_size": model.config.hidden_size,
                "params": sum(p.numel() for p in model.parameters()),
                "logits": logits.tolist(),
            }
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    with open(os.path.join(cli.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world_size": world, **record}, f)
    shutdown_distributed(trainer)


if __name__ == "__main__":
    main()
