"""The recipe stage runner (`hf_compress.recipes.pipeline` and its stages) on tiny models and a tiny tsv."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch

import hf_compress.recipes.stages.quantize
from hf_compress.loading import from_pretrained
from hf_compress.models.families import ffn_size, get_layers, head_counts
from hf_compress.recipes.lock import LOCK_NAME
from hf_compress.recipes.pipeline import read_report, run_recipe
from hf_compress.recipes.schema import RecipeError
from hf_compress.recipes.validate import validate
from tests.conftest import write_tsv
from tests.tiny_models import tiny_model, tiny_tokenizer

TRAIN = {
    "max_steps": 2,
    "per_device_train_batch_size": 8,
    "use_cpu": True,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "disable_tqdm": True,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 4-layer BERT "teacher" folder (3-label head, to be replaced) with its tokenizer, and a 32-row tsv."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_model("bert", "seq_cls").save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    tiny_model("bert", "seq_cls", num_labels=2).save_pretrained(root / "classifier")  # an already fine-tuned teacher
    tiny_tokenizer().save_pretrained(root / "classifier")
    text = root / "corpus.txt"
    text.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 50}" for j in range(9)) for i in range(40)) + "\n")
    tiny_model("llama", "causal_lm").save_pretrained(root / "lm")
    tiny_tokenizer().save_pretrained(root / "lm")
    return {
        "teacher": root / "teacher",
        "classifier": root / "classifier",
        "lm": root / "lm",
        "txt": text,
        "tsv": write_tsv(root / "train.tsv", rows=32),
    }


def make_recipe(files, stages, teacher="teacher", **data):
    return {
        "name": "tiny",
        "seed": 0,
        "model": {"teacher": str(files[teacher]), "num_labels": 2},
        "data": {
            "train": str(files["tsv"]),
            "eval": str(files["tsv"]),
            "text_column": "sentence",
            "max_length": 16,
            **data,
        },
        "stages": stages,
    }


FULL = [
    {"name": "teacher", "type": "finetune_teacher", "training": TRAIN},
    {"name": "student", "type": "distill", "student": {"num_layers": 2}, "training": TRAIN},
    {
        "name": "pruned",
        "type": "prune",
        "recovery": "distill",
        "training": TRAIN,
        "pruning": {"targets": {"heads": 0.5, "ffn_neurons": 0.5}, "schedule": "one_shot"},
    },
    {"name": "int8", "type": "quantize", "quantization": {"include_embeddings": True}},
    {"type": "evaluate"},
    {"type": "card"},
]


def snapshot(root: Path) -> dict[str, str]:
    """Content hashes of every file in the stage folders (the resolved recipe.yaml is rewritten by each run)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "recipe.yaml"
    }


def test_full_recipe_layout_reports_and_resume(files, tmp_path):
    out = tmp_path / "run"
    reports = run_recipe(make_recipe(files, FULL, label_names=["neg", "pos"]), out)
    names = ["teacher", "student", "pruned", "int8", "evaluate", "card"]
    assert [r["name"] for r in reports] == names and not any(r["skipped"] for r in reports)
    assert (out / "recipe.yaml").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "recipe.yaml", LOCK_NAME])  # no .tmp leftovers
    for name in names:
        report = read_report(out / name)
        assert report["status"] == "done" and report["config_hash"]
    for name in ("teacher", "student", "pruned", "int8"):
        assert (out / name / "config.json").is_file() and (out / name / "tokenizer.json").is_file()
        correct = read_report(out / name)["metrics"]["accuracy"] * 32  # the 32 eval rows of `files["tsv"]`
        assert correct == pytest.approx(round(correct), abs=1e-9) and 0 <= round(correct) <= 32

    teacher, student, pruned = (from_pretrained(out / n) for n in ("teacher", "student", "pruned"))
    assert teacher.config.num_labels == 2 and len(get_layers(teacher)) == 4
    assert teacher.config.id2label == {0: "neg", 1: "pos"} and pruned.config.id2label == {0: "neg", 1: "pos"}
    assert len(get_layers(student)) == 2
    assert head_counts(pruned, 0)[0] < head_counts(student, 0)[0]  # physically smaller, and it reloads
    sizes = {n: read_report(out / n)["model"]["params"]["total"] for n in ("teacher", "student", "pruned")}
    assert sizes["teacher"] > sizes["student"] > sizes["pruned"]
    assert read_report(out / "int8")["model"]["quantized"] is True

    evaluation = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert evaluation["reference"] == "teacher"
    assert list(evaluation["models"]) == ["teacher", "student", "pruned", "int8"]
    int8 = evaluation["models"]["int8"]
    assert set(int8["latency_ms"]) == {"1", "32"}
    assert int8["vs_teacher"]["size_x"] > 1 and "accuracy" in int8["vs_teacher"]["retention_pct"]
    assert "| teacher |" in (out / "evaluate" / "evaluation.md").read_text()
    card = (out / "int8" / "README.md").read_text()
    assert "# tiny-int8" in card and "| tiny-int8 |" in card  # the final model's card, with its evaluation row
    assert (out / "card" / "README.md").read_text() == card

    # resume: nothing reruns, nothing is rewritten
    before = snapshot(out)
    again = run_recipe(make_recipe(files, FULL, label_names=["neg", "pos"]), out)
    assert all(r["skipped"] for r in again)
    assert snapshot(out) == before

    # a changed late stage reruns only itself and what follows it
    changed = [*FULL[:3], {**FULL[3], "quantization": {"include_embeddings": False}}, *FULL[4:]]
    third = run_recipe(make_recipe(files, changed, label_names=["neg", "pos"]), out)
    assert [r["skipped"] for r in third] == [True, True, True, False, False, False]
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items() if k.split("/")[0] in ("teacher", "student", "pruned"))
    assert read_report(out / "int8")["quantization"] == {"include_embeddings": False}


def test_failing_stage_leaves_earlier_stages_untouched(files, tmp_path, monkeypatch):
    stages = [
        {"name": "teacher", "type": "finetune_teacher", "training": TRAIN},
        {"name": "int8", "type": "quantize", "quantization": {"include_embeddings": True}},
    ]
    out = tmp_path / "run"
    run_recipe(make_recipe(files, stages), out)
    before = snapshot(out)

    @functools.wraps(hf_compress.recipes.stages.quantize.quantize_model)  # same signature: the recipe still validates
    def broken(*args, **kwargs):
        raise RuntimeError("quantisation exploded")

    monkeypatch.setattr(hf_compress.recipes.stages.quantize, "quantize_model", broken)
    changed = [stages[0], {**stages[1], "quantization": {"include_embeddings": False}}]
    with pytest.raises(RuntimeError, match="quantisation exploded"):
        run_recipe(make_recipe(files, changed), out)
    assert snapshot(out) == before  # the old int8 folder too: a failed rerun replaces nothing
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_prune_without_recovery_and_with_finetuning(files, tmp_path):
    one_shot = {"targets": {"ffn_neurons": 0.5}, "schedule": "one_shot", "scope": "local"}
    stages = [
        {"name": "teacher", "type": "finetune_teacher", "training": TRAIN},
        {"name": "cut", "type": "prune", "recovery": "none", "pruning": one_shot},
        {
            "name": "tuned",
            "type": "prune",
            "recovery": "finetune",
            "training": TRAIN,
            "pruning": {"targets": {"layers": 0.5}, "schedule": "one_shot"},
        },
    ]
    reports = run_recipe(make_recipe(files, stages), tmp_path / "run")
    assert [r["recovery"] for r in reports[1:]] == ["none", "finetune"]
    teacher = from_pretrained(tmp_path / "run" / "teacher")
    cut, tuned = from_pretrained(tmp_path / "run" / "cut"), from_pretrained(tmp_path / "run" / "tuned")
    assert [ffn_size(cut, i) for i in range(4)] == [ffn_size(teacher, i) // 2 for i in range(4)]
    # recovery "none" changed nothing but the removed neurons: the kept weights are the teacher's
    assert (cut.bert.embeddings.word_embeddings.weight == teacher.bert.embeddings.word_embeddings.weight).all()
    assert len(get_layers(tuned)) == 2


def test_distill_alone_from_a_given_teacher_folder(files, tmp_path):
    stages = [{"name": "small", "type": "distill", "student": {"layers": [0, 3]}, "training": TRAIN}]
    (report,) = run_recipe(make_recipe(files, stages, teacher="classifier"), tmp_path / "run")
    student = from_pretrained(tmp_path / "run" / "small")
    assert len(get_layers(student)) == 2 and report["train"]["train_loss"] > 0
    assert student.config.hf_compress["teacher_layers"] == [0, 3]


def test_evaluate_alone_uses_the_recipe_teacher(files, tmp_path):
    (report,) = run_recipe(make_recipe(files, [{"type": "evaluate"}], teacher="classifier"), tmp_path / "run")
    evaluation = json.loads((tmp_path / "run" / "evaluate" / "evaluation.json").read_text())
    assert list(evaluation["models"]) == ["teacher"] and report["summary"] == {}
    correct = evaluation["models"]["teacher"]["metrics"]["accuracy"] * 32  # measured on the 32 eval rows
    assert (
        correct == pytest.approx(round(correct), abs=1e-9) and evaluation["models"]["teacher"]["params"]["total"] > 0
    )


def test_causal_lm_recipe_reports_perplexity(files, tmp_path):
    recipe = {
        "name": "lm",
        "seed": 0,
        "model": {"teacher": str(files["lm"]), "task": "causal-lm"},
        "data": {"train": str(files["txt"]), "eval": str(files["txt"]), "block_size": 16},
        "stages": [
            {"name": "student", "type": "distill", "student": {"num_layers": 2}, "training": TRAIN},
            {"type": "evaluate"},
        ],
    }
    reports = run_recipe(recipe, tmp_path / "run")
    assert reports[0]["metrics"]["perplexity"] > 1
    evaluation = json.loads((tmp_path / "run" / "evaluate" / "evaluation.json").read_text())
    assert "perplexity" in evaluation["models"]["student"]["vs_teacher"]["retention_pct"]


def test_training_output_dir_is_refused(files, tmp_path):
    stages = [{"name": "teacher", "type": "finetune_teacher", "training": {**TRAIN, "output_dir": "elsewhere"}}]
    with pytest.raises(ValueError, match="output_dir"):
        run_recipe(make_recipe(files, stages), tmp_path / "run")
    assert not (tmp_path / "run" / "teacher").exists()


# ------------------------------------------------------------------------------------------- vocabulary pruning


def vocab_files(root: Path) -> dict[str, Path]:
    """Train rows use w0-w19 only; eval rows also use w20-w29 (unseen in train); an extra corpus file adds w25."""
    root.mkdir(parents=True, exist_ok=True)
    train = ["sentence\tlabel"] + [f"w{i % 20} w{(i * 3) % 20} w{(i + 7) % 20}\t{i % 2}" for i in range(24)]
    evaluation = ["sentence\tlabel"] + [
        f"w{i % 20} w{20 + i % 10 if i % 3 == 0 else i % 7}\t{i % 2}" for i in range(18)
    ]
    (root / "train.tsv").write_text("\n".join(train) + "\n")
    (root / "eval.tsv").write_text("\n".join(evaluation) + "\n")
    (root / "extra.txt").write_text("w25 w1\n\n")
    return {"train": root / "train.tsv", "eval": root / "eval.tsv", "extra": root / "extra.txt"}


def vocab_recipe(files, data, stages):
    recipe = make_recipe(files, stages, teacher="classifier")
    recipe["data"].update(train=str(data["train"]), eval=str(data["eval"]))
    return recipe


def test_vocabulary_stage_then_int4_embeddings_evaluate_and_card(files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from hf_compress.quantization.quantize import Int8Embedding
    from hf_compress.recipes.plan import meta_model
    from hf_compress.recipes.stages.vocabulary import plan_vocabulary
    from hf_compress.recipes.validate import validate
    from hf_compress.reporting.measure import model_size_bytes

    data = vocab_files(tmp_path / "data")
    stages = [
        {"name": "student", "type": "distill", "student": {"num_layers": 2}, "training": TRAIN},
        {"name": "vocab", "type": "prune_vocabulary", "corpus_files": [str(data["extra"])]},
        {"name": "int4", "type": "quantize", "quantization": {"embedding_bits": 4}},
        {"type": "evaluate"},
        {"type": "card"},
    ]
    out = tmp_path / "run"
    reports = run_recipe(vocab_recipe(files, data, stages), out)
    assert [r["name"] for r in reports] == ["student", "vocab", "int4", "evaluate", "card"]

    # the vocabulary stage: 5 special tokens + w0-w19 (train) + w25 (corpus file); eval rows with w20-w29 but w25
    vocab = read_report(out / "vocab")
    original = tiny_tokenizer()
    kept = sorted([0, 1, 2, 3, 4] + original.convert_tokens_to_ids([f"w{i}" for i in range(20)] + ["w25"]))
    assert vocab["vocabulary"]["kept_ids"] == kept and vocab["vocabulary"]["kept_vocab_size"] == 26
    assert vocab["vocabulary"]["original_vocab_size"] == 64
    oov_rows = [i for i in range(18) if i % 3 == 0 and 20 + i % 10 != 25]
    coverage = vocab["eval_coverage"]
    assert coverage["sentences"] == 18 and coverage["sentences_with_removed"] == len(oov_rows)
    assert coverage["token_oov_rate"] == pytest.approx(len(oov_rows) / 36)
    assert coverage["top_removed"][0][0].startswith("w2")
    assert "w20 w25" not in json.dumps(vocab["vocabulary"])  # ids, not eval text, are recorded

    # the folder is a plain model + rewritten tokenizer: transformers loads it, same logits on kept words
    tokenizer = AutoTokenizer.from_pretrained(out / "vocab")
    model = AutoModelForSequenceClassification.from_pretrained(out / "vocab")
    assert len(tokenizer) == 26 and model.config.vocab_size == 26
    student = from_pretrained(out / "student")
    text = "w3 w19 w25 w0"
    with torch.no_grad():
        new = model(**tokenizer(text, return_tensors="pt")).logits
        old = student(**original(text, return_tensors="pt")).logits
    assert torch.allclose(new, old, atol=1e-5)
    classify = pipeline("text-classification", model=str(out / "vocab"))
    assert classify("w1 w2 w27")[0]["label"] in ("LABEL_0", "LABEL_1")

    # int4 embeddings through the pipeline: saved, reloaded, measured with the pruned tokenizer
    int4 = from_pretrained(out / "int4")
    embedding = int4.get_input_embeddings()
    assert isinstance(embedding, Int8Embedding) and embedding.bits == 4
    assert embedding.qweight.dtype == torch.uint8 and tuple(embedding.qweight.shape) == (26, 8)
    assert (out / "int4" / "tokenizer.json").read_text() == (out / "vocab" / "tokenizer.json").read_text()
    evaluation = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert list(evaluation["models"]) == ["teacher", "student", "vocab", "int4"]
    measured = evaluation["models"]["int4"]
    assert measured["weights_disk_bytes"] == (out / "int4" / "model.safetensors").stat().st_size
    assert measured["memory_bytes"] == model_size_bytes(int4)
    assert measured["metrics"] == read_report(out / "int4")["metrics"]
    sizes = [evaluation["models"][n]["weights_disk_bytes"] for n in ("teacher", "student", "vocab", "int4")]
    assert sizes == sorted(sizes, reverse=True) and measured["vs_teacher"]["size_x"] > 1
    assert "# tiny-int4" in (out / "int4" / "README.md").read_text()

    # `hf-compress check`'s dry run keeps exactly the ids the run kept
    recipe = validate(vocab_recipe(files, data, stages))
    meta, planned = plan_vocabulary(
        meta_model(str(files["classifier"]), "sequence-classification", 2), recipe, recipe.stage("vocab")
    )
    assert planned.kept_ids == kept and meta.get_input_embeddings().weight.shape == (26, 16)


def test_vocabulary_on_the_teacher_teaches_with_the_pruned_ids_and_resumes(files, tmp_path):
    data = vocab_files(tmp_path / "data")
    stages = [
        {"name": "vocab", "type": "prune_vocabulary"},
        {"name": "student", "type": "distill", "student": {"num_layers": 2}, "training": TRAIN},
        {"type": "evaluate"},
    ]
    out = tmp_path / "run"
    reports = run_recipe(vocab_recipe(files, data, stages), out)
    assert reports[0]["vocabulary"]["kept_vocab_size"] == 25  # no corpus file: w25 is not kept
    assert reports[1]["teacher"] == str(out / "vocab")  # the pruned teacher, same ids as its student
    assert from_pretrained(out / "student").config.vocab_size == 25
    evaluation = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert evaluation["models"]["teacher"]["path"] == str(files["classifier"].resolve())  # compared to the original
    assert evaluation["models"]["teacher"]["params"]["total"] > evaluation["models"]["vocab"]["params"]["total"]

    changed = [stages[0], {**stages[1], "training": {**TRAIN, "max_steps": 3}}, stages[2]]
    again = run_recipe(vocab_recipe(files, data, changed), out)
    assert [r["skipped"] for r in again] == [True, False, False]
    assert again[1]["teacher"] == str(out / "vocab") and again[1]["train"]["train_loss"] > 0


def test_export_onnx_stage_exports_the_float_stage_behind_int8_and_measures_both_graphs(files, tmp_path):
    pytest.importorskip("onnxruntime")
    one_shot = {"targets": {"heads": 0.5}, "schedule": "one_shot", "scope": "local"}
    stages = [
        {"name": "teacher", "type": "finetune_teacher", "training": TRAIN},
        {"name": "cut", "type": "prune", "recovery": "none", "pruning": one_shot},
        {"name": "int8", "type": "quantize"},
        {"name": "onnx", "type": "export_onnx", "export": {"opset": 17}},
    ]
    reports = run_recipe(make_recipe(files, stages), tmp_path / "run")
    export = reports[-1]
    folder = tmp_path / "run" / "onnx"
    assert export["source"] == "cut" and (folder / "onnx" / "model.onnx").is_file()
    assert (folder / "onnx" / "model_quantized.onnx").is_file() and (folder / "tokenizer.json").is_file()
    assert export["max_abs_diff"] < 1e-4  # checked against PyTorch after export
    for graph in ("onnx", "onnx_int8"):
        correct = export[graph]["metrics"]["accuracy"] * 32
        assert correct == pytest.approx(round(correct), abs=1e-9)
        assert set(export[graph]["latency_ms"]) == {"1", "32"} and export[graph]["bytes"] > 0
    assert export["onnx_int8"]["bytes"] == export["quantized_bytes"]  # tiny graphs: int8 overhead may outweigh
    with pytest.raises(RecipeError, match=r"`stages\[0\].export.opsett` is not a export_onnx\(\) field"):
        validate(make_recipe(files, [{"type": "export_onnx", "export": {"opsett": 17}}]))


def test_export_onnx_stage_values_are_checked_when_the_recipe_is_validated(files):
    teacher = {"name": "teacher", "type": "finetune_teacher", "training": TRAIN}
    recipe = validate(make_recipe(files, [teacher, {"type": "export_onnx", "export": {"embedding_bits": 4}}]))
    assert recipe.stages[1].export == {"embedding_bits": 4}
    with pytest.raises(RecipeError, match=r"`stages\[1\].export.embedding_bits` is 3; use one of \[4, 8\]"):
        validate(make_recipe(files, [teacher, {"type": "export_onnx", "export": {"embedding_bits": 3}}]))
