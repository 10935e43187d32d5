"""``bench/bench_deploy.py --size tiny`` builds its own tiny run, exports, evaluates and times every row, in seconds.

No timing assertions: the checks follow from the row set, file sizes, accuracies on the same sentences and the
arithmetic of the ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason='needs the ONNX extra: pip install "hf-compress[onnx]"')

REPO = Path(__file__).resolve().parents[2]
ROWS = ["teacher", "teacher-onnx", "teacher-onnx-int8", "teacher-onnx-int8-per-channel", "pruned", "pruned-onnx",
        "pruned-onnx-int8", "pruned-onnx-int8-emb4", "int8"]  # fmt: skip


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "bench" / "bench_deploy.py"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_deploy_bench(tmp_path):
    output = tmp_path / "deploy.json"
    result = run_bench("--size", "tiny", "--threads", "1", "--per-channel", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output}" in result.stdout
    payload = json.loads(output.read_text())

    rows = payload["rows"]
    assert list(rows) == ROWS
    assert [rows[name]["runtime"] for name in ROWS] == ["pytorch", *["onnxruntime"] * 3, "pytorch"] + [
        "onnxruntime"
    ] * 3 + ["pytorch"]
    # the reference teacher graph keeps ONNX Runtime's default (per-tensor) scales; per-channel stores more of them
    assert rows["teacher-onnx-int8-per-channel"]["weight_bytes"] > rows["teacher-onnx-int8"]["weight_bytes"]
    assert payload["per_channel"] is True
    # the float graphs compute what PyTorch computes: same predictions on the same 64 sentences
    assert rows["teacher-onnx"]["accuracy"] == rows["teacher"]["accuracy"]
    assert rows["pruned-onnx"]["accuracy"] == rows["pruned"]["accuracy"]
    assert rows["teacher-onnx-int8"]["weight_bytes"] < 0.5 * rows["teacher-onnx"]["weight_bytes"]
    assert rows["pruned-onnx"]["weight_bytes"] < 0.5 * rows["teacher-onnx"]["weight_bytes"]  # vocabulary + heads
    assert payload["exports"]["pruned"]["max_abs_diff"] < 1e-4
    # the 4-bit word-embedding table: a smaller int8 graph (the table is most of a vocabulary-pruned tiny model)
    assert rows["pruned-onnx-int8-emb4"]["weight_bytes"] < 0.9 * rows["pruned-onnx-int8"]["weight_bytes"]

    teacher, onnx_int8 = rows["teacher"], rows["teacher-onnx-int8"]
    assert payload["timing"] == "workers"  # every row timed in its own process: 1 round of 3 / 2 timed calls
    for row in rows.values():
        assert set(row["latency_ms"]) == {"b1", "b32"}
        assert (row["latency_ms"]["b1"]["n"], row["latency_ms"]["b32"]["n"]) == (3, 2)
        ratios = row["vs_teacher"]
        assert ratios["size_x"] == pytest.approx(teacher["weight_bytes"] / row["weight_bytes"])
        b32 = teacher["latency_ms"]["b32"]["median"] / row["latency_ms"]["b32"]["median"]
        assert ratios["speed_x_b32"] == pytest.approx(b32)
        assert row["vs_onnx_int8_teacher"]["size_x"] == pytest.approx(onnx_int8["weight_bytes"] / row["weight_bytes"])
    assert rows["teacher"]["vs_teacher"]["retention_pct"] == pytest.approx(100.0)
    assert "| pruned-onnx-int8 | onnxruntime |" in result.stdout


def test_run_folder_must_be_a_finished_run(tmp_path):
    result = run_bench("--run", str(tmp_path), "--output", str(tmp_path / "x.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "`--run` must be a recipe run folder with a recipe.yaml" in result.stderr
    assert run_bench().returncode == 2  # --run is required outside --size tiny


def test_latency_workers_time_each_model_in_its_own_process(tmp_path):
    """``common.time_ms_in_workers``: rounds x repeats timings per batch size, and a worker that fails is reported."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from common import time_ms_in_workers
    finally:
        sys.path.remove(str(REPO / "bench"))
    import numpy as np
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertForSequenceClassification(config).save_pretrained(tmp_path / "model")
    ids = torch.randint(1, 50, (4, 8)).numpy()
    np.savez(tmp_path / "inputs.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    spec = {"runtime": "pytorch", "path": str(tmp_path / "model"), "inputs": str(tmp_path / "inputs.npz")}
    stats = time_ms_in_workers({"a": spec, "b": spec}, {"b1": (1, 3), "b4": (4, 2)}, threads=1, rounds=2, pause_s=0)
    assert set(stats) == {"a", "b"}
    for by_batch in stats.values():
        assert (by_batch["b1"]["n"], by_batch["b4"]["n"]) == (6, 4)
        assert 0 < by_batch["b1"]["min"] <= by_batch["b1"]["median"] <= by_batch["b1"]["max"]

    with pytest.raises(RuntimeError, match="the latency worker of 'bad' failed to start"):
        time_ms_in_workers({"bad": {**spec, "runtime": "tensorflow"}}, {"b1": (1, 1)}, threads=1)
    with pytest.raises(ValueError, match="`rounds`"):
        time_ms_in_workers({"a": spec}, {"b1": (1, 1)}, threads=1, rounds=0)
