"""The dry-run plan (``hf-compress check``) counts what the training-time pruning removes."""

import re

import pytest
from transformers import Trainer

from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.recipes.plan import plan_recipe
from hf_compress.recipes.validate import validate
from tests.conftest import RandomTokenDataset, train_args, write_tsv
from tests.tiny_models import tiny_model


@pytest.mark.parametrize(
    ("targets", "removed"), [({"hidden": 0.3}, 4), ({"heads": 0.5, "hidden": 0.2}, 2), ({"hidden": 0.25}, 4)]
)
def test_plan_removes_as_many_hidden_channels_as_the_callback(targets, removed, tmp_path):
    # 0.3 (0.2) of 16 channels would keep 11 (13), which LlamaConfig refuses: both round to a multiple of the heads
    tiny_model("llama", "causal_lm").save_pretrained(tmp_path / "teacher")
    pruning = {"targets": targets, "schedule": "one_shot", "scope": "local"}
    recipe = validate(
        {
            "name": "plan",
            "model": {"teacher": str(tmp_path / "teacher"), "task": "causal-lm"},
            "data": {"train": str(write_tsv(tmp_path / "train.tsv")), "text_column": "sentence"},
            "stages": [{"name": "pruned", "type": "prune", "pruning": pruning}],
        }
    )
    rows, lines = plan_recipe(recipe)
    line = next(line for line in lines if "hidden" in line)
    planned = int(re.search(r"-> (\d+) removed", line).group(1))
    assert planned == removed and rows[-1]["heads/layer"] == ("2" if "heads" in targets else "4")

    model = tiny_model("llama", "causal_lm").train()
    callback = PruningCallback(PruningConfig(**pruning))
    Trainer(
        model=model,
        args=train_args(tmp_path / "out", max_steps=2),
        train_dataset=RandomTokenDataset(),
        callbacks=[callback],
    ).train()
    assert len(callback.removed["hidden"]) == planned
    assert model.config.hidden_size == 16 - planned
