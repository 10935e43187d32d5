"""Raw FSDP2 pruning helpers: one 2-process gloo launch (torchrun) compared with the unsharded computation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_compress.pruning.masks import PruningMasks
from hf_compress.pruning.sharded import is_sharded, mask_sharded, remove_masked
from tests.conftest import ROOT, free_port
from tests.tiny_models import tiny_model


def test_unsharded_model_is_masked_and_pruned_in_place():
    model = tiny_model("llama", "causal_lm")
    assert not is_sharded(model)
    masks = PruningMasks.full(model, ["ffn_neurons"])
    masks.ffn_neurons[0][:16] = False
    assert mask_sharded(model, masks) == 3  # gate, up and down projections of layer 0
    assert model.model.layers[0].mlp.up_proj.weight[:16].abs().sum() == 0
    removed = remove_masked(model, masks, ["ffn_neurons"])
    assert removed["ffn_neurons"] == {0: list(range(16))} and model.model.layers[0].mlp.up_proj.out_features == 16


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_fsdp2_two_processes_match_unsharded(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "tests/scripts/sharded_script.py", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for checks in ranks:
        assert checks["sharded"] and checks["gathered_plain"] and checks["masks_equal"]
        assert checks["scores_max_diff"] < 1e-6 and checks["masked_params"] > 0
        assert checks["loss_diff"] < 1e-6 and checks["weights_max_diff"] < 1e-6  # masked shards train like the plain
        assert (checks["local_rows"], checks["full_rows"]) == (8, 16)  # each rank holds half of each weight
        assert checks["teacher_logits_diff"] < 1e-5 and checks["teacher_frozen"]
        assert checks["teacher_local_fraction"] == pytest.approx(0.5)  # the teacher is sharded, not replicated
    main = ranks[0]
    assert main["surgery_keys_equal"] and main["surgery_max_diff"] == 0 and main["pruned_logits_diff"] < 1e-6
    assert main["pruned_fraction"] < 0.9 and main["removed_heads_layer0"] == 2
