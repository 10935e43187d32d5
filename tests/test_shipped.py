"""Packaging: the top-level `recipes/` and `model_cards/` are the only copies, and the wheel carries them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
import tomllib

from hf_compress.shipped import shipped_path
from tests.conftest import ROOT


def test_shipped_paths_are_the_top_level_folders():
    assert shipped_path("recipes", "quickstart.yaml") == ROOT / "recipes" / "quickstart.yaml"
    assert shipped_path("model_cards", "default.md") == ROOT / "model_cards" / "default.md"
    assert not (ROOT / "hf_compress" / "recipes" / "quickstart.yaml").exists()  # no second copy in the package
    with pytest.raises(ValueError, match="`folder` must be one of"):
        shipped_path("templates", "x.md")


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_compress").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_wheel_carries_recipes_and_card_templates(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for folder in ("hf_compress", "recipes", "model_cards"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for recipe in (ROOT / "recipes").glob("*.yaml"):
            assert archive.read(f"hf_compress/shipped_recipes/{recipe.name}") == recipe.read_bytes()
        template = ROOT / "model_cards" / "default.md"
        assert archive.read("hf_compress/shipped_model_cards/default.md") == template.read_bytes()
        assert "hf_compress/recipes/stages/__init__.py" in names and "hf_compress/models/families.py" in names
