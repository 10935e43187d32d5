"""``bench/bench_heads_taylor.py --size tiny`` runs end to end on a tiny BERT teacher and writes the expected JSON.

The teacher is a randomly initialised 4-layer, 4-head BERT classifier saved with the local word-level tokenizer; the
data is one 40-row tsv used as train and dev. No timing or accuracy-level assertions: the checks follow from shapes,
row counts and arithmetic on the recorded values.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
LAYERS, HEADS = 4, 4  # tests.conftest.tiny_config("bert")


def write_tsv(path: Path, rows: int = 40) -> Path:
    rng = random.Random(0)
    lines = ["sentence\tlabel"]
    for i in range(rows):
        words = " ".join(f"w{rng.randrange(59)}" for _ in range(rng.randrange(3, 12)))
        lines.append(f"{words}\t{i % 2}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("heads")
    teacher = tmp / "teacher"
    tiny_model("bert", "seq_cls", num_labels=2).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    data = write_tsv(tmp / "sst2.tsv")
    output = tmp / "heads_taylor.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        str(REPO / "bench" / "bench_heads_taylor.py"),
        "--size",
        "tiny",
        "--threads",
        "1",
        "--teacher",
        str(teacher),
        "--train",
        str(data),
        "--eval",
        str(data),
        "--output",
        str(output),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {output}" in done.stdout and "retention %" in done.stdout
    return json.loads(output.read_text()), teacher


@pytest.mark.slow
def test_heads_taylor_tiny(result):
    payload, teacher = result
    assert payload["benchmark"] == "heads_taylor" and payload["size"] == "tiny"
    machine = payload["machine"]
    assert "--size tiny" in machine["command"] and machine["threads"] == 1
    for key in ("torch", "transformers", "cpu", "load_average_1m", "load_average_1m_end"):
        assert key in machine
    config = payload["config"]
    assert config["calib_batches"] == 2 and config["recovery_steps"] == 3 and config["scope"] == "per_layer"
    assert config["eval_sentences"] == 32 and config["teacher"] == str(teacher)
    assert config["distillation"]["alpha"] == 0.7 and config["distillation"]["temperature"] == 4.0

    # per layer, the removed heads are exactly the lowest half of the recorded Taylor scores
    assert sorted(payload["removed_heads"]) == [str(i) for i in range(LAYERS)]
    for layer, removed in payload["removed_heads"].items():
        scores = payload["head_scores"][layer]
        assert len(scores) == HEADS and len(removed) == HEADS // 2 and all(s >= 0 for s in scores)
        kept = [scores[h] for h in range(HEADS) if h not in removed]
        assert max(scores[h] for h in removed) <= min(kept)

    rows = payload["rows"]
    assert list(rows) == ["teacher", "pruned", "recovered"]
    assert rows["teacher"]["heads_per_layer"] == [HEADS] * LAYERS and rows["teacher"]["retention_pct"] == 100
    for stage in ("pruned", "recovered"):
        assert rows[stage]["heads_per_layer"] == [HEADS // 2] * LAYERS and rows[stage]["heads"] == LAYERS * 2
        assert rows[stage]["params"] < rows["teacher"]["params"]
    for stage, row in rows.items():
        assert 0 <= row["accuracy"] <= 1 and (row["accuracy"] * 32).is_integer(), stage
        assert math.isclose(row["retention_pct"], 100 * row["accuracy"] / rows["teacher"]["accuracy"])
        for batch in ("b1", "b32"):
            stats = row["latency_ms"][batch]
            assert 0 < stats["min"] <= stats["median"] <= stats["max"] and stats["n"] > 0
            expected = rows["teacher"]["latency_ms"][batch]["median"] / stats["median"]
            assert math.isclose(row[f"speedup_{batch}"], expected)
    assert payload["reload"]["identical"] is True and payload["reload"]["max_abs_diff"] == 0.0
    assert payload["timings_s"]["recovery_s"] > 0
