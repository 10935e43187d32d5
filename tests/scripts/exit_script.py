"""An unmodified user script: distil + prune a tiny BERT for two steps, save, and simply end (no cleanup call).

Launched ten times with two gloo processes by tests/test_distributed.py: every launch must exit with status 0. The
trainer stays referenced at module level until interpreter exit, the case that used to abort in gloo's teardown.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/exit_script.py OUTPUT_DIR
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hf_compress import DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig  # noqa: E402
from tests.tiny_models import tiny_inputs, tiny_model  # noqa: E402

inputs = tiny_inputs(batch=8)
rows = [
    {"input_ids": ids, "attention_mask": mask, "labels": i % 3} for i, (ids, mask) in enumerate(zip(*inputs.values()))
]
args = DistillationConfig(
    sys.argv[1], max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no"
)
trainer = DistillationTrainer(
    model=tiny_model("bert", "seq_cls").train(),
    teacher_model=tiny_model("bert", "seq_cls", seed=1),
    args=args,
    train_dataset=rows,
    callbacks=[PruningCallback(PruningConfig(target="ffn_neurons", sparsity=0.5, schedule="one_shot"))],
)
trainer.train()
trainer.save_model()
