import json
from pathlib import Path

import pytest
import transformers
from huggingface_hub import ModelCard

from hf_compress.quantization.quantize import quantize_model
from hf_compress.reporting.cards import (
    card_base_model,
    load_code,
    needs_hf_compress,
    render_card,
    write_card,
)
from hf_compress.reporting.training_section import training_section
from tests.tiny_models import tiny_model

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[2]


def _report(nonzero, disk, ms, accuracy, quantized=False):
    return {
        "params": {"total": 1000, "nonzero": nonzero},
        "sparsity": 1 - nonzero / 1000,
        "linear_sparsity": 1 - nonzero / 1000,
        "memory_bytes": disk,
        "disk_bytes": disk,
        "quantized": quantized,
        "latency_ms": {"1": ms, "32": 10 * ms},
        "metrics": {"eval_accuracy": accuracy, "eval_runtime": 1.0},
        "latency_setup": {"device": "cpu", "threads": 2, "cpu": "x86_64", "repeats": 10},
    }


TEACHER = _report(1000, 4_000_000, 8.0, 0.90)
STUDENT = _report(400, 1_000_000, 2.0, 0.88, quantized=True)


def test_render_card_metadata_and_model_index():
    card = render_card(
        "tiny-student",
        base_model="org/teacher",
        datasets=["glue"],
        report=STUDENT,
        reference_report=TEACHER,
        config={"architectures": ["BertForSequenceClassification"]},
    )
    data = card.data.to_dict()
    assert data["base_model"] == "org/teacher" and data["datasets"] == ["glue"]
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert data["tags"] == ["distillation", "pruning", "hf-compress", "quantization"]
    results = data["model-index"][0]["results"]
    assert data["model-index"][0]["name"] == "tiny-student"
    assert [(m["type"], m["value"]) for m in results[0]["metrics"]] == [("accuracy", 0.88)]  # no eval_runtime
    assert results[0]["dataset"]["name"] == "glue" and results[0]["task"]["type"] == "text-classification"
    reparsed = ModelCard(str(card))  # the YAML header parses back
    assert reparsed.data.eval_results[0].metric_value == 0.88


def test_render_card_body_table_recipe_limitations():
    card = render_card(
        "tiny-student",
        base_model="org/teacher",
        datasets="glue",
        report=STUDENT,
        reference_report=TEACHER,
        recipe={"distill": {"temperature": 2.0}},
    )
    text = card.text
    assert "# tiny-student" in text
    assert "| org/teacher (reference) | 1,000 | 4.0 MB | 0.0% | 8.0 ms | 80.0 ms | 0.9 |" in text
    assert "| tiny-student | 400 | 1.0 MB | 60.0% | 2.0 ms | 20.0 ms | 0.88 | 4.00x | 4.00x | 4.00x | 97.8% |" in text
    assert "```yaml\ndistill:\n  temperature: 2.0\n```" in text
    assert "Unstructured sparsity is stored as explicit zeros" in text
    assert "Int8 weights target CPU inference" in text
    assert "threads: 2" in text


def test_plain_card_has_no_quantization_tag_and_uses_auto_class():
    config = {"architectures": ["LlamaForCausalLM"]}
    card = render_card("plain", report={**TEACHER, "quantized": False}, config=config, repo_id="me/plain")
    assert "quantization" not in card.data.tags and card.data.pipeline_tag == "text-generation"
    expected = (
        'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("me/plain")'
    )
    assert expected in card.text
    assert "Int8 weights" not in card.text and "Unstructured sparsity" not in card.text
    assert card.data.eval_results is None  # no datasets: no model-index
    assert "## Recipe" not in card.text


def test_load_code_detects_hf_compress_records():
    assert needs_hf_compress({"hf_compress": {"layers": []}})
    assert needs_hf_compress({"hf_compress_quantization": {"method": "hf_compress_int8"}})
    assert not needs_hf_compress({"architectures": ["BertModel"]})
    code = load_code("me/m", {"architectures": ["BertModel"], "hf_compress": {"layers": []}})
    assert code.startswith('import hf_compress\n\nmodel = hf_compress.from_pretrained("me/m")')
    assert load_code("me/m", {"architectures": ["BertModel"]}).endswith('AutoModel.from_pretrained("me/m")')


def test_write_card_reads_config_of_a_quantized_folder(tmp_path):
    quantize_model(tiny_model("bert", "seq_cls")).save_pretrained(tmp_path)
    card = write_card(tmp_path, model_name="tiny-int8", datasets=["glue"], report=STUDENT, repo_id="me/tiny-int8")
    written = (tmp_path / "README.md").read_text()
    assert written == str(card)
    assert 'hf_compress.from_pretrained("me/tiny-int8")' in written
    assert "quantization" in ModelCard.load(tmp_path / "README.md").data.tags


def test_card_errors(tmp_path):
    with pytest.raises(ValueError, match="`model_name` must be a non-empty string"):
        render_card("  ")
    with pytest.raises(TypeError, match="`report` must be a dict, got list"):
        render_card("m", report=[1])
    with pytest.raises(FileNotFoundError, match="`folder` must be an existing model folder"):
        write_card(tmp_path / "missing")


def test_card_json_config_roundtrip_of_real_folder(tmp_path):
    model = tiny_model("distilbert", "masked_lm")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    card = render_card("m", config=config)
    assert card.data.pipeline_tag == "fill-mask" and "AutoModelForMaskedLM" in card.text


def test_render_card_training_section_tags_and_reference_name():
    student = {key: value for key, value in STUDENT.items() if not key.startswith("latency")}
    teacher = {key: value for key, value in TEACHER.items() if not key.startswith("latency")}
    student, teacher = {**student, "quantized": False}, {**teacher, "quantized": False}
    del student["disk_bytes"], teacher["disk_bytes"]
    card = render_card(
        "s",
        base_model="org/t",
        report=student,
        reference_report=teacher,
        tags=["pruning"],
        reference_name="org/t (teacher)",
        training=training_section(3, final=False),
    )
    assert card.data.tags == ["pruning", "hf-compress"] and "with pruning." in card.text
    assert "| org/t (teacher) | 1,000 |" in card.text
    assert "## Training\n\n**Status:** Checkpoint saved at step 3, while" in card.text
    assert "Sizes are the bytes of the weights in memory. Latency was not measured." in card.text
    assert "one machine's medians" not in card.text  # no latency column, no latency caveat
    assert "\n\n\n" not in card.text
    assert "## Training" not in render_card("s", report=student).text


def test_card_base_model_is_the_first_hub_id(tmp_path):
    local = tmp_path / "teacher"
    local.mkdir()
    assert card_base_model(str(local), "org/student") == "org/student"  # a local folder has no Hub page
    assert card_base_model("org/teacher", "org/student") == "org/teacher"
    assert card_base_model(None, "./student", "not a/valid/id") is None


def test_load_code_of_an_exported_folder_shows_onnx_runtime_and_transformers_js():
    code = load_code("me/tiny", {"architectures": ["BertForSequenceClassification"]}, onnx=True)
    assert "AutoModelForSequenceClassification.from_pretrained" in code
    assert 'ORTModelForSequenceClassification.from_pretrained("me/tiny", subfolder="onnx"' in code
    assert 'pipeline("text-classification", "me/tiny", { dtype: "q8" })' in code
    assert "ORTModel" not in load_code("me/tiny", {"architectures": ["BertForSequenceClassification"]})
