"""`accelerate launch -m hf_compress.cli run recipe.yaml` on two CPU (gloo) processes, as the README documents."""

import json

import pytest
import yaml

from hf_compress.loading import from_pretrained
from hf_compress.models.families import get_layers, head_counts
from hf_compress.recipes.lock import LOCK_NAME
from tests.conftest import accelerate_launch, write_tsv
from tests.tiny_models import tiny_model, tiny_tokenizer

ROWS, BATCH, STEPS = 32, 4, 3


@pytest.mark.slow
def test_recipe_runs_on_two_processes(tmp_path):
    tiny_model("bert", "seq_cls", num_labels=2).save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    data = str(write_tsv(tmp_path / "train.tsv", rows=ROWS))
    train = {"max_steps": STEPS, "per_device_train_batch_size": BATCH, "learning_rate": 1e-3, "disable_tqdm": True}
    recipe = {
        "name": "tiny",
        "seed": 0,
        "model": {"teacher": str(tmp_path / "teacher"), "num_labels": 2},
        "data": {"train": data, "eval": data, "text_column": "sentence", "max_length": 16},
        "stages": [
            {"name": "student", "type": "distill", "student": {"num_layers": 2}, "training": train},
            {
                "name": "pruned",
                "type": "prune",
                "recovery": "distill",
                "training": train,
                "pruning": {"targets": {"heads": 0.5, "ffn_neurons": 0.5}, "schedule": "one_shot"},
            },
            {"name": "int8", "type": "quantize"},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    command = ["-m", "hf_compress.cli", "run", str(tmp_path / "recipe.yaml"), "--output-dir", str(out)]
    result = accelerate_launch(command, timeout=180)

    assert result.stdout.count("Outputs:") == 1  # only the main process prints the tables
    expected = sorted([LOCK_NAME, "int8", "pruned", "recipe.yaml", "student"])
    assert sorted(p.name for p in out.iterdir()) == expected  # no .tmp left
    reports = {name: json.loads((out / name / "report.json").read_text()) for name in ("student", "pruned", "int8")}
    assert all(report["status"] == "done" for report in reports.values())
    # both ranks trained: the global batch is 2 x BATCH, so STEPS steps cover this fraction of an epoch
    assert reports["student"]["train"]["epoch"] == pytest.approx(STEPS * BATCH * 2 / ROWS)
    pruned = from_pretrained(out / "pruned")
    teacher_heads = tiny_model("bert", "seq_cls", num_labels=2).config.num_attention_heads
    assert len(get_layers(pruned)) == 2
    assert [head_counts(pruned, layer)[0] for layer in range(2)] == [teacher_heads // 2] * 2
