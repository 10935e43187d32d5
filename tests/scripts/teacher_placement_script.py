"""The FSDP2 teacher placement of `DistillationTrainer` on CPU processes (gloo), against the unsharded teacher.
Launched by tests/distillation/test_placement.py:

    torchrun --nproc_per_node 2 tests/scripts/teacher_placement_script.py --output_dir out

1. `prepare_teacher(..., "fsdp2", accelerator)` with an accelerator-like object holding a named CPU mesh: logits of
   each rank's own batch (under `torch.no_grad()` and `torch.inference_mode()`, as the trainer runs the teacher) and
   the bytes of teacher parameters each rank holds, against the unsharded teacher;
2. two `DistillationTrainer` runs of the same steps, the teacher replicated and sharded: the FSDP2 plan is simulated
   (`distribution_of` reports FSDP version 2, the opt-in is set), the student stays DDP, so the sharded teacher's
   collective forward runs inside the Trainer's loop; their losses must match.

Writes `<output_dir>/rank<r>.json` with the checks of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import hf_compress.distillation.placement as placement_module  # noqa: E402
from hf_compress.distillation.config import DistillationConfig  # noqa: E402
from hf_compress.distillation.placement import ALLOW_UNVERIFIED, prepare_teacher, teacher_placement  # noqa: E402
from hf_compress.distillation.teacher import build_teacher  # noqa: E402
from hf_compress.distillation.trainer import DistillationTrainer  # noqa: E402
from hf_compress.distributed import local_parameter_bytes  # noqa: E402
from tests.tiny_models import tiny_inputs, tiny_model  # noqa: E402


def teacher(seed: int = 1):
    return tiny_model("llama", "causal_lm", seed=seed, hidden_size=32)


def dataset(n: int, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    ids = tiny_inputs(n, seq, seed=7)["input_ids"]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def distil(output_dir: str, sharded: bool) -> tuple[list[float], str, bool]:
    """Three SGD steps; returns (losses, teacher placement, whether the teacher is DTensors in a 2-process run)."""
    args = DistillationConfig(
        output_dir=output_dir, max_steps=3, per_device_train_batch_size=2, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        temperature=2.0, alpha=0.5, disable_tqdm=True, teacher_sharding="auto" if sharded else "replicate",
    )  # fmt: skip
    simulated = (2, None) if sharded else (None, None)
    placement_module.distribution_of = lambda accelerator: simulated
    trainer = DistillationTrainer(
        model=tiny_model("llama", "causal_lm", seed=0).train(), teacher_model=teacher(), args=args,
        train_dataset=dataset(12),
    )  # fmt: skip
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    is_dtensor = any(isinstance(p, DTensor) for p in trainer.teacher_model.parameters())
    return losses, trainer.teacher_placement, is_dtensor and trainer.args.world_size == 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    cli = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard_cp",))
    rank = dist.get_rank()
    checks: dict[str, float | bool | str | list] = {}

    # 1. prepare_teacher on an accelerate-like mesh (sliced by the FSDP dimension names, as accelerate's is).
    parallelism = SimpleNamespace(fsdp_dim_names=["dp_shard_cp"])
    accelerator = SimpleNamespace(torch_device_mesh=mesh, parallelism_config=parallelism)
    reference = teacher()
    placement = teacher_placement("auto", 2, None, allow_unverified=True)
    built = build_teacher(teacher(), "causal_lm", {}, False, None, None)
    sharded = prepare_teacher(built, placement, accelerator)
    batch = tiny_inputs(3, 10, seed=11 + rank)  # each rank its own batch, as under data parallelism
    with torch.no_grad():
        expected = reference(**batch, use_cache=False).logits
        no_grad = sharded(**batch, use_cache=False).logits
    with torch.inference_mode():
        inference = sharded(**batch, use_cache=False).logits
    checks["placement"] = placement
    checks["logits_max_diff_no_grad"] = float((no_grad - expected).abs().max())
    checks["logits_max_diff_inference_mode"] = float((inference - expected).abs().max())
    checks["local_bytes"] = local_parameter_bytes(sharded)
    checks["full_bytes"] = local_parameter_bytes(reference)
    checks["frozen"] = not sharded.training and not any(p.requires_grad for p in sharded.parameters())

    # 2. The trainer with a replicated and a sharded teacher.
    os.environ[ALLOW_UNVERIFIED] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        checks["losses_replicated"], checks["placement_replicated"], _ = distil(os.path.join(tmp, "r"), False)
        checks["losses_sharded"], checks["placement_sharded"], checks["trainer_teacher_dtensor"] = distil(
            os.path.join(tmp, "s"), True
        )

    with open(os.path.join(cli.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(checks, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
