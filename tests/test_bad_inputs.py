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
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import hf_compress
from hf_compress import DistillationConfig, DistillationTrainer, PruningCallback, PruningConfig
from hf_compress.checks import CorruptFileError, NonFiniteError
from hf_compress.cli import main
from hf_compress.distillation.losses import distillation_loss
from hf_compress.pruning.masks import load_masks
from hf_compress.pruning.surgery import drop_layers, prune_ffn_neurons, prune_heads
from hf_compress.quantization.quantize import quantize_int8
from hf_compress.recipes.lock import check_output_dir
from hf_compress.recipes.schema import RecipeError, load_recipe
from hf_compress.vocabulary.prune import prune_vocabulary
from tests.conftest import VOCAB, tiny_inputs, tiny_model, tiny_tokenizer, write_tsv

NAN, INF = math.nan, math.inf
TRAIN = {"max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True, "disable_tqdm": True}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Inputs every case may read: a teacher folder, a tsv, a recipe, corrupt files; cases must change none."""
    root = tmp_path_factory.mktemp("bad_inputs")
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


def args(ws: Path, cls=DistillationConfig, **kwargs) -> TrainingArguments:
    options = dict(max_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    return cls(str(ws / "out"), **{**options, **kwargs})


def rows(head: str, label: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    inputs = tiny_inputs(batch=n)
    labels = torch.full((n,), label) if head == "seq_cls" else torch.full((n, 8), label)
    return [
        {"input_ids": inputs["input_ids"][i], "attention_mask": inputs["attention_mask"][i], "labels": labels[i]}
        for i in range(n)
    ]


def distil(ws: Path, head: str = "seq_cls", teacher=None, student=None, label: int = 1, train: bool = True, **kw):
    student = student if student is not None else tiny_model("bert", head)
    teacher = teacher if teacher is not None else tiny_model("bert", head, seed=1)
    trainer = DistillationTrainer(
        model=student.train(), teacher_model=teacher, args=args(ws, **kw), train_dataset=rows(head, label)
    )
    if train:
        trainer.train()
    return trainer


def nan_teacher(value: float = NAN):
    teacher = tiny_model("bert", "seq_cls", seed=1)
    with torch.no_grad():
        teacher.classifier.bias.fill_(value)
    return teacher


def prune_run(ws: Path, **config):
    model = tiny_model("bert", "seq_cls").train()
    trainer = Trainer(
        model=model,
        args=args(ws, TrainingArguments, max_steps=2),
        train_dataset=rows("seq_cls", 1),
        callbacks=[PruningCallback(PruningConfig(**config))],
    )
    trainer.train()


def recipe(ws: Path, *overrides: str):
    return load_recipe(ws / "recipe.yaml", list(overrides))


def cli(ws: Path, *argv: str) -> int:
    return main(["--debug", *argv])


def vocab(ws: Path, corpus, **kwargs):
    return prune_vocabulary(tiny_model("bert", "masked_lm"), tiny_tokenizer(), corpus, **kwargs)


def quantized_twice(ws: Path):
    model = quantize_int8(tiny_model("bert", "seq_cls"))
    quantize_int8(model)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    entry: str  # "api", "recipe" or "cli"
    call: Callable[[Path], Any]
    error: type[BaseException]
    needles: tuple[str, ...]  # the parameter (in backticks) and the value received


def case(id, entry, call, error, *needles) -> Case:
    return Case(id, entry, call, error, needles)


CASES = [
    # ---- distillation config: numbers, choices, JSON (class 1: non-finite numbers) ------------------------
    case("temperature-inf", "api", lambda ws: args(ws, temperature=INF), ValueError, "`temperature`", "inf"),
    case("temperature-nan", "api", lambda ws: args(ws, temperature=NAN), ValueError, "`temperature`", "nan"),
    case("temperature-zero", "api", lambda ws: args(ws, temperature=0.0), ValueError, "`temperature`", "0.0"),
    case("alpha-above-one", "api", lambda ws: args(ws, alpha=1.5), ValueError, "`alpha`", "1.5"),
    case("alpha-nan", "api", lambda ws: args(ws, alpha=NAN), ValueError, "`alpha`", "nan"),
    case("jsd-beta-one", "api", lambda ws: args(ws, jsd_beta=1.0), ValueError, "`jsd_beta`", "1.0"),
    case(
        "hidden-weight-neg",
        "api",
        lambda ws: args(ws, hidden_loss_weight=-1.0),
        ValueError,
        "`hidden_loss_weight`",
        "-1.0",
    ),
    case(
        "attention-weight-inf",
        "api",
        lambda ws: args(ws, attention_loss_weight=INF),
        ValueError,
        "`attention_loss_weight`",
        "inf",
    ),
    case(
        "divergence-typo",
        "api",
        lambda ws: args(ws, distillation_loss="kld"),
        ValueError,
        "`distillation_loss`",
        "'kld'",
    ),
    case("hidden-loss-typo", "api", lambda ws: args(ws, hidden_loss="l1"), ValueError, "`hidden_loss`", "'l1'"),
    case("chunk-size-zero", "api", lambda ws: args(ws, loss_chunk_size=0), ValueError, "`loss_chunk_size`", "0"),
    case("layer-map-not-json", "api", lambda ws: args(ws, layer_map="{0: 1"), ValueError, "`layer_map`", "{0: 1"),
    case("layer-map-not-int", "api", lambda ws: args(ws, layer_map='{"a": 1}'), ValueError, "`layer_map`", "'a'"),
    case(
        "init-kwargs-list",
        "api",
        lambda ws: args(ws, teacher_model_init_kwargs="[1]"),
        ValueError,
        "`teacher_model_init_kwargs`",
        "[1]",
    ),
    # ---- TrainingArguments semantics (class 2: runs that train nothing / something else) ---------------
    case("max-steps-negative", "api", lambda ws: args(ws, max_steps=-5), ValueError, "`max_steps`", "-5"),
    case("max-steps-zero", "api", lambda ws: args(ws, max_steps=0), ValueError, "`max_steps`", "got 0"),
    case(
        "epochs-zero",
        "api",
        lambda ws: args(ws, max_steps=-1, num_train_epochs=0),
        ValueError,
        "`num_train_epochs`",
        "0",
    ),
    case("learning-rate-inf", "api", lambda ws: args(ws, learning_rate=INF), ValueError, "`learning_rate`", "inf"),
    case(
        "plain-args-max-steps",
        "api",
        lambda ws: DistillationTrainer(
            model=tiny_model("bert", "seq_cls"),
            teacher_model=tiny_model("bert", "seq_cls"),
            args=args(ws, TrainingArguments, max_steps=-3),
        ),
        ValueError,
        "`max_steps`",
        "-3",
    ),
    # ---- distillation trainer: teacher / student compatibility, every head (class 3) -------------------
    case(
        "model-none",
        "api",
        lambda ws: DistillationTrainer(model=None, teacher_model=tiny_model("bert", "seq_cls"), args=args(ws)),
        ValueError,
        "`model`",
        "None",
    ),
    case(
        "compute-loss-func",
        "api",
        lambda ws: DistillationTrainer(
            model=tiny_model("bert", "seq_cls"),
            teacher_model=tiny_model("bert", "seq_cls"),
            args=args(ws),
            compute_loss_func=len,
        ),
        ValueError,
        "`compute_loss_func`",
        "callable",
    ),
    case("teacher-int", "api", lambda ws: distil(ws, teacher=42, train=False), ValueError, "`teacher_model`", "int"),
    case(
        "teacher-missing-path",
        "api",
        lambda ws: distil(ws, teacher="./missing/teacher", train=False),
        FileNotFoundError,
        "`teacher_model`",
        "./missing/teacher",
    ),
    case(
        "teacher-path-is-file",
        "api",
        lambda ws: distil(ws, teacher=str(ws / "afile.txt"), train=False),
        FileNotFoundError,
        "`teacher_model`",
        "afile.txt",
    ),
    case(
        "teacher-truncated",
        "api",
        lambda ws: distil(ws, teacher=str(ws / "truncated"), train=False),
        CorruptFileError,
        "`teacher_model`",
        "truncated",
    ),
    case(
        "teacher-other-head",
        "api",
        lambda ws: distil(ws, teacher=tiny_model("bert", "masked_lm"), train=False),
        ValueError,
        "`teacher_model`",
        "BertForMaskedLM",
    ),
    case(
        "teacher-num-labels",
        "api",
        lambda ws: distil(ws, teacher=tiny_model("bert", "seq_cls", num_labels=5), train=False),
        ValueError,
        "`teacher_model`",
        "num_labels=5",
    ),
    case(
        "seq-cls-teacher-vocab",
        "api",
        lambda ws: distil(ws, teacher=tiny_model("bert", "seq_cls", vocab_size=32), train=False),
        ValueError,
        "`teacher_model`",
        "(32 rows)",
    ),
    case(
        "token-cls-teacher-vocab",
        "api",
        lambda ws: distil(ws, "token_cls", teacher=tiny_model("bert", "token_cls", vocab_size=40), train=False),
        ValueError,
        "`teacher_model`",
        "(40 rows)",
    ),
    case(
        "qa-teacher-vocab",
        "api",
        lambda ws: distil(ws, "qa", teacher=tiny_model("bert", "qa", vocab_size=48), train=False),
        ValueError,
        "`teacher_model`",
        "(48 rows)",
    ),
    case(
        "causal-teacher-vocab",
        "api",
        lambda ws: DistillationTrainer(
            model=tiny_model("llama", "causal_lm"),
            teacher_model=tiny_model("llama", "causal_lm", vocab_size=32),
            args=args(ws),
        ),
        ValueError,
        "`teacher_model`",
        "(32)",
    ),
    case(
        "tokenizer-beyond-student",
        "api",
        lambda ws: DistillationTrainer(
            model=tiny_model("bert", "seq_cls", vocab_size=32),
            teacher_model=tiny_model("bert", "seq_cls"),
            args=args(ws),
            processing_class=tiny_tokenizer(),
        ),
        ValueError,
        "`processing_class`",
        f"{VOCAB} tokens",
    ),
    case(
        "layer-map-range-no-hidden-loss",
        "api",
        lambda ws: distil(ws, train=False, layer_map={7: 1}),
        ValueError,
        "`layer_map`",
        "7: 1",
    ),
    case(
        "attention-heads-differ",
        "api",
        lambda ws: distil(
            ws, teacher=tiny_model("bert", "seq_cls", num_attention_heads=2), train=False, attention_loss_weight=1.0
        ),
        ValueError,
        "`attention_loss_weight`",
        "teacher 2",
    ),
    case(
        "regression-student",
        "api",
        lambda ws: distil(
            ws,
            student=tiny_model("bert", "seq_cls", problem_type="regression"),
            teacher=tiny_model("bert", "seq_cls", problem_type="regression"),
            train=False,
        ),
        ValueError,
        "`problem_type`",
        "'regression'",
    ),
    # ---- labels at the first batch (class 3), non-finite losses (class 1) -------------------------------
    case("seq-cls-label-range", "api", lambda ws: distil(ws, label=5), ValueError, "`labels`", "got 5"),
    case("seq-cls-label-negative", "api", lambda ws: distil(ws, label=-3), ValueError, "`labels`", "got -3"),
    case("token-cls-label-range", "api", lambda ws: distil(ws, "token_cls", label=3), ValueError, "`labels`", "got 3"),
    case(
        "teacher-nan-logits",
        "api",
        lambda ws: distil(ws, teacher=nan_teacher()),
        NonFiniteError,
        "`loss_soft`",
        "nan",
        "step 0",
    ),
    case(
        "teacher-inf-logits",
        "api",
        lambda ws: distil(ws, teacher=nan_teacher(INF)),
        NonFiniteError,
        "`loss_soft`",
        "nan",
        "teacher logits",
    ),
    case(
        "soft-loss-inf-temperature",
        "api",
        lambda ws: distillation_loss(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=INF
        ),
        ValueError,
        "`temperature`",
        "inf",
    ),
    # ---- pruning config --------------------------------------------------------------------------------
    case(
        "sparsity-one", "api", lambda ws: PruningConfig(target="heads", sparsity=1.0), ValueError, "`sparsity`", "1.0"
    ),
    case(
        "sparsity-nan", "api", lambda ws: PruningConfig(target="heads", sparsity=NAN), ValueError, "`sparsity`", "nan"
    ),
    case("target-typo", "api", lambda ws: PruningConfig(target="neurons"), ValueError, "`target`", "'neurons'"),
    case("schedule-typo", "api", lambda ws: PruningConfig(schedule="exp"), ValueError, "`schedule`", "'exp'"),
    case(
        "importance-typo", "api", lambda ws: PruningConfig(importance="random"), ValueError, "`importance`", "'random'"
    ),
    case("start-step-negative", "api", lambda ws: PruningConfig(start_step=-1), ValueError, "`start_step`", "-1"),
    case("end-before-start", "api", lambda ws: PruningConfig(start_step=5, end_step=2), ValueError, "`end_step`", "2"),
    case("frequency-zero", "api", lambda ws: PruningConfig(frequency=0), ValueError, "`frequency`", "0"),
    case(
        "min-heads-zero",
        "api",
        lambda ws: PruningConfig(target="heads", min_heads_per_layer=0),
        ValueError,
        "`min_heads_per_layer`",
        "0",
    ),
    case(
        "block-influence-heads",
        "api",
        lambda ws: PruningConfig(target="heads", importance="block_influence"),
        ValueError,
        "`importance`",
        "['heads']",
    ),
    case(
        "taylor-at-step-zero",
        "api",
        lambda ws: PruningConfig(target="heads", importance="taylor"),
        ValueError,
        "`start_step`",
        "got 0",
    ),
    case("targets-empty", "api", lambda ws: PruningConfig(targets={}), ValueError, "`targets`", "{}"),
    case(
        "callback-config-and-kwargs",
        "api",
        lambda ws: PruningCallback(PruningConfig(), sparsity=0.3),
        ValueError,
        "`config`",
        "sparsity",
    ),
    # ---- pruning schedule vs the run (class 2) and lower bounds (class 3) -------------------------------
    case(
        "start-step-past-max-steps",
        "api",
        lambda ws: prune_run(ws, target="heads", sparsity=0.5, start_step=5, schedule="one_shot"),
        ValueError,
        "`start_step`",
        "5",
        "step 2",
    ),
    case(
        "end-step-past-max-steps",
        "api",
        lambda ws: prune_run(ws, target="ffn_neurons", sparsity=0.5, end_step=9),
        ValueError,
        "`end_step`",
        "9",
        "step 2",
    ),
    case(
        "all-ffn-neurons",
        "api",
        lambda ws: prune_ffn_neurons(tiny_model("bert"), {1: list(range(32))}),
        ValueError,
        "`neurons[1]`",
        "all 32 FFN neurons",
    ),
    case(
        "all-heads",
        "api",
        lambda ws: prune_heads(tiny_model("bert"), {2: [0, 1, 2, 3]}),
        ValueError,
        "`heads[2]`",
        "all 4 heads",
    ),
    case("heads-layer-range", "api", lambda ws: prune_heads(tiny_model("bert"), {9: [0]}), ValueError, "`heads`", "9"),
    case(
        "drop-all-layers",
        "api",
        lambda ws: drop_layers(tiny_model("bert"), [0, 1, 2, 3]),
        ValueError,
        "`layers`",
        "all 4 layers",
    ),
    case(
        "drop-repeated-layer",
        "api",
        lambda ws: drop_layers(tiny_model("bert"), [1, 1]),
        ValueError,
        "`layers`",
        "[1, 1]",
    ),
    # ---- quantization (class 5) ------------------------------------------------------------------------
    case("quantize-twice", "api", quantized_twice, ValueError, "`model`", "already quantised"),
    case(
        "embedding-bits",
        "api",
        lambda ws: quantize_int8(tiny_model("bert"), embedding_bits=3),
        ValueError,
        "`embedding_bits`",
        "3",
    ),
    case(
        "compute-mode",
        "api",
        lambda ws: quantize_int8(tiny_model("bert"), compute="fp8"),
        ValueError,
        "`compute`",
        "'fp8'",
    ),
    case(
        "empty-selection",
        "api",
        lambda ws: quantize_int8(tiny_model("bert"), modules=["nothing.*"]),
        ValueError,
        "`modules`",
        "nothing.*",
    ),
    # ---- vocabulary (class 4) --------------------------------------------------------------------------
    case(
        "corpus-only-special",
        "api",
        lambda ws: vocab(ws, [[0, 1, 2, 3]]),
        ValueError,
        "`corpus_or_ids`",
        "min_count`=1",
    ),
    case(
        "corpus-below-min-count",
        "api",
        lambda ws: vocab(ws, ["w1 w2 w3"], min_count=2),
        ValueError,
        "`corpus_or_ids`",
        "min_count`=2",
    ),
    case(
        "eval-coverage-low",
        "api",
        lambda ws: vocab(ws, ["w1 w2"], eval_corpus=["w3 w4 w5 w1"]),
        ValueError,
        "`min_coverage`",
        "25.0%",
    ),
    case(
        "min-coverage-range",
        "api",
        lambda ws: vocab(ws, ["w1 w2"], eval_corpus=["w1"], min_coverage=2.0),
        ValueError,
        "`min_coverage`",
        "2.0",
    ),
    case("min-count-zero", "api", lambda ws: vocab(ws, ["w1"], min_count=0), ValueError, "`min_count`", "0"),
    case("corpus-empty", "api", lambda ws: vocab(ws, []), ValueError, "`corpus_or_ids`", "empty"),
    case("corpus-id-range", "api", lambda ws: vocab(ws, [[5, 999]]), ValueError, "`corpus_or_ids`", "[999]"),
    case("corpus-single-string", "api", lambda ws: vocab(ws, "w1 w2"), TypeError, "`corpus_or_ids`", "single string"),
    # ---- loading (class 5) -----------------------------------------------------------------------------
    case(
        "load-missing-path",
        "api",
        lambda ws: hf_compress.from_pretrained("./nope/model"),
        FileNotFoundError,
        "`path`",
        "./nope/model",
    ),
    case(
        "load-path-is-file",
        "api",
        lambda ws: hf_compress.from_pretrained(ws / "afile.txt"),
        FileNotFoundError,
        "`path`",
        "afile.txt",
    ),
    case(
        "load-truncated",
        "api",
        lambda ws: hf_compress.from_pretrained(ws / "truncated"),
        CorruptFileError,
        "`path`",
        "truncated",
    ),
    case(
        "masks-corrupt",
        "api",
        lambda ws: load_masks(str(ws / "masks.safetensors")),
        CorruptFileError,
        "`path`",
        "masks.safetensors",
    ),
    case(
        "output-dir-is-file",
        "api",
        lambda ws: check_output_dir(ws / "afile.txt" / "run"),
        NotADirectoryError,
        "`--output-dir`",
        "afile.txt",
    ),
    # ---- recipes: the same rules at validation, before any work ----------------------------------------
    case(
        "recipe-max-steps-negative",
        "recipe",
        lambda ws: recipe(ws, "stages.teacher.training.max_steps=-5"),
        RecipeError,
        "training.max_steps`",
        "-5",
    ),
    case(
        "recipe-distill-max-steps-zero",
        "recipe",
        lambda ws: recipe(ws, "stages.student.training.max_steps=0"),
        RecipeError,
        "training.max_steps`",
        "got 0",
    ),
    case(
        "recipe-learning-rate-inf",
        "recipe",
        lambda ws: recipe(ws, "stages.teacher.training.learning_rate=.inf"),
        RecipeError,
        "training.learning_rate`",
        "inf",
    ),
    case(
        "recipe-temperature-inf",
        "recipe",
        lambda ws: recipe(ws, "stages.student.training.temperature=.inf"),
        RecipeError,
        "training.temperature`",
        "inf",
    ),
    case(
        "recipe-temperature-nan",
        "recipe",
        lambda ws: recipe(ws, "stages.student.training.temperature=.nan"),
        RecipeError,
        "training.temperature`",
        "nan",
    ),
    case(
        "recipe-sparsity",
        "recipe",
        lambda ws: recipe(ws, "stages.pruned.pruning.targets.heads=1.5"),
        RecipeError,
        "pruning.sparsity`",
        "1.5",
    ),
    case(
        "recipe-num-labels",
        "recipe",
        lambda ws: recipe(ws, "model.num_labels=0"),
        RecipeError,
        "`model.num_labels`",
        "0",
    ),
    case(
        "recipe-teacher-missing",
        "recipe",
        lambda ws: recipe(ws, "model.teacher=./no-such-teacher"),
        RecipeError,
        "`model.teacher`",
        "no-such-teacher",
    ),
    case(
        "recipe-train-missing",
        "recipe",
        lambda ws: recipe(ws, "data.train=missing.tsv"),
        RecipeError,
        "`data.train`",
        "missing.tsv",
    ),
    case(
        "recipe-stage-type",
        "recipe",
        lambda ws: recipe(ws, "stages.pruned.type=shrink"),
        RecipeError,
        ".type`",
        "'shrink'",
    ),
    case(
        "recipe-key-typo",
        "recipe",
        lambda ws: recipe(ws, "stages.teacher.training.max_stepz=3"),
        RecipeError,
        "max_stepz`",
        "max_steps",
    ),
    case(
        "recipe-bad-set",
        "recipe",
        lambda ws: recipe(ws, "no-equals-sign"),
        RecipeError,
        "`--set no-equals-sign`",
        "key.path=value",
    ),
    case(
        "recipe-yaml-python-tag",
        "recipe",
        lambda ws: load_recipe(ws / "evil.yaml"),
        RecipeError,
        "evil.yaml",
        "python/object",
    ),
    # ---- CLI: the same errors through `hf-compress` (--debug re-raises them) ---------------------------
    case(
        "cli-output-dir-file",
        "cli",
        lambda ws: cli(ws, "run", str(ws / "recipe.yaml"), "--output-dir", str(ws / "afile.txt")),
        NotADirectoryError,
        "`--output-dir`",
        "afile.txt",
    ),
    case(
        "cli-recipe-missing", "cli", lambda ws: cli(ws, "run", "missing.yaml"), RecipeError, "`recipe`", "missing.yaml"
    ),
    case(
        "cli-max-steps",
        "cli",
        lambda ws: cli(ws, "check", str(ws / "recipe.yaml"), "--set", "stages.student.training.max_steps=-5"),
        RecipeError,
        "training.max_steps`",
        "-5",
    ),
    case(
        "cli-report-missing",
        "cli",
        lambda ws: cli(ws, "report", "no-such-output"),
        FileNotFoundError,
        "`DIR`",
        "no-such-output",
    ),
    case("cli-card-missing", "cli", lambda ws: cli(ws, "card", str(ws / "out")), FileNotFoundError, "`DIR`", "out"),
]


def test_the_table_covers_every_entry_point():
    entries = [c.entry for c in CASES]
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    assert {e: entries.count(e) >= 5 for e in ("api", "recipe", "cli")} == {"api": True, "recipe": True, "cli": True}


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly_and_changes_nothing(bad: Case, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    before = snapshot(workspace)
    with pytest.raises(bad.error) as caught:
        bad.call(workspace)
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


def test_non_finite_loss_stops_before_the_optimizer_step(workspace, monkeypatch):
    """NaN teacher logits: the student's weights are untouched and no checkpoint (good or bad) is replaced."""
    monkeypatch.chdir(workspace)
    student = tiny_model("bert", "seq_cls")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"`loss_soft` is nan at step 0"):
        distil(workspace, student=student, teacher=nan_teacher())
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_all_ignored_labels_warn_on_the_first_step(workspace, monkeypatch, caplog):
    monkeypatch.chdir(workspace)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            distil(workspace, "token_cls", label=-100)
    finally:
        hf_logging.disable_propagation()
    assert "Every label of the batch at step 0 is -100" in caplog.text
