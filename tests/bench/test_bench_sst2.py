"""The SST-2 comparison benches run end to end at ``--size tiny`` and write JSON with the expected keys and values.

Each script runs in a subprocess on 256 training rows and 64 GLUE dev sentences with the packaged all-MiniLM-L6-v2;
the first one fine-tunes a 6-step teacher into a temporary folder and the others reuse it. No timing assertions: the
checks follow from shapes, sparsities, file contents and arithmetic on the recorded medians.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_STEPS, TINY_EVAL = 4, 64  # bench_sst2.SIZES["tiny"]
HEADS, FFN = 6 * 12, 6 * 1536  # all-MiniLM-L6-v2


def run_bench(script: str, output: Path, teacher: Path, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(REPO / "bench" / script),
        "--size",
        "tiny",
        "--threads",
        "1",
        "--teacher",
        str(teacher),
        "--output",
        str(output),
        *args,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output}" in result.stdout
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("teacher") / "minilm-sst2"


@pytest.fixture(scope="module")
def sst2(tmp_path_factory, teacher) -> dict:
    return run_bench("bench_sst2.py", tmp_path_factory.mktemp("bench") / "sst2.json", teacher)


@pytest.fixture(scope="module")
def torch_pruning(tmp_path_factory, teacher) -> dict:
    if importlib.util.find_spec("torch_pruning") is None:
        pytest.fail("torch-pruning is not installed; run `pip install --no-deps torch-pruning`.")
    return run_bench("bench_torch_pruning.py", tmp_path_factory.mktemp("bench") / "tp.json", teacher)


@pytest.fixture(scope="module")
def unstructured(tmp_path_factory, teacher) -> dict:
    return run_bench("bench_unstructured.py", tmp_path_factory.mktemp("bench") / "unstructured.json", teacher)


def check_machine(payload: dict, name: str) -> None:
    assert payload["benchmark"] == name and payload["size"] == "tiny"
    machine = payload["machine"]
    assert "--size tiny" in machine["command"] and machine["threads"] == 1
    for key in ("torch", "transformers", "cpu", "load_average_1m", "load_average_1m_end"):
        assert key in machine


def check_latency(row: dict) -> None:
    for batch in ("b1", "b32"):
        stats = row["latency_ms"][batch]
        assert 0 < stats["min"] <= stats["median"] <= stats["max"] and stats["n"] > 0


@pytest.mark.slow
def test_sst2(sst2, teacher):
    check_machine(sst2, "sst2")
    assert (teacher / "config.json").is_file()  # an explicit --teacher folder is where a fine-tuned teacher goes
    assert sst2["config"]["eval_sentences"] == TINY_EVAL and sst2["config"]["ratios"] == [0.3, 0.5, 0.7]
    rows = sst2["rows"]
    pruned = [f"pruned-{r}-{kind}" for r in (30, 50, 70) for kind in ("distilled", "oneshot")]
    assert list(rows) == [
        "teacher",
        "student-3L-distilled",
        "student-3L-labels",
        *pruned,
        f"{sst2['int8_source']}-int8",
    ]
    assert sst2["int8_source"] in {f"pruned-{r}-distilled" for r in (30, 50, 70)}
    reference = rows["teacher"]
    assert reference["retention_pct"] == 100 and reference["size_x"] == 1 and reference["speed_x_b32"] == 1
    for name, row in rows.items():
        check_latency(row)
        assert 0 <= row["accuracy"] <= 1 and (row["accuracy"] * TINY_EVAL).is_integer(), name
        assert math.isclose(row["retention_pct"], 100 * row["accuracy"] / reference["accuracy"])
        assert math.isclose(row["size_x"], reference["disk_bytes"] / row["disk_bytes"])
        for batch in ("b1", "b32"):
            expected = reference["latency_ms"][batch]["median"] / row["latency_ms"][batch]["median"]
            assert math.isclose(row[f"speed_x_{batch}"], expected)
        if name != "teacher":
            assert row["params"] < reference["params"] and row["disk_bytes"] < reference["disk_bytes"], name
    assert rows["student-3L-distilled"]["params"] == rows["student-3L-labels"]["params"]
    assert rows["student-3L-distilled"]["teacher_layers"] == [0, 2, 5]
    for name in ("student-3L-distilled", "student-3L-labels"):
        assert rows[name]["train_steps"] == TINY_STEPS
    for ratio in (30, 50, 70):
        distilled, oneshot = rows[f"pruned-{ratio}-distilled"], rows[f"pruned-{ratio}-oneshot"]
        assert distilled["train_steps"] == TINY_STEPS and oneshot["train_steps"] == 0
        assert distilled["params"] == oneshot["params"] and distilled["removed"] == oneshot["removed"]
        assert abs(distilled["removed"]["heads"] / HEADS - ratio / 100) <= 1 / HEADS
        assert abs(distilled["removed"]["ffn_neurons"] / FFN - ratio / 100) <= 1 / FFN
    assert (
        rows["pruned-30-distilled"]["params"]
        > rows["pruned-50-distilled"]["params"]
        > rows["pruned-70-distilled"]["params"]
    )
    int8, source = rows[f"{sst2['int8_source']}-int8"], rows[sst2["int8_source"]]
    assert int8["params"] == source["params"] and int8["disk_bytes"] < source["disk_bytes"] / 3


@pytest.mark.slow
def test_torch_pruning(torch_pruning):
    check_machine(torch_pruning, "torch_pruning")
    assert torch_pruning["torch_pruning_version"] and torch_pruning["ratio"] == 0.5
    assert torch_pruning["recovery_steps"] == TINY_STEPS and torch_pruning["pruned_logits_max_abs_diff"] >= 0
    rows = torch_pruning["rows"]
    assert list(rows) == ["teacher", "hf_compress", "torch_pruning"]
    assert rows["teacher"]["structure"]["heads_per_layer"] == [12] * 6
    for name in ("hf_compress", "torch_pruning"):
        row = rows[name]
        check_latency(row)
        # both keep whole heads of width 32 and the hidden width: the same shapes, the same parameter count
        assert row["structure"]["heads_per_layer"] == [6] * 6 and row["structure"]["head_dim"] == 32
        assert row["structure"]["ffn_per_layer"] == [768] * 6
        assert row["structure"]["params"] == rows["hf_compress"]["structure"]["params"]
        assert row["structure"]["params"] < rows["teacher"]["structure"]["params"]
        assert 0 <= row["accuracy_pruned"] <= 1 and 0 <= row["accuracy"] <= 1 and row["train_s"] > 0
        reload = row["reload"]
        # fewer heads at an unchanged hidden size: BERT's config cannot describe the shapes
        assert reload["tensors_mismatching_config"] > 0 and reload["example_mismatch"]
        assert reload["plain_from_pretrained"]["ok"] is False and reload["plain_from_pretrained"]["error"]
        assert reload["plain_ignore_mismatched_sizes"]["identical"] is False
        ours = reload["hf_compress_from_pretrained"]
        assert ours["needs_loader"] and ours["identical"] and ours["max_abs_diff"] == 0.0
    # BERT's config keeps 12 heads in both: hf_compress records the per-layer shapes beside it, Torch-Pruning nothing
    assert rows["torch_pruning"]["reload"]["config_heads"] == rows["hf_compress"]["reload"]["config_heads"] == 12


@pytest.mark.slow
def test_unstructured(unstructured):
    check_machine(unstructured, "unstructured")
    rows = unstructured["rows"]
    assert list(rows) == ["dense", "hf_compress-0.5", "torch_prune-0.5", "hf_compress-0.8", "torch_prune-0.8"]
    dense = rows["dense"]
    assert dense["step_ratio_vs_dense"] == 1.0 and dense["sparsity_after"] == 0.0
    dense_saved = dense["saved"]["as_trained"]
    for name, row in rows.items():
        check_latency(row)
        assert 0 <= row["accuracy"] <= 1 and row["step_s"]["n"] == TINY_STEPS - 2
        assert math.isclose(row["step_ratio_vs_dense"], row["step_s"]["median"] / dense["step_s"]["median"])
        target = row["target_sparsity"]
        # the masks hold through the fine-tune in both methods
        assert math.isclose(row["sparsity_before"], target, abs_tol=1e-6), name
        assert math.isclose(row["sparsity_after"], target, abs_tol=1e-6), name
        final = row["saved"].get("after_prune_remove", row["saved"]["as_trained"])
        assert not final["has_weight_orig_and_mask"] and final["reload"]["missing_weights"] == 0
        assert math.isclose(final["reload"]["sparsity"], target, abs_tol=1e-6), name
        assert abs(final["disk_bytes"] - dense_saved["disk_bytes"]) < 4096  # dense storage: no smaller
        if target:
            assert final["zlib_weights_bytes"] < dense_saved["zlib_weights_bytes"]
    for sparsity in ("0.5", "0.8"):
        ours, theirs = rows[f"hf_compress-{sparsity}"], rows[f"torch_prune-{sparsity}"]
        assert theirs["same_mask_as_ours"] is True and ours["accuracy_oneshot"] == theirs["accuracy_oneshot"]
        kept = theirs["saved"]["as_trained"]  # saved with the re-parametrisation in place
        assert kept["has_weight_orig_and_mask"] and kept["disk_bytes"] > dense_saved["disk_bytes"]
        assert kept["reload"]["missing_weights"] > 0 and kept["reload"]["sparsity"] == 0.0


def test_cached_teacher(tmp_path_factory, teacher):
    result = run_bench("bench_cached_teacher.py", tmp_path_factory.mktemp("bench") / "cached.json", teacher)
    check_machine(result, "cached_teacher")
    assert result["rows"] == TINY_STEPS * 8  # steps x batch: the cache covers exactly the rows trained on
    assert (result["live"]["mode"], result["cached"]["mode"]) == ("live", "cached")
    assert len(result["live"]["losses"]) == len(result["cached"]["losses"]) == TINY_STEPS
    assert result["max_loss_curve_diff"] < 1e-4  # same batches, same teacher logits: the same training
    assert result["accuracy_diff_points"] == pytest.approx(
        100 * (result["cached"]["accuracy"] - result["live"]["accuracy"])
    )
    assert result["cache_plus_cached_over_live"] == pytest.approx(
        (result["cache_s"] + result["cached"]["train_s"]) / result["live"]["train_s"]
    )
