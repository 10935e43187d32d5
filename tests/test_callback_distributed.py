"""Two CPU processes (gloo) under `accelerate launch`: every rank must end up with identical pruning masks."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "prune_script.py")


@pytest.mark.slow
def test_masks_are_identical_on_every_rank(tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               SCRIPT, "--output_dir", str(tmp_path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ROOT}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
    assert len(set(ranks[0]["fingerprints"])) > 2  # masks changed over several pruning steps
    assert ranks[0]["removed"] == ranks[1]["removed"]
    assert sum(len(v) for v in ranks[0]["removed"]["heads"].values()) == 8
