"""Two CPU processes (gloo) under `accelerate launch`: every rank must end up with identical pruning masks."""

import json

import pytest
import torch

import hf_compress
from tests.conftest import ROOT, accelerate_launch
from tests.tiny_models import tiny_inputs, tiny_model

SCRIPT = ROOT / "tests" / "scripts" / "prune_script.py"
HEAD = {"bert": "seq_cls", "llama": "causal_lm"}  # what the script trains


@pytest.mark.slow
def test_masks_are_identical_on_every_rank(tmp_path):
    accelerate_launch([str(SCRIPT), "--output_dir", str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
    assert len(set(ranks[0]["fingerprints"])) > 2  # masks changed over several pruning steps
    assert ranks[0]["removed"] == ranks[1]["removed"]
    assert sum(len(v) for v in ranks[0]["removed"]["heads"].values()) == 8


@pytest.mark.slow
def test_hidden_masks_agree_on_every_rank_and_the_saved_model_reloads(tmp_path):
    """`hidden` + `heads` under DDP on a tiny BERT and a tiny Llama: one hidden mask on every rank at every step
    (each rank perturbs its Taylor scores differently), a narrower saved model, identical logits after reloading."""
    targets = json.dumps({"hidden": 0.25, "heads": 0.5})
    accelerate_launch([str(SCRIPT), "--output_dir", str(tmp_path), "--family", "bert", "llama", "--targets", targets])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for family in ("bert", "llama"):
        first, second = ranks[0][family], ranks[1][family]
        assert first["fingerprints"] == second["fingerprints"]
        assert first["hidden_removed"] == second["hidden_removed"]
        steps = [set(step) for step in first["hidden_removed"]]  # the linear schedule grows to 4 of 16 channels
        assert all(a <= b for a, b in zip(steps, steps[1:]))
        sizes = {16 - len(s) for s in steps}
        if family == "llama":  # LlamaConfig saves only multiples of the head count (4, or 2 once heads are halved)
            assert len(sizes) >= 2 and all(size % 2 == 0 for size in sizes)
        else:
            assert len(sizes) >= 3
        assert len(steps[-1]) == 4
        assert first["removed"] == second["removed"] and len(first["removed"]["hidden"]) == 4
        assert sum(len(v) for v in first["removed"]["heads"].values()) == 8
        assert first["logits"] == second["logits"]  # the same pruned model on both ranks

        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["hidden_size"] == first["hidden_size"] == 12
        reloaded = hf_compress.from_pretrained(tmp_path / family)
        assert reloaded.config.hidden_size == 12
        assert sum(p.numel() for p in reloaded.parameters()) == first["params"]
        assert first["params"] < sum(p.numel() for p in tiny_model(family, HEAD[family]).parameters())
        with torch.no_grad():
            logits = reloaded(**tiny_inputs()).logits
        torch.testing.assert_close(logits, torch.tensor(first["logits"]), atol=1e-6, rtol=0)
