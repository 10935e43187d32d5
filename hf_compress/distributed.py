"""Multi-process helpers shared by distillation and pruning: a clean end of an ``accelerate launch`` run, and a frozen
model sharded with FSDP2.

Clean exit: a ``DistributedDataParallel`` wrapper keeps the process group alive after ``destroy_process_group()``.
If Python then exits with that wrapper still referenced (a finished ``Trainer`` holds it), gloo's worker threads are
torn down during interpreter shutdown and the process can abort with ``terminate called without an active
exception`` — the run's work is done and saved, but the exit status is non-zero. :func:`shutdown_distributed`
unwraps the trainers, frees the wrappers and destroys the group while Python is still fully alive.

Scripts need not call it: creating a `DistillationTrainer` or a `PruningCallback` calls
:func:`register_auto_shutdown`, which registers an ``atexit`` hook (run before interpreter teardown, while Python is
fully alive) that does the same for every live `Trainer`. The explicit call stays available, e.g. to end the group
early; the hook is then a no-op.

Sharded teacher: :func:`shard_teacher` shards a frozen model with ``fully_shard`` (one unit per transformer layer), for
`DistillationTrainer` under accelerate's FSDP2 and for the raw FSDP2 helpers of `hf_compress.pruning.sharded`.
"""

from __future__ import annotations

import atexit
import gc
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

from hf_compress.models.families import get_layers

_registered = False


def _unwrap(value: Any) -> Any:
    return value.module if isinstance(value, DistributedDataParallel) else value


def register_auto_shutdown() -> None:
    """Register (once per process) the ``atexit`` hook that ends a live process group cleanly; see the module doc."""
    global _registered
    if not _registered:
        atexit.register(shutdown_live_trainers)
        _registered = True


def shutdown_live_trainers() -> None:
    """:func:`shutdown_distributed` of every live `Trainer`; a no-op without a process group (the ``atexit`` hook)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    shutdown_distributed(*[obj for obj in gc.get_objects() if issubclass(type(obj), Trainer)])  # no __class__ lookups


def shutdown_distributed(*trainers: Any) -> None:
    """Release the DDP wrappers held by ``trainers`` and destroy the default process group; a no-op when none runs.

    Call it once at the end of a script run with ``accelerate launch`` (after the last ``train()``, ``evaluate()``
    and ``save_model()``); the trainers remain usable on one process afterwards.

    Example:

    ```python
    >>> from hf_compress.distributed import shutdown_distributed
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.save_model()  # doctest: +SKIP
    >>> shutdown_distributed(trainer)  # doctest: +SKIP
    ```
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for trainer in trainers:
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None:
            accelerator.free_memory()
        for name, value in list(vars(trainer).items()):
            unwrapped = _unwrap(value)
            if unwrapped is not value:
                setattr(trainer, name, unwrapped)
    gc.collect()  # trainers that went out of scope still hold their wrappers through reference cycles
    dist.destroy_process_group()


def shard_teacher(teacher: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Freeze `teacher` (eval mode, no gradients) and shard it with FSDP2: one unit per transformer layer plus the
    root, so a forward holds one gathered layer at a time and no rank keeps a full copy. A collective: call it on
    every rank of `mesh`, and run every teacher forward on every rank.

    A teacher on the CPU is moved to the mesh's device one unit at a time (each layer's full weights, then only its
    shard), so the device never holds the whole teacher.

    Args:
        teacher (`nn.Module`): The teacher (a model of `hf_compress.models.FAMILIES`), on the CPU or the mesh's device.
        mesh (`DeviceMesh`, *optional*): 1-D data-parallel mesh; defaults to FSDP2's (all ranks).
    """
    teacher.eval().requires_grad_(False)
    for layer in get_layers(teacher):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # Explicit for the root too: no backward follows a teacher forward, so nothing stays gathered after it.
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    return teacher


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds: the local shard of each `DTensor`, the whole of a plain tensor."""
    tensors = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in tensors)
