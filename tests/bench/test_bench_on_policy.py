"""bench/bench_on_policy.py runs end to end at ``--size tiny`` and its ratios follow from its own medians.

No timing assertions (a tiny run on a shared machine says nothing about speed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_run_reports_the_floor_ratio(tmp_path):
    output = tmp_path / "on_policy.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "bench" / "bench_on_policy.py"), "--size", "tiny", "--threads", "1",
               "--output", str(output)]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "On-policy step time" in run.stdout and f"wrote {output}" in run.stdout
    result = json.loads(output.read_text())
    stats = result["step_s"]
    assert stats["on_policy"]["n"] == 2  # 4 steps, 1 warm-up, the last one untimed (see StepTimer)
    floor = sum(stats[k]["median"] for k in ("generate", "student_step", "teacher_forward"))
    assert result["floor_s"] == pytest.approx(floor)
    assert result["on_policy_over_floor"] == pytest.approx(stats["on_policy"]["median"] / floor)
    assert all(stats[k]["n"] == 3 for k in ("generate", "student_step", "teacher_forward"))
    cpu = result["step_cpu_s"]  # the load-robust cross-check, from the same steps
    assert cpu["on_policy"]["n"] == 2 and all(
        cpu[k]["n"] == 3 for k in ("generate", "student_step", "teacher_forward")
    )
    floor_cpu = sum(cpu[k]["median"] for k in ("generate", "student_step", "teacher_forward"))
    assert result["on_policy_over_floor_cpu"] == pytest.approx(cpu["on_policy"]["median"] / floor_cpu)
