"""bench_embeddings.py runs end to end at ``--size tiny`` and writes JSON with consistent rows.

The packaged all-MiniLM-L6-v2 is compressed on 32 MRPC train pairs (4 distillation steps) and evaluated on 16 test
pairs. No timing or quality assertions: the checks follow from shapes, sizes and arithmetic on the recorded values.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_embeddings_tiny(tmp_path):
    output = tmp_path / "embeddings.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),  # this checkout's hf_compress, whatever the editable install points to
    }
    command = [sys.executable, str(REPO / "bench" / "bench_embeddings.py"), "--size", "tiny", "--threads", "1"]
    result = subprocess.run(
        [*command, "--output", str(output)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output}" in result.stdout
    payload = json.loads(output.read_text())
    assert payload["benchmark"] == "embeddings" and payload["size"] == "tiny"
    assert "--size tiny" in payload["machine"]["command"] and payload["machine"]["threads"] == 1
    config, rows = payload["config"], payload["rows"]
    assert config["eval_pairs"] == 16 and config["steps"] == 4
    assert list(rows) == ["original", "vocab", "compressed", "compressed-int8"]
    original = rows["original"]
    assert original["structure"] == {
        "layers": 6,
        "heads_per_layer": [12] * 6,
        "ffn_per_layer": [1536] * 6,
        "vocab": 30522,
    }
    kept = payload["vocabulary"]["kept"]
    assert rows["vocab"]["structure"] == {**original["structure"], "vocab": kept} and kept < 30522
    for name in ("compressed", "compressed-int8"):  # 3 of 6 blocks, half the heads and neurons of each
        assert rows[name]["structure"] == {
            "layers": 3,
            "heads_per_layer": [6] * 3,
            "ffn_per_layer": [768] * 3,
            "vocab": kept,
        }
    assert payload["training"]["removed"] == {"heads": 3 * 6, "ffn_neurons": 3 * 768}
    assert rows["compressed-int8"]["params"] == rows["compressed"]["params"] < rows["vocab"]["params"]
    assert rows["compressed-int8"]["weights_bytes"] < rows["compressed"]["weights_bytes"] / 3
    for name, row in rows.items():
        assert 0 <= row["cosine_accuracy"] <= 1 and (row["cosine_accuracy"] * 16).is_integer(), name
        assert 0 < row["cosine_ap"] <= 1
        assert math.isclose(row["retention_ap_pct"], 100 * row["cosine_ap"] / original["cosine_ap"])
        assert math.isclose(row["size_x"], original["weights_bytes"] / row["weights_bytes"])
        assert math.isclose(row["speed_x"], row["sentences_per_s"] / original["sentences_per_s"])
        assert row["folder_bytes"] > row["weights_bytes"] > 0
    assert "| compressed-int8 |" in result.stdout
