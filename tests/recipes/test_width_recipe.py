"""The stage sequence of recipes/minilm_sst2_25x.yaml end to end on a tiny BERT: vocabulary pruning, a 2-layer
student, heads + FFN neurons + hidden channels pruned while distilling, int8 / 4-bit embeddings, ONNX export."""

from __future__ import annotations

import pytest
import torch
import yaml

from hf_compress.loading import from_pretrained
from hf_compress.models.families import ffn_size, get_layers, head_counts
from hf_compress.recipes.pipeline import run_recipe
from hf_compress.recipes.schema import REPO_ROOT
from hf_compress.reporting.measure import model_size_bytes
from tests.conftest import write_tsv
from tests.tiny_models import tiny_model, tiny_tokenizer

TRAIN = {
    "max_steps": 4,
    "per_device_train_batch_size": 8,
    "use_cpu": True,
    "learning_rate": 1e-3,
    "disable_tqdm": True,
}


def test_width_recipe_stages_shrink_every_axis_reload_and_export(tmp_path):
    pytest.importorskip("onnxruntime")
    shipped = yaml.safe_load((REPO_ROOT / "recipes" / "minilm_sst2_25x.yaml").read_text())
    pruning = next(s for s in shipped["stages"] if s["type"] == "prune")["pruning"]
    assert set(pruning["targets"]) == {"heads", "ffn_neurons", "hidden"}  # the shipped recipe prunes all three
    shipped_export = next(s for s in shipped["stages"] if s["type"] == "export_onnx").get("export", {})

    # 96 -> 64 channels: a width the 4-bit groups of 64 divide and 6 heads do not (BERT then builds only from the
    # recorded head width, as the 25x recipe's 384 -> 256 with 12 heads)
    teacher = tiny_model("bert", "seq_cls", num_labels=2, hidden_size=96, num_attention_heads=6, intermediate_size=64)
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    tsv = write_tsv(tmp_path / "train.tsv", rows=32)
    stages = [
        {"name": "vocab", "type": "prune_vocabulary", "vocabulary": {"min_count": 1}},
        {"name": "student", "type": "distill", "student": {"num_layers": 2}, "training": TRAIN},
        {
            "name": "pruned",
            "type": "prune",
            "recovery": "distill",
            "training": TRAIN,
            "pruning": {**pruning, "schedule": "cubic", "end_step": 2, "frequency": 1},
        },
        {"name": "int4", "type": "quantize", "quantization": {"include_embeddings": True, "embedding_bits": 4}},
        {"type": "evaluate"},
        {"name": "onnx", "type": "export_onnx", "export": shipped_export},  # the shipped settings
    ]
    recipe = {
        "name": "tiny-25x",
        "seed": 0,
        "model": {"teacher": str(tmp_path / "teacher")},
        "data": {"train": str(tsv), "eval": str(tsv), "text_column": "sentence", "max_length": 16},
        "stages": stages,
    }
    reports = run_recipe(recipe, tmp_path / "run")

    pruned = from_pretrained(tmp_path / "run" / "pruned").eval()
    assert pruned.config.hidden_size == 96 - round(pruning["targets"]["hidden"] * 96) == 64
    assert pruned.bert.embeddings.word_embeddings.weight.shape[1] == pruned.config.hidden_size
    assert pruned.classifier.in_features == pruned.config.hidden_size
    assert sum(head_counts(pruned, i)[0] for i in range(2)) == 6  # half of 2 layers x 6 heads
    assert sum(ffn_size(pruned, i) for i in range(2)) == 128 - round(pruning["targets"]["ffn_neurons"] * 128)
    student = from_pretrained(tmp_path / "run" / "student")
    assert student.config.hidden_size == 96 and len(get_layers(pruned)) == 2

    ids = torch.randint(5, pruned.config.vocab_size, (2, 7))
    again = from_pretrained(tmp_path / "run" / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(pruned(input_ids=ids).logits, again(input_ids=ids).logits)

    export = reports[-1]
    assert export["source"] == "pruned" and export["max_abs_diff"] < 1e-4
    assert export["onnx_int8"]["bytes"] < export["onnx"]["bytes"]
    sizes = {
        name: model_size_bytes(from_pretrained(tmp_path / "run" / name)) for name in ("student", "pruned", "int4")
    }
    assert sizes["int4"] < sizes["pruned"] < sizes["student"]
    int4 = from_pretrained(tmp_path / "run" / "int4")
    assert int4.config.hidden_size == 64 and int4.classifier.in_features == 64  # int8 on the recorded shapes
