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
ROWS = ["teacher", "teacher-onnx", "teacher-onnx-int8", "pruned", "pruned-onnx", "pruned-onnx-int8",
        "pruned-onnx-int8-emb4", "int8"]  # fmt: skip


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "bench" / "bench_deploy.py"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_tiny_deploy_bench(tmp_path):
    output = tmp_path / "deploy.json"
    result = run_bench("--size", "tiny", "--threads", "1", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output}" in result.stdout
    payload = json.loads(output.read_text())

    rows = payload["rows"]
    assert list(rows) == ROWS
    assert [rows[name]["runtime"] for name in ROWS] == ["pytorch", *["onnxruntime"] * 2, "pytorch"] + [
        "onnxruntime"
    ] * 3 + ["pytorch"]
    # the float graphs compute what PyTorch computes: same predictions on the same 64 sentences
    assert rows["teacher-onnx"]["accuracy"] == rows["teacher"]["accuracy"]
    assert rows["pruned-onnx"]["accuracy"] == rows["pruned"]["accuracy"]
    assert rows["teacher-onnx-int8"]["weight_bytes"] < 0.5 * rows["teacher-onnx"]["weight_bytes"]
    assert rows["pruned-onnx"]["weight_bytes"] < 0.5 * rows["teacher-onnx"]["weight_bytes"]  # vocabulary + heads
    assert payload["exports"]["pruned"]["max_abs_diff"] < 1e-4
    # the 4-bit word-embedding table: a smaller int8 graph (the table is most of a vocabulary-pruned tiny model)
    assert rows["pruned-onnx-int8-emb4"]["weight_bytes"] < 0.9 * rows["pruned-onnx-int8"]["weight_bytes"]

    teacher, onnx_int8 = rows["teacher"], rows["teacher-onnx-int8"]
    for row in rows.values():
        assert set(row["latency_ms"]) == {"b1", "b32"}
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
