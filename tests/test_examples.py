"""examples/run_glue.py runs as a script: plain fine-tuning, then distillation + pruning from that teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_compress.loading import from_pretrained
from hf_compress.models.families import head_counts
from tests.conftest import write_tsv
from tests.tiny_models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "run_glue.py"
COMMON = [
    "--do_train",
    "--do_eval",
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "8",
    "--use_cpu",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--max_seq_length",
    "16",
    "--disable_tqdm",
    "true",
]


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_run_glue_plain_then_distill_and_prune(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("bert", "base").save_pretrained(model_dir)  # a base encoder: the script adds the classifier
    tiny_tokenizer().save_pretrained(model_dir)
    tsv = write_tsv(tmp_path / "train.tsv", rows=32)
    data = ["--train_file", str(tsv), "--validation_file", str(tsv)]

    teacher = tmp_path / "teacher"
    run_script("--model_name_or_path", str(model_dir), *data, *COMMON, "--output_dir", str(teacher))
    metrics = json.loads((teacher / "eval_results.json").read_text())
    assert (metrics["eval_accuracy"] * 32) == pytest.approx(round(metrics["eval_accuracy"] * 32), abs=1e-6)
    assert metrics["eval_samples"] == 32
    assert from_pretrained(teacher).config.num_labels == 2

    student = tmp_path / "student"
    run_script(
        "--model_name_or_path",
        str(model_dir),
        "--teacher_name_or_path",
        str(teacher),
        *data,
        *COMMON,
        "--output_dir",
        str(student),
        "--temperature",
        "2.0",
        "--alpha",
        "0.7",
        "--prune_heads",
        "0.5",
        "--pruning_schedule",
        "one_shot",
    )
    train = json.loads((student / "train_results.json").read_text())
    assert train["sparsity/heads"] == 0.5  # the PruningCallback ran inside the DistillationTrainer
    pruned = from_pretrained(student)
    assert [head_counts(pruned, i)[0] for i in range(4)] != [4, 4, 4, 4]  # saved physically smaller
    assert sum(head_counts(pruned, i)[0] for i in range(4)) == 8
    assert "eval_accuracy" in json.loads((student / "eval_results.json").read_text())
