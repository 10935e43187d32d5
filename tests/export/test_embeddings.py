"""The 4-bit word-embedding table of ONNX graphs (``embedding_bits=4``): the same numbers as our PyTorch int4 table,
standard operators only, smaller files, and clear refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the ONNX export needs the [onnx] extra")
import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

from hf_compress.export import export_onnx, onnx_session, run_onnx  # noqa: E402
from hf_compress.export.embeddings import quantize_word_embeddings, word_embedding_gather  # noqa: E402
from hf_compress.loading import from_pretrained  # noqa: E402
from hf_compress.quantization.layers import Int8Embedding  # noqa: E402
from hf_compress.recipes.validate import RecipeError, check_export_values  # noqa: E402
from tests.export.conftest import save_folder  # noqa: E402
from tests.export.test_onnx import pytorch_logits, random_rows  # noqa: E402
from tests.tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

STANDARD_OPS = {"Gather", "Cast", "Div", "Floor", "Mul", "Sub", "Add", "Unsqueeze", "Concat", "Reshape"}


def test_decoded_graph_equals_pytorch_with_the_int4_table(pruned_folder):
    """Oracle: the graph with only its table swapped == the PyTorch model with `Int8Embedding(bits=4)` swapped in."""
    result = export_onnx(pruned_folder, quantize=False)
    graph = onnx.load(result.model)
    table = word_embedding_gather(graph).input[0]
    float_graph = copy.deepcopy(graph)

    added = quantize_word_embeddings(graph, group_size=32)

    assert table not in {init.name for init in graph.graph.initializer}  # the fp32 table is gone
    new_nodes = [node for node in graph.graph.node if node.name in added]
    assert len(new_nodes) == len(added) and {node.op_type for node in new_nodes} <= STANDARD_OPS
    assert all(node.domain in ("", "ai.onnx") for node in graph.graph.node)  # no contrib operator
    onnx.checker.check_model(graph)
    path = Path(result.model).with_name("q4_only.onnx")
    onnx.save(graph, str(path))

    model = from_pretrained(pruned_folder).eval()
    embeddings = model.bert.embeddings
    embeddings.word_embeddings = Int8Embedding.from_float(embeddings.word_embeddings, bits=4, group_size=32)
    inputs = random_rows()
    with torch.no_grad():
        reference = model(**inputs).logits.numpy()
    got = run_onnx(onnx_session(path), inputs)
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=1e-3)
    float_logits = run_onnx(onnx_session(result.model), inputs)
    assert not np.allclose(got, float_logits, atol=1e-6)  # the table really changed
    assert len(float_graph.graph.node) + len(added) - 1 == len(graph.graph.node)


def test_export_with_4_bit_embeddings_is_smaller_and_agrees(tmp_path, tokenizer):
    # a table large enough to dominate the graph, as after vocabulary pruning of a real model (ids past the
    # tokenizer's are never looked up, but they are stored)
    model = tiny_model("bert", "seq_cls", num_labels=2, hidden_size=64, intermediate_size=128, vocab_size=4000)
    folder = save_folder(model, tokenizer, tmp_path / "model")
    int8 = export_onnx(folder, tmp_path / "int8")
    int4 = export_onnx(folder, tmp_path / "int4", embedding_bits=4, embedding_group_size=32)

    # 4000 x 64 int8 = 256 kB -> 128 kB of codes + 32 kB of fp16 scales and offsets
    assert int8.quantized_bytes - int4.quantized_bytes > 80_000
    graph = onnx.load(int4.quantized)
    assert "MatMulInteger" in {node.op_type for node in graph.graph.node}  # the Linear weights are still int8
    inputs = random_rows()
    reference = pytorch_logits(folder, inputs)
    got = run_onnx(onnx_session(int4.quantized), inputs)
    assert (got.argmax(-1) == reference.argmax(-1)).mean() >= 0.8
    assert np.abs(got - reference).max() < 0.1
    assert int4.quantized_argmax_agreement is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embedding_bits": 3}, "`embedding_bits` must be one of"),
        ({"embedding_bits": 4, "quantize": False}, "needs `quantize=True`"),
        ({"embedding_bits": 4, "embedding_group_size": 48}, "even divisor of the 64 columns"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(tmp_path, pruned_folder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(pruned_folder, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out" / "onnx").exists()


def test_tied_lm_head_is_refused(tmp_path):
    model = tiny_model("llama", "causal_lm", tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    folder = save_folder(model, tiny_tokenizer(), tmp_path / "llama")
    with pytest.raises(ValueError, match="tied to its LM head"):
        export_onnx(folder, tmp_path / "out", embedding_bits=4, check_texts=("w1 w2", "w3 w4 w5"))
    assert not (tmp_path / "out" / "onnx").exists()


def test_graph_whose_table_feeds_another_node_is_refused():
    table = numpy_helper.from_array(np.zeros((10, 4), dtype=np.float32), "table")
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["rows"], name="lookup"),
        helper.make_node("MatMul", ["rows", "table_t"], ["logits"], name="head"),
        helper.make_node("Transpose", ["table"], ["table_t"], name="tie"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", "s", 10])],
        [table],
    )
    with pytest.raises(ValueError, match="also feeds"):
        quantize_word_embeddings(helper.make_model(graph))
    with pytest.raises(ValueError, match="exactly one Gather"):
        word_embedding_gather(helper.make_model(graph), input_name="ids")


@pytest.mark.parametrize(
    "export, match",
    [
        ({"embedding_bits": 2}, "embedding_bits` is 2"),
        ({"embedding_bits": 4, "quantize": False}, "quantize` is false"),
        ({"embedding_group_size": 7}, "embedding_group_size` must be an even integer such as 64 or 32, got 7"),
    ],
)
def test_recipe_values_are_checked_before_training(export, match):
    with pytest.raises(RecipeError, match=match):
        check_export_values(export, "stages[5].export")
    check_export_values({"embedding_bits": 4, "embedding_group_size": 32}, "stages[5].export")  # valid: no error
