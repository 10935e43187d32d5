import json

import pytest
import torch
import transformers
from torch import nn

from hf_compress.quantization.quantize import quantize_model
from hf_compress.reporting.measure import (
    compare,
    count_parameters,
    dummy_inputs,
    folder_size_bytes,
    format_table,
    human_bytes,
    measure_latency,
    model_report,
    model_size_bytes,
    quality_metrics,
    summary_row,
)
from tests.tiny_models import tiny_inputs, tiny_model

transformers.logging.set_verbosity_error()


def test_count_parameters_counts_zeros_and_linear_weights():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    with torch.no_grad():
        model[0].weight[0].zero_()  # 4 of 12 linear weights
        model[0].bias.fill_(1.0)
    counts = count_parameters(model)
    assert counts["total"] == 12 + 3 + 3 + 3
    assert counts["linear_total"] == 12 and counts["linear_nonzero"] == 8
    assert counts["nonzero"] == 8 + 3 + 3  # LayerNorm bias is zero-initialised


def test_count_parameters_sees_through_int8_modules():
    float_counts = count_parameters(tiny_model("bert", "seq_cls"))
    int8_counts = count_parameters(quantize_model(tiny_model("bert", "seq_cls")))
    assert int8_counts["total"] == float_counts["total"]
    assert int8_counts["linear_total"] == float_counts["linear_total"]


def test_folder_size_bytes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("abc")
    assert folder_size_bytes(tmp_path) == 105
    assert folder_size_bytes(tmp_path, weights_only=True) == 100
    with pytest.raises(FileNotFoundError, match="must be an existing folder"):
        folder_size_bytes(tmp_path / "missing")


def test_measure_latency_runs_repeats_plus_warmup_and_restores_mode():
    model = tiny_model("bert", "seq_cls").train()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    result = measure_latency(model, tiny_inputs(), repeats=3, warmup=1)
    assert len(calls) == 4 and result["repeats"] == 3
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["max_ms"]
    assert model.training
    with pytest.raises(ValueError, match="`repeats` must be a positive integer, got 0"):
        measure_latency(model, tiny_inputs(), repeats=0)
    with pytest.raises(ValueError, match="`inputs` must be a non-empty dict"):
        measure_latency(model, {})


def test_model_report_is_json_and_times_each_batch_size(tmp_path):
    model = tiny_model("bert", "seq_cls")
    model.save_pretrained(tmp_path)
    batch_sizes = []
    model.register_forward_hook(
        lambda mod, args, kwargs, out: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    report = model_report(
        model,
        tmp_path,
        eval_fn=lambda m: {"eval_accuracy": 0.5, "name": "x"},
        latency_inputs=tiny_inputs(batch=3),
        batch_sizes=(1, 32),
        repeats=2,
    )
    assert set(batch_sizes) == {1, 32}
    assert json.loads(json.dumps(report)) == report
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert report["disk_bytes"] == folder_size_bytes(tmp_path) > report["weights_disk_bytes"] > 0
    assert set(report["latency_ms"]) == {"1", "32"} and report["latency_setup"]["repeats"] == 2
    assert report["metrics"] == {"eval_accuracy": 0.5} and report["quantized"] is False


def test_model_report_without_timing_uses_dummy_inputs_only_when_asked():
    report = model_report(tiny_model("llama", "causal_lm"), batch_sizes=())
    assert "latency_ms" not in report and "disk_bytes" not in report
    assert model_report(tiny_model("llama"), batch_sizes=(2,), repeats=1)["latency_ms"]["2"] > 0
    with pytest.raises(ValueError, match="`batch_sizes` must be positive integers"):
        model_report(tiny_model("llama"), batch_sizes=(0,))
    with pytest.raises(TypeError, match="`eval_fn` must return a dict"):
        model_report(tiny_model("llama"), batch_sizes=(), eval_fn=lambda m: 0.5)


def _report(disk, latency, metrics, nonzero=100):
    return {
        "params": {"total": 100, "nonzero": nonzero},
        "sparsity": 1 - nonzero / 100,
        "linear_sparsity": 1 - nonzero / 100,
        "memory_bytes": disk * 2,
        "disk_bytes": disk,
        "latency_ms": latency,
        "metrics": metrics,
    }


def test_compare_ratios_and_retention():
    teacher = _report(400, {"1": 10.0, "32": 100.0}, {"eval_accuracy": 0.9, "eval_loss": 0.2, "eval_runtime": 3.0})
    student = _report(
        100, {"1": 5.0, "32": 25.0}, {"eval_accuracy": 0.81, "eval_loss": 0.4, "eval_runtime": 1.0}, nonzero=50
    )
    ratios = compare(teacher, student)
    assert ratios["size_x"] == 4.0 and ratios["size_basis"] == "disk"
    assert ratios["params_x"] == 2.0 and ratios["sparsity"] == 0.5
    assert ratios["speedup_x"] == {"1": 2.0, "32": 4.0}
    assert ratios["retention_pct"]["eval_accuracy"] == pytest.approx(90.0)
    assert ratios["retention_pct"]["eval_loss"] == pytest.approx(50.0)  # lower is better: inverted
    assert "eval_runtime" not in ratios["retention_pct"]
    del student["disk_bytes"]
    assert compare(teacher, student)["size_basis"] == "memory"
    with pytest.raises(ValueError, match="`report` must be a dict returned by `model_report`"):
        compare(teacher, {"size": 1})


def test_quality_metrics_drops_trainer_bookkeeping():
    metrics = {"eval_accuracy": 1.0, "eval_runtime": 2.0, "eval_samples_per_second": 3.0, "epoch": 1.0}
    assert quality_metrics(metrics) == {"eval_accuracy": 1.0}


def test_summary_row_and_format_table():
    teacher = _report(4_000_000, {"1": 10.0}, {"eval_accuracy": 0.9})
    student = _report(1_000_000, {"1": 5.0}, {"eval_accuracy": 0.9}, nonzero=50)
    rows = [summary_row("teacher", teacher), summary_row("student", student, reference=teacher)]
    assert rows[1]["size"] == "1.0 MB" and rows[1]["size x"] == "4.00x"
    assert rows[1]["eval_accuracy retention"] == "100.0%" and rows[1]["sparsity (linear)"] == "50.0%"
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["model", "params"] and set(lines[1]) <= {"-", " "}
    assert lines[3].startswith("student") and "4.00x" in lines[3] and "4.00x" not in lines[2]
    assert lines[3].index("1.0 MB") == lines[0].index("size")  # columns are aligned
    markdown = format_table([{"a": 1_000, "b": 0.123456}, {"a": None}], markdown=True).splitlines()
    assert markdown == ["| a | b |", "|---|---|", "| 1,000 | 0.1235 |", "| - |  |"]
    with pytest.raises(TypeError, match="`rows` must be a list of dicts"):
        format_table({"a": 1})


def test_model_size_bytes_counts_shared_tensors_once_and_persistent_buffers():
    model = tiny_model("gpt2", "causal_lm")  # lm_head is tied to the word embeddings
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n in model.state_dict())
    assert model_size_bytes(model) == sum(unique.values()) + buffers
    linear = nn.Linear(4, 2)
    linear.register_buffer("scale", torch.ones(3))  # persistent: counted
    linear.register_buffer("cache", torch.ones(5), persistent=False)  # not saved: not counted
    assert model_size_bytes(linear) == (8 + 2 + 3) * 4
    with pytest.raises(TypeError, match="`model` must be a torch `nn.Module`"):
        model_size_bytes("bert")


def test_dummy_inputs_are_fixed_in_range_and_skip_the_first_ids():
    a, b = dummy_inputs(50, batch_size=3, seq_len=6), dummy_inputs(50, batch_size=3, seq_len=6)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape == (3, 6)
    assert a["input_ids"].min() >= 5 and a["input_ids"].max() < 50 and a["attention_mask"].sum() == 18
    assert dummy_inputs(2)["input_ids"].eq(1).all()  # a tiny vocabulary still gets valid ids
    with pytest.raises(ValueError, match="`vocab_size` must be a positive integer, got 0"):
        dummy_inputs(0)


def test_model_report_times_default_inputs_only_with_a_vocab_size():
    with pytest.raises(ValueError, match="`latency_inputs` must be given"):
        model_report(nn.Linear(4, 2), batch_sizes=(1,), repeats=1)
    report = model_report(nn.Linear(4, 2), latency_inputs={"input": torch.ones(1, 4)}, batch_sizes=(3,), repeats=1)
    assert set(report["latency_ms"]) == {"3"}


@pytest.mark.parametrize(("n", "text"), [(999, "999 B"), (1000, "1.0 KB"), (25_300_000, "25.3 MB"), (2e9, "2.0 GB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text
