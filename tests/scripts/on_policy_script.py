"""Short on-policy distillation of a tiny Llama (the student generates every step), launched by
tests/distillation/test_on_policy.py on two CPU processes and compared with one process at the same global batch.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/on_policy_script.py --output_dir out --batch_size 4

Writes `<output_dir>/rank<r>.json`: world size, the losses (logged on the main process), a checksum of the student
weights and the number of generated batches of that process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hf_compress.distillation.config import DistillationConfig  # noqa: E402
from hf_compress.distillation.on_policy import GENERATED_KEY, PromptCompletionCollator  # noqa: E402
from hf_compress.distillation.trainer import DistillationTrainer  # noqa: E402
from hf_compress.distributed import shutdown_distributed  # noqa: E402
from tests.tiny_models import tiny_model, tiny_tokenizer  # noqa: E402


def train(output_dir: str, batch_size: int, steps: int = 3) -> tuple[DistillationTrainer, dict]:
    tok = tiny_tokenizer()
    tok.eos_token = "[SEP]"
    data = [{"prompt": " ".join(f"w{(5 * i + j) % 50 + 1}" for j in range(2 + i % 4))} for i in range(8 * steps)]
    args = DistillationConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        temperature=1.0,
        distillation_loss="jsd",
        on_policy_ratio=1.0,
        max_new_tokens=6,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    trainer = DistillationTrainer(
        model=tiny_model("llama", "causal_lm", seed=0).train(),
        teacher_model=tiny_model("llama", "causal_lm", seed=1, hidden_size=32),
        args=args,
        train_dataset=data,
        data_collator=PromptCompletionCollator(tok),
        processing_class=tok,
    )
    generated = []
    original = trainer.compute_loss
    trainer.compute_loss = lambda model, inputs, **kw: (
        generated.append(inputs.get(GENERATED_KEY)) or original(model, inputs, **kw)
    )
    trainer.train()
    student = trainer.accelerator.unwrap_model(trainer.model)
    result = {
        "world_size": trainer.accelerator.num_processes,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "weight_sum": sum(p.detach().double().abs().sum().item() for p in student.parameters()),
        "generated": generated.count("student"),
    }
    return trainer, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    cli = parser.parse_args()
    trainer, result = train(cli.output_dir, cli.batch_size)
    with open(os.path.join(cli.output_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    shutdown_distributed(trainer)


if __name__ == "__main__":
    main()
