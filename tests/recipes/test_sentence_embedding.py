"""The `sentence-embedding` recipe task end to end on a tiny SentenceTransformer and tiny sentence pairs, and its
validation rules."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

pytest.importorskip("sentence_transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402

import hf_compress  # noqa: E402
from hf_compress.cli import main  # noqa: E402
from hf_compress.models.families import ffn_size, get_layers  # noqa: E402
from hf_compress.recipes.pipeline import read_report, run_recipe  # noqa: E402
from hf_compress.recipes.schema import RecipeError  # noqa: E402
from hf_compress.recipes.validate import validate  # noqa: E402
from tests.tiny_models import tiny_sentence_transformer  # noqa: E402

TRAIN = {"max_steps": 3, "per_device_train_batch_size": 8, "use_cpu": True, "learning_rate": 1e-3}


def _sentence(i: int) -> str:
    return " ".join(f"w{(7 * i + 3 * j) % 40 + 3}" for j in range(3 + i % 4))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SentenceTransformer teacher folder, a pairs tsv (train), the pairs in MRPC's txt format (eval)."""
    root = tmp_path_factory.mktemp("st_inputs")
    tiny_sentence_transformer(root / "bert").save(str(root / "teacher"))
    pairs = [(_sentence(i), _sentence(i if i % 2 else i + 11), i % 2) for i in range(24)]
    (root / "train.tsv").write_text("s1\ts2\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in pairs))
    mrpc = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
    mrpc += "".join(f"{y}\t{i}\t{i + 100}\t{a}\t{b}\r\n" for i, (a, b, y) in enumerate(pairs[:12]))
    (root / "eval.txt").write_text(mrpc, encoding="utf-8")
    return root


def _recipe(files, stages, **data):
    return {
        "name": "tiny-st",
        "seed": 0,
        "model": {"teacher": str(files / "teacher"), "task": "sentence-embedding"},
        "data": {
            "train": str(files / "train.tsv"),
            "eval": str(files / "eval.txt"),
            "text_column": "s1",
            "text_pair_column": "s2",
            **data,
        },
        "stages": stages,
    }


STAGES = [
    {"name": "vocab", "type": "prune_vocabulary"},
    {
        "name": "student",
        "type": "distill",
        "student": {"num_layers": 2},
        "training": {**TRAIN, "hidden_loss": "cosine"},
    },
    {
        "name": "pruned",
        "type": "prune",
        "pruning": {"targets": {"ffn_neurons": 0.5}, "schedule": "one_shot", "start_step": 1, "scope": "local"},
        "training": TRAIN,
    },
    {"name": "int8", "type": "quantize"},
    {"type": "evaluate"},
    {"type": "card"},
    {"name": "export", "type": "export_onnx", "export": {"quantize": False}},
]


def test_sentence_embedding_recipe_end_to_end(files, tmp_path):
    # train and eval share their column names here (the MRPC-formatted file is read in the next test)
    recipe = _recipe(files, STAGES)
    recipe["data"]["eval"] = str(files / "train.tsv")
    reports = {r["name"]: r for r in run_recipe(recipe, tmp_path / "out")}
    out = tmp_path / "out"
    assert reports["vocab"]["vocabulary"]["kept_vocab_size"] < reports["vocab"]["vocabulary"]["original_vocab_size"]
    for name in ("student", "pruned", "int8"):
        metrics = read_report(out / name)["metrics"]
        assert set(metrics) == {"cosine_accuracy", "cosine_ap", "cosine_f1"}
        assert 0.0 <= metrics["cosine_accuracy"] <= 1.0 and 0.0 < metrics["cosine_ap"] <= 1.0
    assert reports["student"]["train"]["train_loss"] > 0

    pruned = SentenceTransformer(str(out / "pruned"), device="cpu")  # uniform shapes: plain sentence-transformers
    assert len(get_layers(pruned)) == 2 and {ffn_size(pruned, i) for i in range(2)} == {16}
    assert type(pruned[1]).__name__ == "Pooling"
    final = hf_compress.from_pretrained(out / "int8", device="cpu")  # int8 modules: hf_compress's loader
    assert isinstance(final, SentenceTransformer)
    assert type(final[0].auto_model.encoder.layer[0].attention.self.query).__name__ == "Int8Linear"
    texts = [_sentence(i) for i in range(6)]
    similarity = torch.nn.functional.cosine_similarity(
        torch.as_tensor(final.encode(texts)), torch.as_tensor(pruned.encode(texts))
    )
    assert similarity.min() > 0.9  # int8 of the pruned student

    evaluation = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert evaluation["task"] == "sentence-embedding" and list(evaluation["models"])[0] == "teacher"
    assert "cosine_ap" in evaluation["models"]["teacher"]["metrics"]
    assert "cosine_accuracy" in evaluation["models"]["int8"]["vs_teacher"]["retention_pct"]
    assert evaluation["models"]["int8"]["latency_ms"].keys() == {"1", "32"}
    assert (out / "int8" / "README.md").is_file() and (out / "export" / "onnx" / "model.onnx").is_file()
    assert reports["export"]["source"] == "pruned"

    # the card of the final (int8) SentenceTransformer: sentence-transformers metadata, hf_compress's loader (plain
    # sentence-transformers cannot rebuild int8 modules), the pair metrics in the table and the model-index
    for rewritten in (False, True):  # the card stage's card, then `hf-compress card` rewriting it
        if rewritten:
            assert main(["card", str(out)]) == 0
        card = ModelCard.load(out / "int8" / "README.md")
        assert card.data.library_name == "sentence-transformers" and card.data.pipeline_tag == "sentence-similarity"
        assert {"sentence-transformers", "feature-extraction", "quantization"} <= set(card.data.tags)
        assert 'model = hf_compress.from_pretrained("tiny-st-int8")  # a SentenceTransformer' in card.text
        assert 'SentenceTransformer("tiny-st-int8")' not in card.text
        header = next(line for line in card.text.splitlines() if line.startswith("| model |"))
        for name in ("cosine_accuracy", "cosine_ap", "cosine_f1", "cosine_ap retention"):
            assert f"| {name} |" in header
        assert {r.metric_type for r in card.data.eval_results} == {"cosine_accuracy", "cosine_ap", "cosine_f1"}


def test_sentence_embedding_recipe_reads_mrpc_files_and_checks(files, capsys):
    recipe = _recipe(files, STAGES[:2], text_column="#1 String", text_pair_column="#2 String", label_column="Quality")
    recipe["data"]["train"] = recipe["data"]["eval"]
    assert validate(recipe).data.label_column == "Quality"
    path = files / "st.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "vocab: vocabulary 64 ->" in out and "\nstudent " in out and "recipe 'tiny-st' is valid." in out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"text_pair_column": None}}, "`data.text_pair_column` is missing"),
        ({"model": {"num_labels": 2}}, "`model.num_labels` is 2 but `model.task` is 'sentence-embedding'"),
        ({"stages": [{"type": "finetune_teacher"}]}, "not supported for 'sentence-embedding'"),
        ({"stages": [{"type": "distill", "training": {"alpha": 0.5}}]}, "`stages[0].training.alpha` does not apply"),
        ({"model": {"teacher": "bert"}}, "has no modules.json"),
    ],
)
def test_sentence_embedding_recipe_refusals(files, change, message):
    recipe = _recipe(files, [{"type": "distill", "student": {"num_layers": 2}}])
    for section, values in change.items():
        if section == "stages":
            recipe["stages"] = values
        else:
            recipe[section].update({k: str(files / v) if k == "teacher" else v for k, v in values.items()})
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate(recipe)
