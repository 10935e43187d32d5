"""Fault injection, concurrency and security (issue 13): what a crash, a second run or a hostile file cannot do.

* ``kill -9`` of ``hf-compress run`` during a stage and while a stage saves its model: the finished stages are reused
  by the rerun, the interrupted one restarts, no half-written folder is ever taken as done;
* ``kill -9`` of a Trainer run with a ``PruningCallback`` while it saves a checkpoint: resuming from that
  half-written checkpoint is refused, resuming from the last complete one gives bit-identical weights and masks;
* two runs on one output folder: the second is refused by the lock, which a killed holder does not leave stuck;
* security: no remote code without ``trust_remote_code``, no YAML tags, no pickles, no token in output or files.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import hf_compress
import hf_compress.reporting.hub
from hf_compress import DistillationConfig, DistillationTrainer
from hf_compress.checks import last_complete_checkpoint
from hf_compress.cli import main
from hf_compress.pruning.callback import SAVED
from hf_compress.pruning.surgery import prune_heads
from hf_compress.recipes.lock import LOCK_NAME, OutputLockedError, acquire_output_lock, output_lock
from hf_compress.recipes.schema import RecipeError
from hf_compress.recipes.validate import load_recipe
from tests.conftest import ROOT, write_tsv
from tests.scripts.checkpoint_script import build_trainer
from tests.tiny_models import tiny_model, tiny_tokenizer

TRAIN = {
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "use_cpu": True,
    "disable_tqdm": True,
    "save_strategy": "no",
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault_inputs")
    tiny_model("bert", "seq_cls", num_labels=2).save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    write_tsv(root / "rows.tsv", rows=16)
    return root


def two_stage_recipe(inputs: Path, student_steps: int) -> Path:
    recipe = {
        "name": "faults",
        "seed": 0,
        "model": {"teacher": "teacher", "num_labels": 2},
        "data": {"train": "rows.tsv", "eval": "rows.tsv", "text_column": "sentence", "max_length": 16},
        "stages": [
            {"name": "teacher", "type": "finetune_teacher", "training": dict(TRAIN)},
            {"name": "student", "type": "distill", "student": {"num_layers": 2}, "training": dict(TRAIN)},
        ],
    }
    recipe["stages"][1]["training"]["max_steps"] = student_steps
    path = inputs / f"faults-{student_steps}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def start_run(recipe: Path, out: Path, *python: str) -> subprocess.Popen:
    command = [sys.executable, *python, "-m", "hf_compress.cli", "run", str(recipe), "--output-dir", str(out)]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def rerun_reuses_teacher(recipe: Path, out: Path, capsys) -> None:
    assert main(["run", str(recipe), "--output-dir", str(out), "--set", "stages.student.training.max_steps=2"]) == 0
    table = capsys.readouterr().out
    assert [line.split()[:3] for line in table.splitlines() if line.startswith(("teacher ", "student "))][:2] == [
        ["teacher", "finetune_teacher", "reused"],
        ["student", "distill", "done"],
    ]
    assert json.loads((out / "student" / "report.json").read_text())["status"] == "done"
    assert not list(out.glob(".*.tmp"))


def test_kill_during_a_stage_then_rerun_reuses_finished_stages(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    run = start_run(two_stage_recipe(inputs, student_steps=100_000), out)
    wait_for(lambda: (out / "teacher" / "report.json").is_file() and (out / ".student.tmp").is_dir(), run)
    time.sleep(1.0)  # inside the student's training loop
    run.send_signal(signal.SIGKILL)
    assert run.wait(30) == -signal.SIGKILL
    assert json.loads((out / "teacher" / "report.json").read_text())["status"] == "done"
    assert not (out / "student").exists()  # the interrupted stage never looks finished
    rerun_reuses_teacher(two_stage_recipe(inputs, student_steps=100_000), out, capsys)


KILL_WHILE_SAVING = """
import os, signal, sys, runpy
import safetensors.torch

original = safetensors.torch.save_file

def save_half_then_die(tensors, filename, *args, **kwargs):
    original(tensors, filename, *args, **kwargs)
    if ".student.tmp" in str(filename):  # the student stage's final save: cut the file short, then die
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = save_half_then_die
sys.argv = ["hf-compress", *sys.argv[1:]]
runpy.run_module("hf_compress.cli", run_name="__main__")
"""


def test_kill_while_a_stage_saves_its_model_leaves_no_finished_looking_folder(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = two_stage_recipe(inputs, student_steps=2)
    command = [sys.executable, "-c", KILL_WHILE_SAVING, "run", str(recipe), "--output-dir", str(out)]
    run = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert (out / ".student.tmp").is_dir() and not (out / "student").exists()
    rerun_reuses_teacher(recipe, out, capsys)


def state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_checkpoint_cut_short_is_refused_and_the_last_complete_one_resumes_bit_identically(tmp_path):
    out = tmp_path / "ckpt"
    script = ROOT / "tests" / "scripts" / "checkpoint_script.py"
    run = subprocess.run(
        [sys.executable, str(script), str(out), "4"], cwd=ROOT, env=ENV, capture_output=True, timeout=240
    )
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()  # the Trainer's files are there ...
    assert not any((out / "checkpoint-4" / name).exists() for name in SAVED)  # ... the callback's are not

    with pytest.raises(ValueError, match=r"checkpoint-4' is incomplete.*resume from '.*checkpoint-2'"):
        build_trainer(str(out)).train(resume_from_checkpoint=True)
    resume = last_complete_checkpoint(out, ("trainer_state.json", *SAVED))
    assert resume == str(out / "checkpoint-2")
    resumed = build_trainer(str(out))
    resumed.train(resume_from_checkpoint=resume)

    reference = build_trainer(str(tmp_path / "reference"))
    reference.train()
    removed = [
        cb.removed for t in (resumed, reference) for cb in t.callback_handler.callbacks if hasattr(cb, "removed")
    ]
    assert removed[0] == removed[1] and removed[0]["heads"]
    a, b = state(resumed), state(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ concurrency


def test_lock_refuses_a_second_holder_and_is_released_by_a_killed_one(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(
            OutputLockedError, match=rf"`output_dir` .* is in use by another hf-compress run \(pid {os.getpid()}"
        ):
            with output_lock(out):
                pass
    code = f"import time\nfrom hf_compress.recipes.lock import output_lock\nwith output_lock({str(out)!r}):\n"
    code += "    print('held', flush=True)\n    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
        with output_lock(out):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert (out / LOCK_NAME).is_file()  # a stale file, but no stale lock
    with output_lock(out) as path:
        assert path == out / LOCK_NAME
    with output_lock(out, enabled=False) as path:  # non-main processes take nothing
        assert path is None
    lock = acquire_output_lock(out)  # the one-line form: held until released or dropped
    with pytest.raises(OutputLockedError):
        acquire_output_lock(out)
    del lock
    acquire_output_lock(out).release()


def test_a_second_cli_run_on_the_same_folder_is_refused(inputs, tmp_path):
    out = tmp_path / "out"
    recipe = two_stage_recipe(inputs, student_steps=100_000)
    first = start_run(recipe, out)
    try:
        wait_for(lambda: (out / ".student.tmp").is_dir(), first)
        second = subprocess.Popen(
            [sys.executable, "-m", "hf_compress.cli", "run", str(recipe), "--output-dir", str(out)],
            cwd=ROOT,
            env=ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines = []
        for line in second.stderr:  # refused right after start-up; a stage that starts means it interleaves
            lines.append(line)
            if "running into" in line:
                second.kill()
        assert second.wait(60) == 1, "".join(lines)[-2000:]
        assert "is in use by another hf-compress run" in lines[-1]
        assert (out / ".student.tmp").is_dir()  # the first run's work is untouched
    finally:
        first.kill()
        first.wait(30)


# ---------------------------------------------------------------------------------------------------- security


REMOTE_CODE = """
from pathlib import Path
Path(__file__).with_name("EXECUTED").write_text("remote code ran")
from transformers import BertModel as EvilModel
"""


def test_remote_code_stays_off_unless_asked(tmp_path):
    folder = tmp_path / "remote"
    tiny_model("bert", "seq_cls").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["EvilModel"], auto_map={"AutoModelForSequenceClassification": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(REMOTE_CODE)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        hf_compress.from_pretrained(folder)
    trainer = DistillationTrainer(  # the teacher path loads the plain transformers class, not evil.py
        model=tiny_model("bert", "seq_cls"),
        teacher_model=str(folder),
        args=DistillationConfig(str(tmp_path / "out"), report_to="none", use_cpu=True),
    )
    assert type(trainer.teacher_model).__name__ == "BertForSequenceClassification"
    assert not (folder / "EXECUTED").exists()


def test_recipes_never_construct_yaml_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nstages: []\n")
    with pytest.raises(RecipeError, match="evil.yaml"):
        load_recipe(path)
    assert not marker.exists()


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    for recorded in (False, True):
        folder = tmp_path / f"pickled-{recorded}"
        model = tiny_model("bert", "seq_cls")
        if recorded:
            prune_heads(model, {0: [0]})  # a pruned folder: our own loader reads it
        model.save_pretrained(folder)
        (folder / "model.safetensors").unlink()
        with open(folder / "pytorch_model.bin", "wb") as f:
            pickle.dump({"weight": Payload(marker)}, f)
        with pytest.raises((OSError, ValueError, pickle.UnpicklingError)):
            hf_compress.from_pretrained(folder)
        assert not marker.exists()


class RecordingApi:
    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        raise OSError(f"401 Unauthorized: invalid token {self.token or os.environ['HF_TOKEN']}")


def test_tokens_never_reach_output_or_files(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    tiny_model("bert", "seq_cls").save_pretrained(folder)
    (folder / "report.json").write_text(json.dumps({"name": "student", "status": "done"}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# card\n")
    monkeypatch.setattr(hf_compress.reporting.hub, "HfApi", RecordingApi)
    secret = "hf_ENVsecret987"
    monkeypatch.setenv("HF_TOKEN", secret)
    for argv in (["push", str(folder), "me/model"], ["push", str(folder), "me/model", "--token", "hf_ARGsecret"]):
        before = {p: p.read_bytes() for p in folder.iterdir()}
        assert main(argv) == 1
        captured = capsys.readouterr()
        assert "401 Unauthorized" in captured.err
        assert secret not in captured.out + captured.err and "hf_ARGsecret" not in captured.out + captured.err
        assert {p: p.read_bytes() for p in folder.iterdir()} == before
