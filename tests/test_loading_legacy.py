"""Checkpoints pruned with transformers 4.x ``prune_heads`` (``config.pruned_heads``) load with identical logits."""

import json

import pytest
import torch

from hf_compress.loading import from_pretrained
from hf_compress.models.families import head_counts
from hf_compress.pruning.surgery import prune_heads
from tests.tiny_models import HEADS, tiny_inputs, tiny_model

PRUNED = {0: [1], 2: [0, 3]}


def _v4_checkpoint(family, path):
    """What transformers 4.x wrote after ``model.prune_heads(PRUNED)``: sliced weights, ``pruned_heads`` in config."""
    model = prune_heads(tiny_model(family, "seq_cls"), PRUNED)
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    del config["hf_compress"]
    config["pruned_heads"] = {str(layer): heads for layer, heads in PRUNED.items()}
    (path / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_transformers_4_pruned_heads_checkpoint_loads_with_identical_logits(family, tmp_path):
    model = _v4_checkpoint(family, tmp_path)
    with pytest.raises((RuntimeError, ValueError)):  # plain transformers 5 builds all heads: size mismatch
        HEADS["seq_cls"].from_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert [head_counts(loaded, layer)[0] for layer in range(4)] == [3, 4, 2, 4]
    assert not hasattr(loaded.config, "pruned_heads") and "layers" in loaded.config.hf_compress
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tiny_inputs()).logits, model(**tiny_inputs()).logits, atol=0, rtol=0)
    loaded.save_pretrained(tmp_path / "v5")  # re-saved in the v5 form: recorded structure, reloads as usual
    assert "pruned_heads" not in json.loads((tmp_path / "v5" / "config.json").read_text())
    with torch.no_grad():
        again = from_pretrained(tmp_path / "v5")(**tiny_inputs()).logits
    torch.testing.assert_close(again, model(**tiny_inputs()).logits, atol=0, rtol=0)
