"""The bench scripts run end to end at ``--size tiny`` and write JSON with the expected keys and sane ratios.

No timing assertions: the ratios checked here follow from shapes (FLOPs, parameters, sparsity) or from arithmetic on
the measured medians, never from how fast this machine happens to be.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_STEPS, TRAIN_SKIP = 10, 3  # bench_pruning's tiny size


def run_bench(script: str, output: Path, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(REPO / "bench" / script),
        "--size",
        "tiny",
        "--threads",
        "1",
        "--output",
        str(output),
        *args,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Latency" in result.stdout and f"wrote {output}" in result.stdout
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def pruning(tmp_path_factory) -> dict:
    return run_bench("bench_pruning.py", tmp_path_factory.mktemp("bench") / "pruning.json")


@pytest.mark.slow
def test_pruning_machine_block(pruning):
    assert pruning["benchmark"] == "pruning" and pruning["size"] == "tiny"
    machine = pruning["machine"]
    assert "--size tiny" in machine["command"] and machine["threads"] == 1
    for key in ("torch", "transformers", "cpu", "logical_cpus", "load_average_1m", "load_average_1m_end"):
        assert key in machine


@pytest.mark.slow
@pytest.mark.parametrize("name, head_sparsity, plain", [("bert", 0.5, False), ("llama", 1 / 3, True)])
def test_pruning_latency_block(pruning, name, head_sparsity, plain):
    result = pruning["latency"][name]
    # 6 query heads / 3 KV heads in the tiny Llama: half of 3 groups rounds (ties down) to 1 group.
    assert math.isclose(result["achieved"]["head_sparsity"], head_sparsity)
    assert math.isclose(result["achieved"]["kv_head_sparsity"], head_sparsity)
    assert result["achieved"]["ffn_sparsity"] == 0.5
    assert 0 < result["params"]["ratio"] < 1 and result["params"]["pruned"] < result["params"]["dense"]
    assert result["bytes"]["pruned_memory"] < result["bytes"]["dense_memory"]
    assert result["bytes"]["pruned_disk"] < result["bytes"]["dense_disk"]
    assert result["reload"]["identical"] and result["reload"]["max_abs_diff"] == 0.0
    assert result["reload"]["plain_from_pretrained_possible"] is plain
    assert math.isclose(result["flop_counter_check"]["ratio"], 1.0, rel_tol=1e-3)
    assert set(result["batches"]) == {"1x32", "4x32"}
    for batch in result["batches"].values():
        dense, pruned = batch["flops"]["dense"], batch["flops"]["pruned"]
        assert pruned["ffn"] * 2 == dense["ffn"] and pruned["head"] == dense["head"]
        assert math.isclose(pruned["attention_scores"], dense["attention_scores"] * (1 - head_sparsity))
        assert math.isclose(batch["flop_reduction"], dense["total"] / pruned["total"])
        assert 1 < batch["flop_reduction"] <= 2
        assert math.isclose(batch["speedup"], batch["dense_ms"]["median"] / batch["pruned_ms"]["median"])
        assert math.isclose(batch["speedup_per_flop_reduction"], batch["speedup"] / batch["flop_reduction"])
        assert batch["dense_ms"]["n"] == batch["pruned_ms"]["n"] > 0


@pytest.mark.slow
def test_pruning_training_block(pruning):
    training = pruning["training"]
    variants = training["variants"]
    assert list(variants) == [
        "no_callback",
        "pruning_callback_every_step",
        "pruning_callback_every_10_steps",
        "torch_prune_l1_unstructured",
        "torch_prune_ln_structured",
    ]
    assert variants["no_callback"]["ratio_vs_no_callback"] == 1.0
    timed = TRAIN_STEPS - 1 - TRAIN_SKIP
    for name, result in variants.items():
        assert result["step_s"]["n"] == timed and result["ratio_vs_no_callback"] > 0, name
    every_step = variants["pruning_callback_every_step"]
    assert every_step["hooks_s_pruning_steps"]["n"] == timed and every_step["hooks_s_mask_only_steps"] is None
    every_10 = variants["pruning_callback_every_10_steps"]
    assert every_10["hooks_s_mask_only_steps"]["n"] == timed  # pruning at steps 0 and 10 only: outside the window
    for result in (every_step, every_10):
        assert result["hooks_fraction_of_step"] > 0
        # the tiny BERT has 2 layers x 4 heads and 2 x 256 FFN neurons; the cubic schedule ends at 50%
        assert result["removed_at_end"] == {"heads": 4, "ffn_neurons": 256}
