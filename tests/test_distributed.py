"""hf_compress.distributed: unwrap the DDP wrappers held by trainers and end the process group, explicitly or at exit.

The last test launches an unmodified two-process script (no cleanup call) ten times; set
`HF_COMPRESS_EXIT_LAUNCHES` to launch it fewer or more times.
"""

import atexit
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

import hf_compress.distributed
from hf_compress import DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig
from hf_compress.distributed import register_auto_shutdown, shutdown_distributed, shutdown_live_trainers
from tests.conftest import accelerate_launch, free_port
from tests.tiny_models import tiny_model


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


def test_auto_shutdown_registers_one_atexit_hook(monkeypatch):
    hooks = []
    monkeypatch.setattr(hf_compress.distributed, "_registered", False)
    monkeypatch.setattr(atexit, "register", hooks.append)
    register_auto_shutdown()
    register_auto_shutdown()
    assert hooks == [shutdown_live_trainers]


def test_creating_a_trainer_or_callback_registers_the_hook(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(hf_compress.distributed, "_registered", False)
    monkeypatch.setattr(atexit, "register", calls.append)
    PruningCallback(PruningConfig(target="heads"))
    args = DistillationConfig(str(tmp_path), report_to="none", use_cpu=True)
    DistillationTrainer(model=tiny_model("bert", "seq_cls"), teacher_model=tiny_model("bert", "seq_cls"), args=args)
    assert calls == [shutdown_live_trainers]


def test_exit_hook_unwraps_every_live_trainer_and_ends_the_group(tmp_path):
    shutdown_live_trainers()  # no process group: a no-op
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        inner = torch.nn.Linear(2, 2)
        trainer = Trainer.__new__(Trainer)  # a live Trainer holding a DDP wrapper, as at the end of a script
        trainer.model, trainer.model_wrapped = inner, DistributedDataParallel(inner)
        shutdown_live_trainers()
        assert not dist.is_initialized() and trainer.model_wrapped is inner
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


LAUNCHES = int(os.environ.get("HF_COMPRESS_EXIT_LAUNCHES", "10"))


def test_an_unmodified_two_process_script_exits_cleanly_every_time(tmp_path):
    """tests/scripts/exit_script.py never calls shutdown_distributed; each of the launches must exit with 0."""
    for launch in range(LAUNCHES):
        out = tmp_path / f"run{launch}"
        result = accelerate_launch(["tests/scripts/exit_script.py", str(out)], timeout=180)  # asserts status 0
        assert (out / "model.safetensors").is_file(), result.stderr[-2000:]
        assert "terminate called" not in result.stderr
