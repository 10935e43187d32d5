"""hf_compress.distributed.shutdown_distributed: unwraps DDP wrappers held by trainers and ends the process group."""

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hf_compress.distributed import shutdown_distributed
from tests.conftest import free_port


def test_noop_without_a_process_group():
    trainer = SimpleNamespace(model=torch.nn.Linear(2, 2))
    shutdown_distributed(trainer)
    assert not dist.is_initialized()


def test_unwraps_trainers_and_destroys_the_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        inner = torch.nn.Linear(2, 2)
        trainer = SimpleNamespace(model=inner, model_wrapped=DistributedDataParallel(inner), other=3)
        trainer.model_wrapped(torch.ones(1, 2)).sum().backward()
        shutdown_distributed(trainer)
        assert not dist.is_initialized()
        assert trainer.model_wrapped is inner and trainer.other == 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
