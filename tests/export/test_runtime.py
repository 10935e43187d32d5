"""ONNX Runtime helpers: accuracy on a tokenised dataset, latency per batch size, thread count, input feeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason='needs the ONNX extra: pip install "hf-compress[onnx]"')

from hf_compress.export import evaluate_onnx, export_onnx, onnx_latency, onnx_session, run_onnx  # noqa: E402
from hf_compress.export.runtime import batch_rows, pad_batch  # noqa: E402
from hf_compress.loading import from_pretrained  # noqa: E402
from tests.export.conftest import save_folder, tiny_classifier, wordpiece_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    folder = save_folder(tiny_classifier(), wordpiece_tokenizer(), tmp_path_factory.mktemp("runtime") / "model")
    return export_onnx(folder, quantize=False).model, folder


def rows(count: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        ids = torch.randint(5, 64, (3 + i % 5,), generator=g).tolist()
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "sentence": f"s{i}"})
    return out


def test_evaluate_onnx_matches_pytorch_predictions(graph):
    path, folder = graph
    dataset = rows()
    model = from_pretrained(folder)
    with torch.no_grad():
        labels = [int(model(input_ids=torch.tensor([r["input_ids"]])).logits.argmax()) for r in dataset]

    assert evaluate_onnx(path, [r | {"labels": y} for r, y in zip(dataset, labels)], batch_size=4) == {
        "accuracy": 1.0,
        "samples": 10,
    }
    flipped = [r | {"label": 1 - y} for r, y in zip(dataset, labels)]
    assert evaluate_onnx(path, flipped, label_column="label", num_threads=1)["accuracy"] == 0.0


def test_evaluate_onnx_errors(graph):
    path, _ = graph
    with pytest.raises(ValueError, match="`label_column` 'labels' is not a column"):
        evaluate_onnx(path, rows(2))
    with pytest.raises(ValueError, match="`dataset` has no rows"):
        evaluate_onnx(path, [])
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        evaluate_onnx(path, rows(2), batch_size=0)


def test_onnx_latency_per_batch_size(graph):
    path, _ = graph
    inputs = pad_batch(rows(3))
    latency = onnx_latency(path, inputs, batch_sizes=(1, 4), num_threads=1, repeats=3, warmup=1)
    assert set(latency) == {"1", "4"} and all(ms > 0 for ms in latency.values())
    with pytest.raises(ValueError, match="`batch_sizes` must be positive integers"):
        onnx_latency(path, inputs, batch_sizes=(0,))


def test_session_threads_and_feeds(graph, tmp_path):
    path, _ = graph
    session = onnx_session(path, num_threads=1)
    assert session.get_session_options().intra_op_num_threads == 1
    assert onnx_session(session) is session
    batch = batch_rows(pad_batch(rows(3)), 7)  # rows cycled, token_type_ids filled with zeros for the graph
    assert batch["input_ids"].shape[0] == 7 and np.array_equal(batch["input_ids"][3], batch["input_ids"][0])
    assert run_onnx(session, batch).shape == (7, 2)
    with pytest.raises(ValueError, match="`inputs` has no 'input_ids'"):
        run_onnx(session, {"attention_mask": batch["attention_mask"]})
    with pytest.raises(FileNotFoundError, match="`model` must be an existing .onnx file"):
        onnx_session(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="`num_threads` must be a positive integer, got 0"):
        onnx_session(path, num_threads=0)


def test_spinning_is_off_by_default(graph):
    path, _ = graph
    options = onnx_session(path).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = onnx_session(path, spinning=True).get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
