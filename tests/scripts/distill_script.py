"""Short deterministic distillation of a tiny causal LM, launched by tests/test_distributed.py.

The teacher is wider than the student, so the hidden-state loss trains a projection that DDP must synchronise. Writes
`<output_dir>/losses.json` (per-step losses, main process) and `<output_dir>/rank<r>.json` (teacher forward count,
world size and a checksum of the projection weights, per process).

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/distill_script.py --output_dir out --batch_size 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hf_compress.distillation.config import DistillationConfig  # noqa: E402
from hf_compress.distillation.trainer import DistillationTrainer  # noqa: E402
from hf_compress.distributed import shutdown_distributed  # noqa: E402
from tests.tiny_models import tiny_inputs, tiny_model  # noqa: E402


def dataset(n: int, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = tiny_inputs(n, seq, seed=7)["input_ids"]
    labels = ids.clone()
    labels[::3, : seq // 2] = -100  # uneven label counts per sample
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=4, help="per-device train batch size")
    parser.add_argument("--steps", type=int, default=4)
    cli = parser.parse_args()

    student = tiny_model("llama", "causal_lm", seed=0).train()
    teacher = tiny_model("llama", "causal_lm", seed=1, hidden_size=32)  # wider: exercises the learned projection
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    args = DistillationConfig(
        output_dir=cli.output_dir,
        max_steps=cli.steps,
        per_device_train_batch_size=cli.batch_size,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        temperature=2.0,
        alpha=0.5,
        hidden_loss_weight=0.5,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    data = dataset(8 * cli.steps)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    with open(os.path.join(cli.output_dir, f"rank{rank}.json"), "w") as f:
        projection = sum(p.detach().double().sum().item() for p in trainer.hidden_projection.parameters())
        json.dump({"teacher_calls": len(calls), "world_size": world, "projection_sum": projection}, f)
    if trainer.is_world_process_zero():
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        with open(os.path.join(cli.output_dir, "losses.json"), "w") as f:
            json.dump(
                {
                    "loss": [h["loss"] for h in history],
                    "loss_soft": [h["loss_soft"] for h in history],
                    "loss_hidden": [h["loss_hidden"] for h in history],
                },
                f,
            )
    shutdown_distributed(trainer)


if __name__ == "__main__":
    main()
