"""The `hf-compress` command line: exit codes and messages, report / card / export / demo, one end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hf_compress.cli
import hf_compress.reporting.hub
from hf_compress.cli import DEMO_SENTENCES, QUICK_OVERRIDES, demo_predictions, main, packaged_recipe
from hf_compress.quantization.quantize import quantize_model
from hf_compress.recipes.lock import LOCK_NAME
from hf_compress.recipes.schema import REPO_ROOT
from tests.conftest import free_port
from tests.tiny_models import tiny_model, tiny_tokenizer

TRAIN = {
    "max_steps": 2,
    "per_device_train_batch_size": 8,
    "use_cpu": True,
    "learning_rate": "1e-3",
    "disable_tqdm": True,
}


def write_rows(path: Path, rows: int = 20) -> Path:
    lines = ["sentence\tlabel"] + [
        " ".join(f"w{(i + j) % 50}" for j in range(3 + i % 5)) + f"\t{i % 2}" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny BERT teacher folder (with its tokenizer) and a 20-row tsv, next to where recipes are written."""
    root = tmp_path_factory.mktemp("cli_inputs")
    tiny_model("bert", "seq_cls", num_labels=2).save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    write_rows(root / "rows.tsv")
    return root


def tiny_recipe(inputs: Path, stages: list[dict], name: str = "recipe.yaml") -> Path:
    recipe = {
        "name": "tiny-cli",
        "seed": 0,
        "model": {"teacher": "teacher", "num_labels": 2},
        "data": {"train": "rows.tsv", "eval": "rows.tsv", "text_column": "sentence", "max_length": 16},
        "stages": stages,
    }
    path = inputs / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


FULL = [
    {"name": "teacher", "type": "finetune_teacher", "training": TRAIN},
    {"name": "student", "type": "distill", "student": {"num_layers": 2}, "training": TRAIN},
    {
        "name": "pruned",
        "type": "prune",
        "training": TRAIN,
        "pruning": {"targets": {"heads": 0.5, "ffn_neurons": 0.5}, "schedule": "one_shot"},
    },
    {"name": "int8", "type": "quantize"},
    {"type": "evaluate"},
    {"type": "card"},
]


def test_run_end_to_end_then_resume_report_and_card(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    recipe = tiny_recipe(inputs, FULL)
    assert main(["run", str(recipe), "--output-dir", str(out), "--set", "stages.student.training.max_steps=3"]) == 0
    printed = capsys.readouterr().out
    names = ["teacher", "student", "pruned", "int8", "evaluate", "card"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "recipe.yaml", LOCK_NAME])
    for name in names:
        assert json.loads((out / name / "report.json").read_text())["status"] == "done"
    assert json.loads((out / "student" / "report.json").read_text())["train"]["train_runtime"] > 0
    assert (out / "int8" / "README.md").is_file()  # the card describes the final model
    for name in ("teacher", "student", "pruned", "int8"):
        assert f"\n{name} " in printed
    assert "size x" in printed and "accuracy" in printed

    assert main(["run", str(recipe), "--output-dir", str(out), "--set", "stages.student.training.max_steps=3"]) == 0
    again = capsys.readouterr().out
    assert again.count("reused") == len(names)  # same config: every finished stage is reused

    assert main(["report", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[0] == "model" and [line.split()[0] for line in table[2:]] == [
        "teacher",
        "student",
        "pruned",
        "int8",
    ]
    (out / "int8" / "README.md").unlink()
    assert main(["card", str(out)]) == 0
    assert "Wrote" in capsys.readouterr().out
    card = (out / "int8" / "README.md").read_text()
    assert "tiny-cli-int8" in card and "hf_compress.from_pretrained" in card


def fake_output(root: Path) -> Path:
    """An output folder as `run` leaves it: recipe.yaml and stage folders with report.json (no models)."""
    stages = [
        ("teacher", "finetune_teacher", 22_700_000, 90_900_000, 0.0, 0.889, 40.0),
        ("student", "distill", 17_400_000, 69_600_000, 0.0, 0.875, 20.0),
        ("int8", "quantize", 17_400_000, 17_500_000, 0.0, 0.871, 12.0),
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(
        yaml.safe_dump({"name": "fake", "stages": [{"name": n, "type": t} for n, t, *_ in stages]})
    )
    for name, kind, params, size, sparsity, accuracy, ms in reversed(stages):
        (root / name).mkdir(parents=True)
        model = {
            "params": {"total": params, "nonzero": params},
            "sparsity": sparsity,
            "memory_bytes": size,
            "disk_bytes": size,
            "latency_ms": {"1": ms / 4, "32": ms},
        }
        (root / name / "report.json").write_text(
            json.dumps(
                {"name": name, "type": kind, "status": "done", "model": model, "metrics": {"accuracy": accuracy}}
            )
        )
    (root / "evaluate").mkdir()
    (root / "evaluate" / "report.json").write_text(json.dumps({"name": "evaluate", "type": "evaluate"}))
    return root


def test_report_table_of_a_fake_output_dir(tmp_path, capsys):
    out = fake_output(tmp_path / "out")
    assert main(["report", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    for column in (
        "model",
        "params (nonzero)",
        "size",
        "sparsity",
        "accuracy",
        "latency bs=32",
        "size x",
        "accuracy retention",
    ):
        assert column in header
    assert [line.split()[0] for line in lines[2:]] == ["teacher", "student", "int8"]  # recipe order, not mtime
    assert "17,400,000" in lines[4] and "5.19x" in lines[4] and "98.0%" in lines[4]
    assert main(["report", str(out), "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| model |")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "missing.yaml"], "error: `recipe` file 'missing.yaml' does not exist"),
        (["check", "missing.yaml"], "error: `recipe` file 'missing.yaml' does not exist"),
        (["report", "no_such_dir"], "error: `DIR` 'no_such_dir' does not exist"),
        (["card", "no_such_dir"], "error: `DIR` 'no_such_dir' does not exist"),
        (["run", "recipe.yaml", "--set", "nonsense"], "error: `--set nonsense` is not of the form key.path=value"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text("name: x\nmodel: {teacher: builtin:all-MiniLM-L6-v2, num_labels: 2}\n")
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err and captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # nothing written


def test_malformed_recipe_run_writes_nothing(inputs, tmp_path, capsys):
    bad = [dict(FULL[0], training={**TRAIN, "lerning_rate": 1e-3})]
    out = tmp_path / "out"
    assert main(["run", str(tiny_recipe(inputs, bad, "bad.yaml")), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "`stages[0].training.lerning_rate` is not a TrainingArguments field; did you mean `learning_rate`?" in err
    assert not out.exists()


def test_empty_output_dir_and_usage_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no stage folder with a report.json" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2  # argparse usage error
    assert "invalid choice" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "check" in capsys.readouterr().out


def test_check_prints_plan_and_writes_nothing(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in inputs.iterdir())
    recipe = tiny_recipe(inputs, FULL, "check.yaml")
    assert main(["check", str(recipe), "--set", "stages.student.student.num_layers=3"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("\nPruning targets:")[0])
    assert resolved["stages"][1]["student"] == {"num_layers": 3}
    assert resolved["data"]["train"] == str(inputs / "rows.tsv")
    assert "pruned: heads 50% of bert.encoder.layer.{0-2}.{attention.self.query" in out
    assert "-> 6 of 12 heads removed" in out and "-> 48 of 96 neurons removed" in out
    rows = {cells[0]: cells for cells in map(str.split, out.splitlines()) if cells[:1] in (["student"], ["pruned"])}
    assert rows["student"][2:5] == ["3", "4", "32"] and rows["pruned"][2:5] == ["3", "2", "16"]
    assert os.listdir(tmp_path) == [] and sorted(p.name for p in inputs.iterdir()) == sorted(before + ["check.yaml"])


def test_demo_runs_the_packaged_quickstart_with_quick_overrides(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_run(recipe, output_dir, force=False):
        seen.update(recipe=recipe, out=Path(output_dir))
        fake_output(Path(output_dir))
        return [{"name": "teacher", "type": "finetune_teacher", "status": "done", "skipped": False, "elapsed_s": 1}]

    monkeypatch.setattr(hf_compress.cli, "run_recipe", fake_run)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick"]) == 0
    assert seen["out"] == Path("outputs") / "quickstart"
    recipe = seen["recipe"]
    assert recipe.source == str(packaged_recipe("quickstart").resolve())
    assert recipe.name == "minilm-sst2-quickstart" and recipe.data.max_train_samples == 2000
    assert recipe.stage("student").training["max_steps"] == 40
    assert "teacher" in capsys.readouterr().out
    assert len(QUICK_OVERRIDES) >= 4
    assert packaged_recipe("quickstart") == REPO_ROOT / "recipes" / "quickstart.yaml"  # the one copy


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "hf_compress.cli", "check", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--set KEY.PATH=VALUE" in result.stdout


@pytest.mark.slow
def test_accelerate_launch_two_processes_prints_once(inputs, tmp_path):
    """`accelerate launch -m hf_compress.cli run`: both ranks train, only the main process writes and prints."""
    launcher = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "out"
    command = [
        str(launcher),
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "hf_compress.cli",
        "run",
        str(tiny_recipe(inputs, FULL[:2] + FULL[4:5], "dist.yaml")),
        "--output-dir",
        str(out),
    ]
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = sorted([LOCK_NAME, "evaluate", "recipe.yaml", "student", "teacher"])
    assert sorted(p.name for p in out.iterdir()) == expected
    assert result.stdout.count("Running recipe 'tiny-cli'") == 1
    assert result.stdout.count("\nstage ") == 1 and result.stdout.count("Outputs: ") == 1


def test_demo_predictions_load_the_final_folder_into_a_pipeline(tmp_path, capsys):
    """The demo ends with `pipeline("text-classification")` on the final (int8, pruned) model of the run."""
    from hf_compress.pruning import prune_heads

    model = tiny_model(
        "bert",
        "seq_cls",
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    quantize_model(prune_heads(model, {0: [1, 2]}))
    folder = tmp_path / "out" / "int8"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (tmp_path / "out" / "card").mkdir()
    (tmp_path / "out" / "card" / "report.json").write_text(json.dumps({"model_dir": str(folder)}))
    predictions = demo_predictions(tmp_path / "out")
    assert [p["label"] in ("negative", "positive") for p in predictions] == [True] * len(DEMO_SENTENCES)
    out = capsys.readouterr().out
    assert all(sentence in out for sentence in DEMO_SENTENCES) and str(folder) in out


def test_export_command_exports_the_float_stage_of_a_run(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run = fake_output(tmp_path / "run")  # teacher, student and int8 stage folders with a recipe.yaml
    student = tiny_model("bert", "seq_cls")
    student.save_pretrained(run / "student")
    tiny_tokenizer().save_pretrained(run / "student")
    quantize_model(student).save_pretrained(run / "int8")
    assert main(["export", str(run), "--output", str(tmp_path / "repo")]) == 0  # int8 is last: its float stage
    assert (tmp_path / "repo" / "onnx" / "model.onnx").is_file()
    assert (tmp_path / "repo" / "onnx" / "model_quantized.onnx").is_file()
    assert "Exported" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "error: `DIR`" in capsys.readouterr().err
