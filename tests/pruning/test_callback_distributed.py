"""Two CPU processes (gloo) under `accelerate launch`: every rank must end up with identical pruning masks."""

import json

import pytest

from tests.conftest import ROOT, accelerate_launch

SCRIPT = ROOT / "tests" / "scripts" / "prune_script.py"


@pytest.mark.slow
def test_masks_are_identical_on_every_rank(tmp_path):
    accelerate_launch([str(SCRIPT), "--output_dir", str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
    assert len(set(ranks[0]["fingerprints"])) > 2  # masks changed over several pruning steps
    assert ranks[0]["removed"] == ranks[1]["removed"]
    assert sum(len(v) for v in ranks[0]["removed"]["heads"].values()) == 8
