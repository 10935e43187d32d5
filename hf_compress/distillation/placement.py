"""Where [`DistillationTrainer`]'s teacher lives under each distribution plan of the accelerator.

Plain functions, so that the trainer only calls them: [`distribution_of`] reads the plan from the accelerator,
[`teacher_placement`] decides (a pure function of that plan and `DistillationConfig.teacher_sharding`), and
[`prepare_teacher`] applies the decision:

- `"device"`: no sharding plan (one process, DDP, ZeRO-1/2): a full frozen copy on each process's device;
- `"replicated"`: the student is sharded but `teacher_sharding="replicate"` asks for a full teacher copy per rank;
- `"fsdp2"`: accelerate's FSDP2 (`fsdp_version=2`) shards the student; the teacher is sharded with `fully_shard` on
  the accelerator's device mesh ([`~hf_compress.distributed.shard_teacher`]);
- `"zero3"`: DeepSpeed ZeRO-3 shards the student; the teacher becomes a DeepSpeed inference engine whose config is
  the accelerator's ZeRO-3 config without the training blocks ([`zero3_inference_config`]), the way TRL prepares
  its reference models.

The last two are refused unless `HF_COMPRESS_ALLOW_UNVERIFIED_SHARDING=1` (see [`ALLOW_UNVERIFIED`]): they need a GPU,
and `bench/verify_sharded_gpu.py` is the check that has to pass on one first. What runs on CPU is tested: the decision,
and the FSDP2 teacher under raw `torchrun` with gloo (same logits as the unsharded teacher, half the bytes per rank).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

from accelerate.utils import DistributedType
from torch import nn

from hf_compress.distributed import shard_teacher

__all__ = [
    "ALLOW_UNVERIFIED",
    "PLACEMENTS",
    "distribution_of",
    "placement_for",
    "prepare_teacher",
    "teacher_placement",
    "unverified_sharding_allowed",
    "zero3_inference_config",
]

TeacherSharding = Literal["auto", "replicate"]
Placement = Literal["device", "replicated", "fsdp2", "zero3"]
PLACEMENTS = ("device", "replicated", "fsdp2", "zero3")

ALLOW_UNVERIFIED = "HF_COMPRESS_ALLOW_UNVERIFIED_SHARDING"
"""Environment variable that opts in to the teacher sharding paths not yet verified on a GPU (`"1"` to allow)."""

# ZeRO-3 buckets sized from the teacher's width when the config leaves them to the Trainer ("auto").
_ZERO3_BUCKETS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_param_persistence_threshold": lambda h: 10 * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
}


def unverified_sharding_allowed() -> bool:
    """Whether [`ALLOW_UNVERIFIED`] is set to `"1"` in the environment."""
    return os.environ.get(ALLOW_UNVERIFIED, "") == "1"


def distribution_of(accelerator: Any) -> tuple[int | None, int | None]:
    """`(fsdp_version, zero_stage)` of `accelerator`'s plan: the FSDP version (1 or 2) when FSDP shards the student,
    the ZeRO stage when DeepSpeed runs it, `None` for each that does not apply."""
    kind = getattr(accelerator, "distributed_type", DistributedType.NO)
    state = getattr(accelerator, "state", None)
    if kind == DistributedType.FSDP:
        return int(getattr(state.fsdp_plugin, "fsdp_version", 1) or 1), None
    if kind == DistributedType.DEEPSPEED:
        plugin = state.deepspeed_plugin
        default = getattr(plugin, "zero_stage", None) or 0
        stage = (plugin.deepspeed_config or {}).get("zero_optimization", {}).get("stage", default)
        return None, int(stage)
    return None, None


def teacher_placement(
    sharding: str, fsdp_version: int | None, zero_stage: int | None, allow_unverified: bool
) -> Placement:
    """
    Where the teacher goes (one of `PLACEMENTS`, see the module docstring); raises when the plan cannot be honoured.

    Args:
        sharding (`str`): `DistillationConfig.teacher_sharding`, `"auto"` (shard the teacher like the student) or
            `"replicate"` (a full copy on every rank).
        fsdp_version (`int`, *optional*): The FSDP version sharding the student, if any.
        zero_stage (`int`, *optional*): The DeepSpeed ZeRO stage, if DeepSpeed runs the student.
        allow_unverified (`bool`): Whether the paths not verified on a GPU may run ([`unverified_sharding_allowed`]).

    >>> teacher_placement("auto", None, None, False), teacher_placement("replicate", 2, None, False)
    ('device', 'replicated')
    >>> teacher_placement("auto", 2, None, True), teacher_placement("auto", None, 3, True)
    ('fsdp2', 'zero3')
    """
    if sharding not in ("auto", "replicate"):
        raise ValueError(f"`teacher_sharding` must be one of ['auto', 'replicate'], got {sharding!r}.")
    sharded_student = fsdp_version is not None or (zero_stage is not None and zero_stage >= 3)
    if not sharded_student:
        return "device"
    if sharding == "replicate":
        return "replicated"
    if fsdp_version is not None and fsdp_version != 2:
        raise ValueError(
            f"`teacher_sharding`='auto' shards the teacher with FSDP2 only, got FSDP version {fsdp_version}; set "
            "`fsdp_config={'version': 2}` or `teacher_sharding='replicate'`."
        )
    placement: Placement = "fsdp2" if fsdp_version is not None else "zero3"
    if not allow_unverified:
        plan = "accelerate's FSDP2 (fully_shard on its mesh)" if placement == "fsdp2" else "DeepSpeed ZeRO-3"
        raise ValueError(
            f"Sharding the teacher under {plan} is unverified (bench/verify_sharded_gpu.py has not passed on a GPU), "
            f"got `teacher_sharding`='auto'; set {ALLOW_UNVERIFIED}=1 to opt in, or `teacher_sharding='replicate'` "
            "for a full teacher copy on every rank."
        )
    return placement


def placement_for(accelerator: Any, sharding: str) -> Placement:
    """[`teacher_placement`] for `accelerator`'s plan ([`distribution_of`]) and the environment's opt-in
    ([`unverified_sharding_allowed`])."""
    return teacher_placement(sharding, *distribution_of(accelerator), unverified_sharding_allowed())


def zero3_inference_config(config: dict[str, Any], hidden_size: int | None) -> dict[str, Any]:
    """
    The DeepSpeed config of a frozen teacher engine from the training run's ZeRO-3 `config` (not modified): no
    `optimizer`, `scheduler` or `offload_optimizer` block (no optimizer is built for it), and the stage-3 buckets
    the config leaves to the Trainer (`"auto"` or absent) sized from the teacher's `hidden_size`.

    >>> zero3_inference_config({"optimizer": {}, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, 8)
    {'zero_optimization': {'stage': 3, 'reduce_bucket_size': 64, 'stage3_param_persistence_threshold': 80, \
'stage3_prefetch_bucket_size': 57}}
    """
    zero = config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(
            f"`zero_optimization.stage` must be 3 to shard the teacher with ZeRO-3, got {zero.get('stage')!r}; use "
            "a ZeRO-3 DeepSpeed config or `teacher_sharding='replicate'`."
        )
    out = copy.deepcopy(config)
    out.pop("optimizer", None)
    out.pop("scheduler", None)
    out["zero_optimization"].pop("offload_optimizer", None)
    if hidden_size is not None:
        for key, size in _ZERO3_BUCKETS.items():
            if out["zero_optimization"].get(key, "auto") == "auto":
                out["zero_optimization"][key] = size(hidden_size)
    return out


def prepare_teacher(teacher: nn.Module, placement: Placement, accelerator: Any) -> nn.Module:
    """
    Apply `placement` to the frozen `teacher` (built by [`~hf_compress.distillation.teacher.build_teacher`]): as is
    for `"device"` / `"replicated"`, sharded with `fully_shard` on the accelerator's FSDP mesh for `"fsdp2"`, a
    DeepSpeed inference engine for `"zero3"`. Sharded teachers run a collective forward: every rank must call it.

    Args:
        teacher (`nn.Module`): The frozen teacher, on the CPU for the sharded placements (each rank moves only what
            it keeps to its device).
        placement (`str`): One of `PLACEMENTS` ([`teacher_placement`]).
        accelerator (`accelerate.Accelerator`): The trainer's accelerator (its mesh or DeepSpeed plugin).
    """
    if placement in ("device", "replicated"):
        return teacher
    if placement == "fsdp2":
        mesh = getattr(accelerator, "torch_device_mesh", None)
        parallelism = getattr(accelerator, "parallelism_config", None)
        if mesh is not None and parallelism is not None:  # the data-parallel shard dimensions, as for the student
            mesh = mesh[tuple(parallelism.fsdp_dim_names)]
        return shard_teacher(teacher, mesh)
    if placement == "zero3":
        # deepspeed is optional (ZeRO-3 runs only) and initialises CUDA state on import
        try:
            import deepspeed
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "Teacher placement 'zero3' needs the 'deepspeed' package, which is not installed; install it or set "
                "`teacher_sharding='replicate'`."
            ) from err
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
        engine, *_ = deepspeed.initialize(model=teacher, config=zero3_inference_config(config, hidden))
        engine.eval()
        return engine
    raise ValueError(f"`placement` must be one of {list(PLACEMENTS)}, got {placement!r}.")
