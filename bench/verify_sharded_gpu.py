"""Self-checking GPU verification of the sharded paths (about 2 minutes on one GPU; tiny Llamas, a few steps).

Run from the repository root on a machine with CUDA: ``python bench/verify_sharded_gpu.py``. It runs

1. ``reference``: one process, unsharded: distillation steps (SGD, fixed batches) and magnitude pruning (half the FFN
   neurons and head groups) + surgery; writes the resulting weights;
2. ``sharded`` under ``torchrun`` (one process per GPU, at most 2, NCCL):

   * ``raw_fsdp2``: ``hf_compress.pruning.sharded`` on a ``fully_shard`` student: scores, masks on local shards,
     one training step, surgery on the gathered state dict and a sharded teacher, each against the unsharded result;
   * ``trainer_fsdp2``: ``DistillationTrainer`` with the Trainer's FSDP2 (``fsdp="full_shard"``, version 2) on the
     same steps, opted in to the sharded teacher (``HF_COMPRESS_ALLOW_UNVERIFIED_SHARDING=1``,
     ``teacher_sharding="auto"``): final weights against the reference, ``trainer.teacher_placement == "fsdp2"`` and
     each rank holding ``1 / world`` of the teacher's parameter bytes;
   * ``trainer_fsdp2_replicated``: the same with ``teacher_sharding="replicate"`` (a full teacher per rank);
   * ``trainer_zero3``: DeepSpeed ZeRO-3, opted in: the teacher is a DeepSpeed inference engine
     (``teacher_placement == "zero3"``), final weights against the reference (SKIPPED when ``deepspeed`` is not
     installed);
   * ``refusals``: without the opt-in the sharded teacher, and ``PruningCallback`` and on-policy generation under
     the Trainer's FSDP, must still refuse with a message naming the unverified path.

When every check passes, the refusal of the sharded teacher (``hf_compress.distillation.placement``) can be lifted.

Prints one ``PASS`` / ``FAIL`` / ``SKIPPED`` line per check and exits non-zero on any ``FAIL``. ``--device cpu``
runs the same on CPU processes with gloo (where the Trainer's FSDP falls back to DDP: it proves nothing about FSDP,
only that the script works).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_compress.distillation.config import DistillationConfig  # noqa: E402
from hf_compress.distillation.placement import ALLOW_UNVERIFIED  # noqa: E402
from hf_compress.distillation.trainer import DistillationTrainer  # noqa: E402
from hf_compress.pruning.callback import PruningCallback  # noqa: E402
from tests.scripts import sharded_script  # noqa: E402
from tests.tiny_models import tiny_inputs, tiny_model  # noqa: E402

STEPS, BATCH = 3, 8


def dataset() -> list[dict[str, torch.Tensor]]:
    ids = tiny_inputs(BATCH * STEPS, 12, seed=7)["input_ids"]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def teacher_fraction(teacher: torch.nn.Module) -> float:
    """Fraction of the teacher's parameter elements this rank holds (FSDP2 DTensor shards, ZeRO-3 partitions)."""
    held = full = 0
    for p in teacher.parameters():
        if isinstance(p, DTensor):
            held, full = held + p.to_local().numel(), full + p.numel()
        elif hasattr(p, "ds_tensor"):  # ZeRO-3: `p` is an empty placeholder, `ds_tensor` the local partition
            held, full = held + p.ds_tensor.numel(), full + p.ds_numel
        else:
            held, full = held + p.numel(), full + p.numel()
    return held / full


def distil(output_dir: str, device: str, world: int, **sharding) -> tuple[dict[str, torch.Tensor], str, float]:
    """STEPS distillation steps at a global batch of BATCH; returns the student's full state dict (every rank), the
    teacher placement and the fraction of the teacher this rank holds."""
    args = DistillationConfig(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=BATCH // world, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        use_cpu=device == "cpu", temperature=2.0, alpha=0.5, **sharding,
    )  # fmt: skip
    student = tiny_model("llama", "causal_lm", seed=0).train()
    teacher = tiny_model("llama", "causal_lm", seed=1, hidden_size=32)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset())
    trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model)  # gathered (FSDP / ZeRO-3) on the main process
    weights = {k: v.detach().float().cpu() for k, v in (state or {}).items()}
    return weights, trainer.teacher_placement, teacher_fraction(trainer.teacher_model)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reference(workdir: Path, device: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(distil(tmp, device, 1)[0], workdir / "reference.pt")


def refusal(make, names: str) -> tuple[str, str]:
    """PASS when `make()` raises a `ValueError` saying that the path `names` is unverified."""
    try:
        make()
    except ValueError as err:
        message = str(err)
        return ("PASS" if "verified" in message and names in message else "FAIL"), message[:160]
    return "FAIL", "no refusal"


def sharded(workdir: Path, device: str) -> None:
    import torch.distributed as dist  # here: only the launched processes set up a process group

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    results: dict[str, tuple[str, str]] = {}
    # raw FSDP2: the CPU test's script, on this device's process group
    sys.argv = ["sharded_script.py", "--output_dir", str(workdir), "--device", device]
    sharded_script.main()  # writes rank<r>.json and destroys the process group
    checks = json.loads((workdir / f"rank{rank}.json").read_text())
    ok = checks["masks_equal"] and checks["scores_max_diff"] < 1e-5 and checks["weights_max_diff"] < 1e-5
    ok = ok and checks["teacher_logits_diff"] < 1e-4 and abs(checks["teacher_local_fraction"] - 1 / world) < 1e-6
    ok = ok and (rank != 0 or (checks["surgery_max_diff"] < 1e-6 and checks["pruned_logits_diff"] < 1e-5))
    results["raw_fsdp2"] = ("PASS" if ok else "FAIL", json.dumps(checks)[:200])

    ref = torch.load(workdir / "reference.pt")
    fsdp = dict(fsdp="full_shard", fsdp_config={"version": 2})
    # On CPU the Trainer's FSDP falls back to DDP: the teacher is not sharded there, so only the weights are checked.
    on_gpu = device == "cuda"

    def trainer_check(expected: str, fraction: float | None, **sharding) -> tuple[str, str]:
        with tempfile.TemporaryDirectory() as tmp:
            state, placement, held = distil(tmp, device, world, **sharding)
        diff = max_diff(state, ref) if rank == 0 else 0.0
        ok = diff < 1e-4
        if on_gpu:
            ok = ok and placement == expected and (fraction is None or abs(held - fraction) < 0.02)
        return (
            "PASS" if ok else "FAIL",
            f"max |w - w_ref| = {diff:.3g}, placement {placement}, teacher held {held:.3f}",
        )

    os.environ[ALLOW_UNVERIFIED] = "1"  # the opt-in these checks verify
    results["trainer_fsdp2"] = trainer_check("fsdp2", 1 / world, teacher_sharding="auto", **fsdp)
    results["trainer_fsdp2_replicated"] = trainer_check("replicated", 1.0, teacher_sharding="replicate", **fsdp)
    if importlib.util.find_spec("deepspeed") is None:
        results["trainer_zero3"] = ("SKIPPED", "deepspeed is not installed")
    else:
        zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}  # fmt: skip
        # ZeRO-3 keeps small parameters whole (stage3_param_persistence_threshold): the fraction is not checked
        results["trainer_zero3"] = trainer_check("zero3", None, teacher_sharding="auto", deepspeed=zero3)
    del os.environ[ALLOW_UNVERIFIED]

    def prune_under_fsdp():
        args = DistillationConfig(output_dir=str(workdir / "p"), max_steps=1, report_to="none", **fsdp,
                                  per_device_train_batch_size=2, use_cpu=device == "cpu",
                                  teacher_sharding="replicate")  # fmt: skip
        callback = PruningCallback(targets={"heads": 0.5})
        trainer = DistillationTrainer(model=tiny_model("llama", "causal_lm").train(),
                                      teacher_model=tiny_model("llama", "causal_lm", seed=1), args=args,
                                      train_dataset=dataset(), callbacks=[callback])  # fmt: skip
        trainer.train()

    def on_policy_under_fsdp():
        args = DistillationConfig(output_dir=str(workdir / "o"), max_steps=1, report_to="none", on_policy_ratio=1.0,
                                  use_cpu=device == "cpu", teacher_sharding="replicate", **fsdp)  # fmt: skip
        DistillationTrainer(model=tiny_model("llama", "causal_lm").train(),
                            teacher_model=tiny_model("llama", "causal_lm", seed=1), args=args)  # fmt: skip

    def sharded_teacher_without_opt_in():
        with tempfile.TemporaryDirectory() as tmp:
            distil(tmp, device, world, teacher_sharding="auto", **fsdp)

    if device == "cuda":
        results["refusal_teacher_sharding_fsdp2"] = refusal(sharded_teacher_without_opt_in, "teacher")
        results["refusal_pruning_fsdp"] = refusal(prune_under_fsdp, "fsdp")
        results["refusal_on_policy_fsdp"] = refusal(on_policy_under_fsdp, "on_policy_ratio")
    else:
        results["refusals"] = ("SKIPPED", "the Trainer's FSDP needs a GPU (on CPU it falls back to DDP)")
    if rank == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--part", choices=["all", "reference", "sharded"], default="all")
    parser.add_argument("--workdir", default=None)
    cli = parser.parse_args()
    if cli.device == "cuda" and not torch.cuda.is_available():
        print("FAIL no CUDA device: run on a GPU machine, or pass --device cpu to check the script itself")
        return 1
    if cli.part == "reference":
        reference(Path(cli.workdir), cli.device)
        return 0
    if cli.part == "sharded":
        sharded(Path(cli.workdir), cli.device)
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="verify_sharded_"))
    script = [str(Path(__file__).resolve()), "--device", cli.device, "--workdir", str(workdir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if cli.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    subprocess.run([sys.executable, *script, "--part", "reference"], check=True, env=env, cwd=ROOT)
    world = 2 if cli.device == "cpu" else max(1, min(2, torch.cuda.device_count()))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), *script]
    run = subprocess.run([*launch, "--part", "sharded"], env=env, cwd=ROOT)
    if run.returncode != 0 or not (workdir / "results.json").is_file():
        print(f"FAIL sharded processes exited with status {run.returncode}")
        return 1
    results = json.loads((workdir / "results.json").read_text())
    for name, (status, detail) in results.items():
        print(f"{status:8s} {name}: {detail}")
    return 1 if any(status == "FAIL" for status, _ in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
