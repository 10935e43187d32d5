"""Teacher placement: the decision from the accelerator's plan, the refusals, and the FSDP2 teacher on 2 CPU ranks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

import hf_compress.distillation.placement as placement_module
from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.placement import (
    ALLOW_UNVERIFIED,
    distribution_of,
    placement_for,
    prepare_teacher,
    teacher_placement,
    unverified_sharding_allowed,
    zero3_inference_config,
)
from hf_compress.distillation.trainer import DistillationTrainer
from tests.conftest import ROOT, free_port
from tests.tiny_models import tiny_inputs, tiny_model


def accelerator(kind, fsdp_version=None, zero_stage=None):
    """An accelerator-like object with the state `distribution_of` reads."""
    ds = None if zero_stage is None else SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": zero_stage}})
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version), deepspeed_plugin=ds)
    return SimpleNamespace(distributed_type=kind, state=state)


@pytest.mark.parametrize(
    "state, plan",
    [
        (accelerator(DistributedType.NO), (None, None)),
        (accelerator(DistributedType.MULTI_CPU), (None, None)),
        (accelerator(DistributedType.FSDP, fsdp_version=2), (2, None)),
        (accelerator(DistributedType.FSDP, fsdp_version=1), (1, None)),
        (accelerator(DistributedType.DEEPSPEED, zero_stage=3), (None, 3)),
        (accelerator(DistributedType.DEEPSPEED, zero_stage=2), (None, 2)),
    ],
)
def test_distribution_is_read_from_the_accelerator_state(state, plan):
    assert distribution_of(state) == plan


@pytest.mark.parametrize(
    "sharding, plan, allowed, placement",
    [
        ("auto", (None, None), False, "device"),  # one process / DDP: a full copy, nothing to decide
        ("auto", (None, 2), False, "device"),  # ZeRO-2 keeps full parameters on every rank
        ("replicate", (2, None), False, "replicated"),
        ("replicate", (None, 3), False, "replicated"),
        ("auto", (2, None), True, "fsdp2"),
        ("auto", (None, 3), True, "zero3"),
    ],
)
def test_placement_follows_the_plan(sharding, plan, allowed, placement):
    assert teacher_placement(sharding, *plan, allow_unverified=allowed) == placement


@pytest.mark.parametrize("plan, named", [((2, None), "FSDP2"), ((None, 3), "ZeRO-3")])
def test_unverified_sharding_is_refused_by_default(plan, named):
    with pytest.raises(ValueError, match="unverified") as err:
        teacher_placement("auto", *plan, allow_unverified=False)
    message = str(err.value)
    assert named in message and f"{ALLOW_UNVERIFIED}=1" in message and "teacher_sharding='replicate'" in message


def test_fsdp1_and_unknown_choices_are_refused():
    with pytest.raises(ValueError, match="FSDP version 1"):
        teacher_placement("auto", 1, None, allow_unverified=True)
    assert teacher_placement("replicate", 1, None, allow_unverified=False) == "replicated"
    with pytest.raises(ValueError, match="`teacher_sharding` must be one of"):
        teacher_placement("shard", None, None, allow_unverified=True)
    with pytest.raises(ValueError, match="`teacher_sharding` must be one of"):
        DistillationConfig("out", teacher_sharding="shard")


def test_opt_in_reads_the_environment(monkeypatch):
    fsdp2 = accelerator(DistributedType.FSDP, fsdp_version=2)
    monkeypatch.delenv(ALLOW_UNVERIFIED, raising=False)
    assert not unverified_sharding_allowed()
    monkeypatch.setenv(ALLOW_UNVERIFIED, "true")  # only "1" opts in
    assert not unverified_sharding_allowed()
    with pytest.raises(ValueError, match="unverified"):
        placement_for(fsdp2, "auto")
    monkeypatch.setenv(ALLOW_UNVERIFIED, "1")
    assert unverified_sharding_allowed()
    assert placement_for(fsdp2, "auto") == "fsdp2"


def test_zero3_inference_config_drops_training_blocks_and_sizes_auto_buckets():
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW"},
        "scheduler": {"type": "WarmupLR"},
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu"},
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": 1000,  # set by the user: kept
        },
    }
    out = zero3_inference_config(config, hidden_size=16)
    assert "optimizer" not in out and "scheduler" not in out and "offload_optimizer" not in out["zero_optimization"]
    assert out["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": 256,
        "stage3_param_persistence_threshold": 160,
        "stage3_prefetch_bucket_size": 1000,
    }
    assert out["bf16"] == {"enabled": True} and out["train_micro_batch_size_per_gpu"] == 2
    assert "optimizer" in config and config["zero_optimization"]["reduce_bucket_size"] == "auto"  # not modified
    with pytest.raises(ValueError, match="`zero_optimization.stage` must be 3"):
        zero3_inference_config({"zero_optimization": {"stage": 2}}, 16)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="checks the message without deepspeed")
def test_zero3_placement_without_deepspeed_says_what_to_install():
    with pytest.raises(ModuleNotFoundError, match="'deepspeed' package"):
        prepare_teacher(tiny_model("llama", "causal_lm"), "zero3", accelerator(DistributedType.DEEPSPEED, None, 3))


def test_unsharded_placements_keep_the_teacher_as_is():
    teacher = tiny_model("llama", "causal_lm")
    assert prepare_teacher(teacher, "device", None) is teacher
    assert prepare_teacher(teacher, "replicated", None) is teacher
    with pytest.raises(ValueError, match="`placement` must be one of"):
        prepare_teacher(teacher, "tensor_parallel", None)


def data(n=4):
    ids = tiny_inputs(n, 8, seed=7)["input_ids"]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def make_trainer(tmp_path, teacher, **kwargs):
    args = DistillationConfig(str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                              use_cpu=True, save_strategy="no", disable_tqdm=True, **kwargs)  # fmt: skip
    student = tiny_model("llama", "causal_lm").train()
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data())


@pytest.mark.parametrize("plan", [(2, None), (None, 3)])
def test_trainer_refuses_a_sharded_plan_before_loading_the_teacher(tmp_path, monkeypatch, plan):
    monkeypatch.delenv(ALLOW_UNVERIFIED, raising=False)
    monkeypatch.setattr(placement_module, "distribution_of", lambda accelerator: plan)
    # A path that does not exist: the refusal must come first, not the loading error.
    with pytest.raises(ValueError, match="unverified"):
        make_trainer(tmp_path, str(tmp_path / "no-such-teacher"))


def test_trainer_replicates_on_request_and_trains(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_UNVERIFIED, raising=False)
    monkeypatch.setattr(placement_module, "distribution_of", lambda accelerator: (2, None))
    trainer = make_trainer(tmp_path, tiny_model("llama", "causal_lm", seed=1), teacher_sharding="replicate")
    assert trainer.teacher_placement == "replicated"
    assert next(trainer.teacher_model.parameters()).device == trainer.accelerator.device
    trainer.train()
    assert trainer.state.global_step == 1


def test_trainer_without_sharding_places_the_teacher_on_the_device(tmp_path):
    trainer = make_trainer(tmp_path, tiny_model("llama", "causal_lm", seed=1))
    assert trainer.teacher_placement == "device" and not trainer.teacher_model.training


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_fsdp2_teacher_on_two_processes_matches_the_unsharded_teacher(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "tests/scripts/teacher_placement_script.py", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop(ALLOW_UNVERIFIED, None)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        checks = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert checks["placement"] == "fsdp2" and checks["frozen"]
        assert checks["logits_max_diff_no_grad"] < 1e-6 and checks["logits_max_diff_inference_mode"] < 1e-6
        assert checks["local_bytes"] == pytest.approx(checks["full_bytes"] / 2, rel=0.01)  # sharded, not replicated
        assert (checks["placement_replicated"], checks["placement_sharded"]) == ("device", "fsdp2")
        assert checks["trainer_teacher_dtensor"]
        assert len(checks["losses_sharded"]) == 3 and len(set(checks["losses_sharded"])) == 3
        assert checks["losses_sharded"] == pytest.approx(checks["losses_replicated"], abs=1e-6)
