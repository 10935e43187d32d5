"""End a multi-process (``accelerate launch``) run cleanly.

A ``DistributedDataParallel`` wrapper keeps the process group alive after ``destroy_process_group()``. If Python
then exits with that wrapper still referenced (a finished ``Trainer`` holds it), gloo's worker threads are torn down
during interpreter shutdown and the process can abort with ``terminate called without an active exception`` —
the run's work is done and saved, but the exit status is non-zero. :func:`shutdown_distributed` unwraps the
trainers, frees the wrappers and destroys the group while Python is still fully alive.

Scripts need not call it: creating a `DistillationTrainer` or a `PruningCallback` calls
:func:`register_auto_shutdown`, which registers an ``atexit`` hook (run before interpreter teardown, while Python is
fully alive) that does the same for every live `Trainer`. The explicit call stays available, e.g. to end the group
early; the hook is then a no-op.
"""

from __future__ import annotations

import atexit
import gc
from typing import Any

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

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
