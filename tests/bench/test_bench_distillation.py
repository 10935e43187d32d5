"""bench/bench_distillation.py runs end to end at ``--size tiny`` and its ratios follow from its own medians.

No timing assertions (a tiny run on a shared machine says nothing about speed): the checks are the variants run,
the step counts recorded and the arithmetic of every reported ratio.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HAS_TRL = importlib.util.find_spec("trl") is not None


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("bench") / "distillation.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    command = [
        sys.executable,
        str(REPO / "bench" / "bench_distillation.py"),
        "--size",
        "tiny",
        "--threads",
        "1",
        "--output",
        str(output),
    ]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Distillation step time" in run.stdout and f"wrote {output}" in run.stdout
    return json.loads(output.read_text())


def test_every_variant_ran_its_measured_steps(result):
    steps, skip = 5, 2  # SIZES["tiny"]; a run of `steps` steps gives steps - 1 step intervals
    lm_kinds = {"plain", "kd", "cached", "kd_jsd", "teacher_forward"}
    lm_kinds |= {"trl_gkd", "trl_gkd_jsd"} if HAS_TRL else set()
    assert set(result["pairs"]["sst2"]["step_s"]) == {"plain", "kd", "cached", "teacher_forward"}
    assert set(result["pairs"]["lm"]["step_s"]) == lm_kinds
    for pair in result["pairs"].values():
        for kind, stats in pair["step_s"].items():
            assert stats["n"] == steps - skip - (kind != "teacher_forward")
            assert 0 < stats["min"] <= stats["median"] <= stats["max"]


def test_ratios_are_the_recorded_medians(result):
    for pair in result["pairs"].values():
        med = {kind: stats["median"] for kind, stats in pair["step_s"].items()}
        assert pair["ideal_s"] == pytest.approx(med["plain"] + med["teacher_forward"])
        assert pair["kd_over_ideal"] == pytest.approx(med["kd"] / pair["ideal_s"])
        assert pair["cached_over_plain"] == pytest.approx(med["cached"] / med["plain"])
    lm = result["pairs"]["lm"]
    med = {kind: stats["median"] for kind, stats in lm["step_s"].items()}
    assert lm["kd_jsd_over_ideal"] == pytest.approx(med["kd_jsd"] / lm["ideal_s"])
    if HAS_TRL:
        assert lm["kd_jsd_over_trl_gkd_jsd"] == pytest.approx(med["kd_jsd"] / med["trl_gkd_jsd"])
        assert lm["kd_over_trl_gkd"] == pytest.approx(med["kd"] / med["trl_gkd"])
