"""Fixtures and small offline helpers shared by the tests (the tiny models themselves: ``tests/tiny_models.py``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainingArguments

from hf_compress.models.families import block_module, get_family, head_counts, head_dim, kv_heads_for
from tests.tiny_models import EVERY_FAMILY, FAMILIES, VISION, VOCAB, family_inputs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = Path(__file__).resolve().parents[1]
collect_ignore_glob = ["scripts/*", "export/js/*"]  # launched as scripts, never imported by pytest


def accelerate_launch(args: list[str], num_processes: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``args`` (a script and its arguments, or ``-m module ...``) on CPU processes.

    With several processes, ``--multi_gpu`` starts torchrun and ``ACCELERATE_USE_CPU`` makes the ranks use CPU + gloo,
    on a free port. Fails the test with the end of stderr unless the launch exits with status 0.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if num_processes > 1:
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]  # a clean exit of every process included
    return result


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def write_tsv(path: Path, rows: int = 30, quote: bool = True) -> Path:
    lines = ["sentence\tlabel"]
    for i in range(rows):
        words = " ".join(f"w{(i + j) % 50}" for j in range(3 + i % 7))
        if quote and i == 0:
            words = '" w1 w2'  # a stray quote, as in SST-2 phrases
        lines.append(f"{words}\t{i % 2}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(folder: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def zero_slices(slices):
    with torch.no_grad():
        for module, name, dim, index in slices:
            getattr(module, name).index_fill_(dim, index, 0.0)


def value_slices(model, layer, heads):
    """Only the value rows (and bias) of the KV heads serving ``heads``: the issue's definition of a pruned head."""
    family = get_family(model)
    dim = head_dim(model, layer)
    kv = kv_heads_for(model, layer, heads)
    index = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in kv])
    if family.qkv is not None:
        num_q, _ = head_counts(model, layer)
        module, index = block_module(model, layer, "qkv"), index + 2 * num_q * dim
        return [(module, "weight", 1, index), (module, "bias", 0, index)]
    module = block_module(model, layer, "v")
    out = [(module, "weight", 1 if family.conv1d else 0, index)]
    return out + ([(module, "bias", 0, index)] if module.bias is not None else [])


@pytest.fixture(params=EVERY_FAMILY)
def every_family(request) -> str:
    """Each supported family in turn (the per-family suite, tests/models/test_every_family.py)."""
    return request.param


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random sequences whose ``labels`` are their token ids (causal / masked / seq2seq LM) for ``family``."""

    def __init__(self, n: int = 16, seq: int = 8, family: str = "llama"):
        self.inputs = family_inputs(family, batch=n, seq=seq, seed=0)
        self.labels = self.inputs.pop("decoder_input_ids", None)
        if self.labels is None:
            self.labels = self.inputs["input_ids"] if family not in VISION else torch.arange(n) % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.inputs.items()}, "labels": self.labels[i]}


class RandomTokenDataset(torch.utils.data.Dataset):
    """Fixed random sequences; ``labels`` are token ids (causal LM) or classes (sequence classification)."""

    def __init__(self, n: int = 16, seq: int = 8, classes: bool = False):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, seq), generator=g)
        self.classes = classes

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i, 0] % 3 if self.classes else self.ids[i]
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def train_args(tmp_path, max_steps=6, args_class=TrainingArguments, **kwargs):
    """Small CPU `TrainingArguments` (or ``args_class``) for callback tests: no saving, no reporting, a log a step."""
    defaults = dict(
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return args_class(str(tmp_path), max_steps=max_steps, **{**defaults, **kwargs})
