"""Bad inputs, as a hostile new user would try them, across the Python API, recipes and the CLI (issue 13).

One table: (entry point, call, exception type, substrings). Each case must raise that exception type with a message
naming the parameter and the value received, and leave the workspace (inputs, current directory) byte for byte as
it was: nothing written, nothing deleted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_compress
from hf_compress import DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig
from hf_compress.checks import CorruptFileError, NonFiniteError, check_label_values
from hf_compress.cli import main
from hf_compress.distillation.losses import distillation_loss
from hf_compress.pruning.masks import load_masks
from hf_compress.pruning.surgery import drop_layers, prune_ffn_neurons, prune_heads
from hf_compress.quantization.quantize import quantize_int8
from hf_compress.recipes.lock import check_output_dir
from hf_compress.recipes.schema import RecipeError
from hf_compress.recipes.validate import load_recipe
from hf_compress.vocabulary.prune import prune_vocabulary
from tests.conftest import write_tsv
from tests.tiny_models import VOCAB, tiny_inputs, tiny_model, tiny_tokenizer

NAN, INF = math.nan, math.inf
TRAIN = {"max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True, "disable_tqdm": True}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("bad_inputs"))


def make_workspace(root: Path) -> Path:
    """Inputs every case may read: a teacher folder, a tsv, a recipe, corrupt files; cases must change none."""
    teacher = tiny_model("bert", "seq_cls", num_labels=2)
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    write_tsv(root / "rows.tsv", rows=12)
    recipe = {
        "name": "bad-inputs",
        "seed": 0,
        "model": {"teacher": "teacher", "num_labels": 2},
        "data": {"train": "rows.tsv", "eval": "rows.tsv", "text_column": "sentence", "max_length": 16},
        "stages": [
            {"name": "teacher", "type": "finetune_teacher", "training": dict(TRAIN)},
            {"name": "student", "type": "distill", "student": {"num_layers": 2}, "training": dict(TRAIN)},
            {"name": "pruned", "type": "prune", "training": dict(TRAIN), "pruning": {"targets": {"heads": 0.5}}},
        ],
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (root / "evil.yaml").write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    (root / "afile.txt").write_text("not a folder\n")
    teacher.save_pretrained(root / "truncated")
    weights = (root / "truncated" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "masks.safetensors").write_bytes(b"\x00\x01garbage, not safetensors")
    (root / "out").mkdir()
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``root`` with (size, mtime) for files: any write, creation or deletion changes it."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


# ------------------------------------------------------------------------------------------------- helpers
# Cases run with the workspace as the current directory, so relative paths ("teacher", "out") point into it.


def kd(cls=DistillationConfig, output_dir: str = "out", **kwargs) -> TrainingArguments:
    options = dict(max_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    return cls(output_dir, **{**options, **kwargs})


def bert(head: str = "seq_cls", **overrides):
    return tiny_model("bert", head, **overrides)


def rows(head: str, label: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    inputs = tiny_inputs(batch=n)
    labels = torch.full((n,), label) if head == "seq_cls" else torch.full((n, 8), label)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def trainer(head="seq_cls", teacher=None, student=None, label=1, train=False, args=None, **kwargs):
    """A DistillationTrainer of tiny BERTs with `head` (trained one step when `train`)."""
    student = student if student is not None else bert(head)
    teacher = teacher if teacher is not None else bert(head, seed=1)
    built = DistillationTrainer(
        model=student.train(), teacher_model=teacher, args=args or kd(**kwargs), train_dataset=rows(head, label)
    )
    if train:
        built.train()
    return built


def nan_teacher(value: float = NAN):
    teacher = bert(seed=1)
    with torch.no_grad():
        teacher.classifier.bias.fill_(value)
    return teacher


def prune_run(**config) -> None:
    callbacks = [PruningCallback(PruningConfig(**config))]
    args = kd(TrainingArguments, max_steps=2)
    Trainer(model=bert().train(), args=args, train_dataset=rows("seq_cls", 1), callbacks=callbacks).train()


def recipe(*overrides: str):
    return load_recipe("recipe.yaml", list(overrides))


def cli(*argv: str) -> int:
    return main(["--debug", *argv])  # --debug re-raises the error that the CLI prints as one line


def vocab(corpus, **kwargs):
    return prune_vocabulary(bert("masked_lm"), tiny_tokenizer(), corpus, **kwargs)


def quantized_twice():
    quantize_int8(quantize_int8(bert()))


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    entry: str  # "api", "recipe" or "cli"
    call: Callable[[], Any]
    error: type[BaseException]
    needles: tuple[str, ...]  # the parameter (in backticks) and the value received


def table(entry: str, rows: list[tuple]) -> list[Case]:
    return [Case(id, entry, call, error, tuple(needles)) for id, call, error, *needles in rows]


V, F = ValueError, FileNotFoundError
# fmt: off
API = [
    # distillation config: numbers, choices, JSON (class 1: non-finite numbers)
    ("temperature-inf", lambda: kd(temperature=INF), V, "`temperature`", "inf"),
    ("temperature-nan", lambda: kd(temperature=NAN), V, "`temperature`", "nan"),
    ("temperature-zero", lambda: kd(temperature=0.0), V, "`temperature`", "0.0"),
    ("alpha-above-one", lambda: kd(alpha=1.5), V, "`alpha`", "1.5"),
    ("alpha-nan", lambda: kd(alpha=NAN), V, "`alpha`", "nan"),
    ("jsd-beta-one", lambda: kd(jsd_beta=1.0), V, "`jsd_beta`", "1.0"),
    ("hidden-weight-negative", lambda: kd(hidden_loss_weight=-1.0), V, "`hidden_loss_weight`", "-1.0"),
    ("attention-weight-inf", lambda: kd(attention_loss_weight=INF), V, "`attention_loss_weight`", "inf"),
    ("divergence-typo", lambda: kd(distillation_loss="kld"), V, "`distillation_loss`", "'kld'"),
    ("hidden-loss-typo", lambda: kd(hidden_loss="l1"), V, "`hidden_loss`", "'l1'"),
    ("chunk-size-zero", lambda: kd(loss_chunk_size=0), V, "`loss_chunk_size`", "0"),
    ("layer-map-not-json", lambda: kd(layer_map="{0: 1"), V, "`layer_map`", "{0: 1"),
    ("layer-map-not-int", lambda: kd(layer_map='{"a": 1}'), V, "`layer_map`", "'a'"),
    ("init-kwargs-list", lambda: kd(teacher_model_init_kwargs="[1]"), V, "`teacher_model_init_kwargs`", "[1]"),
    ("soft-loss-inf-temperature", lambda: distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), None,
                                                            temperature=INF), V, "`temperature`", "inf"),
    # TrainingArguments semantics (class 2: runs that train nothing, or something else than asked)
    ("max-steps-negative", lambda: kd(max_steps=-5), V, "`max_steps`", "-5"),
    ("max-steps-zero", lambda: kd(max_steps=0), V, "`max_steps`", "got 0"),
    ("epochs-zero", lambda: kd(max_steps=-1, num_train_epochs=0), V, "`num_train_epochs`", "0"),
    ("learning-rate-inf", lambda: kd(learning_rate=INF), V, "`learning_rate`", "inf"),
    ("plain-args-max-steps", lambda: trainer(args=kd(TrainingArguments, max_steps=-3)), V, "`max_steps`", "-3"),
    # distillation trainer: teacher / student compatibility, the same rule for every head (class 3)
    ("model-none", lambda: DistillationTrainer(None, bert(), kd()), V, "`model`", "None"),
    ("compute-loss-func", lambda: DistillationTrainer(bert(), bert(), kd(), compute_loss_func=len), V,
     "`compute_loss_func`", "callable"),
    ("teacher-int", lambda: trainer(teacher=42), V, "`teacher_model`", "int"),
    ("teacher-missing-path", lambda: trainer(teacher="./missing/teacher"), F, "`teacher_model`", "./missing/teacher"),
    ("teacher-path-is-file", lambda: trainer(teacher="afile.txt"), F, "`teacher_model`", "afile.txt"),
    ("teacher-truncated", lambda: trainer(teacher="truncated"), CorruptFileError, "`teacher_model`", "truncated"),
    ("teacher-other-head", lambda: trainer(teacher=bert("masked_lm")), V, "`teacher_model`", "BertForMaskedLM"),
    ("teacher-num-labels", lambda: trainer(teacher=bert(num_labels=5)), V, "`teacher_model`", "num_labels=5"),
    ("seq-cls-teacher-vocab", lambda: trainer(teacher=bert(vocab_size=32)), V, "`teacher_model`", "(32 rows)"),
    ("token-cls-teacher-vocab", lambda: trainer("token_cls", teacher=bert("token_cls", vocab_size=40)), V,
     "`teacher_model`", "(40 rows)"),
    ("qa-teacher-vocab", lambda: trainer("qa", teacher=bert("qa", vocab_size=48)), V, "`teacher_model`", "(48 rows)"),
    ("causal-teacher-vocab", lambda: DistillationTrainer(tiny_model("llama", "causal_lm"), tiny_model(
        "llama", "causal_lm", vocab_size=32), kd()), V, "`teacher_model`", "(32)"),
    ("tokenizer-beyond-student", lambda: DistillationTrainer(bert(vocab_size=32), bert(), kd(),
                                                             processing_class=tiny_tokenizer()), V,
     "`processing_class`", f"{VOCAB} tokens"),
    ("layer-map-range-no-hidden-loss", lambda: trainer(layer_map={7: 1}), V, "`layer_map`", "7: 1"),
    ("attention-heads-differ", lambda: trainer(teacher=bert(num_attention_heads=2), attention_loss_weight=1.0), V,
     "`attention_loss_weight`", "teacher 2"),
    ("regression-student", lambda: trainer(student=bert(problem_type="regression"),
                                           teacher=bert(problem_type="regression")), V, "`problem_type`",
     "'regression'"),
    # labels at the first batch (class 3) and non-finite losses (class 1), before any optimizer step
    ("seq-cls-label-range", lambda: trainer(label=5, train=True), V, "`labels`", "got 5"),
    ("seq-cls-label-negative", lambda: trainer(label=-3, train=True), V, "`labels`", "got -3"),
    ("token-cls-label-range", lambda: trainer("token_cls", label=3, train=True), V, "`labels`", "got 3"),
    ("teacher-nan-logits", lambda: trainer(teacher=nan_teacher(), train=True), NonFiniteError, "`loss_soft`", "nan",
     "step 0"),
    ("teacher-inf-logits", lambda: trainer(teacher=nan_teacher(INF), train=True), NonFiniteError, "`loss_soft`",
     "teacher logits"),
    # pruning config
    ("sparsity-one", lambda: PruningConfig(target="heads", sparsity=1.0), V, "`sparsity`", "1.0"),
    ("sparsity-nan", lambda: PruningConfig(target="heads", sparsity=NAN), V, "`sparsity`", "nan"),
    ("target-typo", lambda: PruningConfig(target="neurons"), V, "`target`", "'neurons'"),
    ("schedule-typo", lambda: PruningConfig(schedule="exp"), V, "`schedule`", "'exp'"),
    ("importance-typo", lambda: PruningConfig(importance="random"), V, "`importance`", "'random'"),
    ("start-step-negative", lambda: PruningConfig(start_step=-1), V, "`start_step`", "-1"),
    ("end-before-start", lambda: PruningConfig(start_step=5, end_step=2), V, "`end_step`", "2"),
    ("frequency-zero", lambda: PruningConfig(frequency=0), V, "`frequency`", "0"),
    ("min-heads-zero", lambda: PruningConfig(target="heads", min_heads_per_layer=0), V, "`min_heads_per_layer`", "0"),
    ("block-influence-heads", lambda: PruningConfig(target="heads", importance="block_influence"), V,
     "`importance`", "['heads']"),
    ("taylor-at-step-zero", lambda: PruningConfig(target="heads", importance="taylor"), V, "`start_step`", "got 0"),
    ("targets-empty", lambda: PruningConfig(targets={}), V, "`targets`", "{}"),
    ("callback-config-and-kwargs", lambda: PruningCallback(PruningConfig(), sparsity=0.3), V, "`config`", "sparsity"),
    # pruning schedule vs the run (class 2) and the lower bound of a layer (class 3)
    ("start-step-past-max-steps", lambda: prune_run(target="heads", start_step=5, schedule="one_shot"), V,
     "`start_step`", "is 5", "step 2"),
    ("end-step-past-max-steps", lambda: prune_run(target="ffn_neurons", end_step=9), V, "`end_step`", "is 9",
     "step 2"),
    ("all-ffn-neurons", lambda: prune_ffn_neurons(bert("base"), {1: list(range(32))}), V, "`neurons[1]`",
     "all 32 FFN neurons"),
    ("all-heads", lambda: prune_heads(bert("base"), {2: [0, 1, 2, 3]}), V, "`heads[2]`", "all 4 heads"),
    ("heads-layer-range", lambda: prune_heads(bert("base"), {9: [0]}), V, "`heads`", "9"),
    ("drop-all-layers", lambda: drop_layers(bert("base"), [0, 1, 2, 3]), V, "`layers`", "all 4 layers"),
    ("drop-repeated-layer", lambda: drop_layers(bert("base"), [1, 1]), V, "`layers`", "[1, 1]"),
    # quantization (class 5)
    ("quantize-twice", quantized_twice, V, "`model`", "already quantised"),
    ("embedding-bits", lambda: quantize_int8(bert(), embedding_bits=3), V, "`embedding_bits`", "3"),
    ("compute-mode", lambda: quantize_int8(bert(), compute="fp8"), V, "`compute`", "'fp8'"),
    ("empty-selection", lambda: quantize_int8(bert(), modules=["nothing.*"]), V, "`modules`", "nothing.*"),
    # vocabulary (class 4)
    ("corpus-only-special", lambda: vocab([[0, 1, 2, 3]]), V, "`corpus_or_ids`", "min_count`=1"),
    ("corpus-below-min-count", lambda: vocab(["w1 w2 w3"], min_count=2), V, "`corpus_or_ids`", "min_count`=2"),
    ("eval-coverage-low", lambda: vocab(["w1 w2"], eval_corpus=["w3 w4 w5 w1"]), V, "`min_coverage`", "25.0%"),
    ("min-coverage-range", lambda: vocab(["w1"], eval_corpus=["w1"], min_coverage=2.0), V, "`min_coverage`", "2.0"),
    ("min-count-zero", lambda: vocab(["w1"], min_count=0), V, "`min_count`", "0"),
    ("corpus-empty", lambda: vocab([]), V, "`corpus_or_ids`", "empty"),
    ("corpus-id-range", lambda: vocab([[5, 999]]), V, "`corpus_or_ids`", "[999]"),
    ("corpus-single-string", lambda: vocab("w1 w2"), TypeError, "`corpus_or_ids`", "single string"),
    # loading and files (class 5)
    ("load-missing-path", lambda: hf_compress.from_pretrained("./nope/model"), F, "`path`", "./nope/model"),
    ("load-path-is-file", lambda: hf_compress.from_pretrained("afile.txt"), F, "`path`", "afile.txt"),
    ("load-truncated", lambda: hf_compress.from_pretrained("truncated"), CorruptFileError, "`path`", "truncated"),
    ("masks-corrupt", lambda: load_masks("masks.safetensors"), CorruptFileError, "`path`", "masks.safetensors"),
    ("output-dir-is-file", lambda: check_output_dir("afile.txt/run"), NotADirectoryError, "`--output-dir`",
     "afile.txt"),
    ("labels-beyond-num-labels", lambda: check_label_values([0, 1, 2], 2, "model.num_labels"), V,
     "`model.num_labels` is 2", "[2]"),
]
RECIPE = [  # the same rules at validation, before any work, naming the key path
    ("recipe-max-steps-negative", lambda: recipe("stages.teacher.training.max_steps=-5"), RecipeError,
     "training.max_steps`", "-5"),
    ("recipe-distill-max-steps-zero", lambda: recipe("stages.student.training.max_steps=0"), RecipeError,
     "training.max_steps`", "got 0"),
    ("recipe-learning-rate-inf", lambda: recipe("stages.teacher.training.learning_rate=.inf"), RecipeError,
     "training.learning_rate`", "inf"),
    ("recipe-temperature-inf", lambda: recipe("stages.student.training.temperature=.inf"), RecipeError,
     "training.temperature`", "inf"),
    ("recipe-temperature-nan", lambda: recipe("stages.student.training.temperature=.nan"), RecipeError,
     "training.temperature`", "nan"),
    ("recipe-sparsity", lambda: recipe("stages.pruned.pruning.targets.heads=1.5"), RecipeError,
     "pruning.sparsity`", "1.5"),
    ("recipe-num-labels", lambda: recipe("model.num_labels=0"), RecipeError, "`model.num_labels`", "0"),
    ("recipe-teacher-missing", lambda: recipe("model.teacher=./no-such-teacher"), RecipeError, "`model.teacher`",
     "no-such-teacher"),
    ("recipe-train-missing", lambda: recipe("data.train=missing.tsv"), RecipeError, "`data.train`", "missing.tsv"),
    ("recipe-stage-type", lambda: recipe("stages.pruned.type=shrink"), RecipeError, ".type`", "'shrink'"),
    ("recipe-key-typo", lambda: recipe("stages.teacher.training.max_stepz=3"), RecipeError, "max_stepz`",
     "max_steps"),
    ("recipe-bad-set", lambda: recipe("no-equals-sign"), RecipeError, "`--set no-equals-sign`", "key.path=value"),
    ("recipe-yaml-python-tag", lambda: load_recipe("evil.yaml"), RecipeError, "evil.yaml", "python/object"),
]
CLI = [  # the same errors through `hf-compress`
    ("cli-output-dir-file", lambda: cli("run", "recipe.yaml", "--output-dir", "afile.txt"), NotADirectoryError,
     "`--output-dir`", "afile.txt"),
    ("cli-recipe-missing", lambda: cli("run", "missing.yaml"), RecipeError, "`recipe`", "missing.yaml"),
    ("cli-max-steps", lambda: cli("check", "recipe.yaml", "--set", "stages.student.training.max_steps=-5"),
     RecipeError, "training.max_steps`", "-5"),
    ("cli-temperature-inf", lambda: cli("check", "recipe.yaml", "--set", "stages.student.training.temperature=.inf"),
     RecipeError, "training.temperature`", "inf"),
    ("cli-report-missing", lambda: cli("report", "no-such-output"), F, "`DIR`", "no-such-output"),
    ("cli-card-missing", lambda: cli("card", "out"), F, "`DIR`", "out"),
]
# fmt: on
CASES = table("api", API) + table("recipe", RECIPE) + table("cli", CLI)


def test_the_table_covers_every_entry_point():
    entries = [c.entry for c in CASES]
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {e: entries.count(e) >= 5 for e in ("api", "recipe", "cli")} == {"api": True, "recipe": True, "cli": True}


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(bad: Case, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    with pytest.raises(bad.error) as caught:
        bad.call()
    message = str(caught.value)
    for needle in bad.needles:
        assert needle in message, message
    assert message.count("\n") == 0, message  # one sentence, no traceback-like dump
    assert snapshot(workspace) == before
    assert not (workspace / "pwned").exists()


def test_cli_prints_one_line_and_exits_non_zero(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    assert main(["run", str(workspace / "recipe.yaml"), "--output-dir", str(workspace / "afile.txt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: `--output-dir`") and "Errno" not in err[0]
    assert main(["check", str(workspace / "recipe.yaml"), "--set", "stages.student.training.max_steps=-5"]) == 2
    assert "max_steps` must be a positive number of steps" in capsys.readouterr().err
    assert snapshot(workspace) == before


def test_non_finite_loss_stops_before_the_optimizer_step_and_keeps_the_last_checkpoint(workspace, tmp_path):
    """The teacher turns NaN at the third batch: the error names step 2, checkpoint-2 stays byte for byte, the
    student's weights are those of step 2, and no later checkpoint or NaN weight is written."""
    student, teacher, calls = bert(), bert(seed=1), []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            output.logits.fill_(NAN)

    teacher.register_forward_hook(poison)
    out = tmp_path / "run"
    args = kd(output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=1, per_device_train_batch_size=2)
    built = DistillationTrainer(
        model=student.train(), teacher_model=teacher, args=args, train_dataset=rows("seq_cls", 1, 8)
    )
    with pytest.raises(NonFiniteError, match=r"`loss_soft` is nan at step 2, so training stops"):
        built.train()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    saved = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    weights = student.state_dict()
    assert all(torch.equal(saved[k], weights[k]) for k in saved)  # no optimizer step after the last checkpoint
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_labels_beyond_num_labels_stop_a_recipe_before_its_stage_trains(workspace, tmp_path, capsys):
    lines = ["sentence\tlabel"] + [f"w{i} w{i + 1}\t{i % 3}" for i in range(12)]
    (tmp_path / "three.tsv").write_text("\n".join(lines) + "\n")
    spec = yaml.safe_load((workspace / "recipe.yaml").read_text())
    spec["model"]["teacher"] = str(workspace / "teacher")
    spec["data"].update(train=str(tmp_path / "three.tsv"), eval=str(tmp_path / "three.tsv"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "recipe.yaml"), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: `model.num_labels` is 2 but the data has labels [2] outside [0, 2); set `model.num_labels` to 3 or "
        "fix the label column."
    )
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "recipe.yaml" and not p.name.startswith(".hf")]


def test_all_ignored_labels_warn_on_the_first_step(workspace, monkeypatch, caplog):
    monkeypatch.chdir(workspace)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            trainer("token_cls", label=-100, train=True)
    finally:
        hf_logging.disable_propagation()
    assert "Every label of the batch at step 0 is -100" in caplog.text
