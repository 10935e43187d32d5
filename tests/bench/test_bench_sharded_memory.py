"""bench/bench_sharded_memory.py runs end to end on a tiny Llama: the table, the JSON, and the exact quantities.

No memory or timing assertions beyond the parameter bytes (RSS on a shared machine is not exact).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_run_halves_parameter_bytes_with_identical_logits(tmp_path):
    output = tmp_path / "sharded_memory.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "bench" / "bench_sharded_memory.py"), "--model", "tiny", "--seq", "16",
               "--repeats", "2", "--port", str(free_port()), "--output", str(output)]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "forward peak MB" in run.stdout and f"wrote {output}" in run.stdout
    result = json.loads(output.read_text())
    assert result["max_abs_logit_diff"] < 1e-6
    replicated, sharded = (result["layouts"][k]["ranks"] for k in ("replicated", "sharded"))
    assert len(replicated) == len(sharded) == 2
    assert all(r["param_bytes"] == replicated[0]["param_bytes"] for r in replicated)  # a full copy per rank
    assert all(r["param_bytes"] * 2 == replicated[0]["param_bytes"] for r in sharded)  # exactly half per rank
    assert result["sharded_over_replicated"]["param_bytes"] == pytest.approx(0.5)
    assert all(len(r["forward_s_all"]) == 2 for r in replicated + sharded)
