"""A 4-bit word-embedding table inside an exported ONNX graph, in standard ONNX operators only.

ONNX Runtime's dynamic quantisation stores the word-embedding table as int8, and after vocabulary, depth and width
pruning that table is the largest tensor of a small encoder (11.5k x 384 int8 = 4.4 MB of a 7.6 MB graph). This module
replaces the graph's ``Gather(word_embeddings, input_ids)`` by the same rows decoded from the 4-bit table of
:func:`hf_compress.quantization.layers.quantize_groups` (the one our PyTorch ``Int8Embedding(bits=4)`` uses:
asymmetric codes, fp16 scale and offset per group of columns, least-squares clipping), so the ONNX artefact and the
PyTorch int4 folder hold the same numbers::

    packed = Gather(codes[V, H/2] uint8, input_ids)             # two 4-bit codes a byte, low nibble = even column
    high = Floor(packed / 16); low = packed - 16 * high         # as float: no bitwise operators needed
    rows = (Concat(low, high) - 8) * Gather(scale) + Gather(offset)

Only ``Gather``, ``Cast``, ``Div``, ``Floor``, ``Mul``, ``Sub``, ``Add``, ``Unsqueeze``, ``Concat`` and ``Reshape``:
every ONNX runtime (ONNX Runtime CPU, onnxruntime-web / transformers.js) runs it, no contrib operator. Run this on the
float graph before :func:`onnxruntime.quantization.quantize_dynamic`, excluding the returned node names, so the
Linear weights still become int8. Pure graph surgery on an ``onnx.ModelProto``: no Trainer, no file I/O.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hf_compress.quantization.layers import check_group_size, quantize_groups

__all__ = ["EMBEDDING_BITS", "quantize_word_embeddings", "word_embedding_gather"]

EMBEDDING_BITS = (4, 8)  # 8: ONNX Runtime's own int8 Gather; 4: this module's table


def _initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def word_embedding_gather(model: Any, input_name: str = "input_ids") -> Any:
    """The one ``Gather`` node that reads a 2-D initializer at the graph input ``input_name``.

    Raises a ValueError naming what was found when there is none or more than one, or when the table also feeds
    another node (an LM head tied to the embeddings: its 4-bit copy would have to serve a matmul too).
    """
    inits = _initializers(model)
    found = [
        node
        for node in model.graph.node
        if node.op_type == "Gather"
        and len(node.input) == 2
        and node.input[1] == input_name
        and node.input[0] in inits
        and len(inits[node.input[0]].dims) == 2
    ]
    if len(found) != 1:
        raise ValueError(
            f"`embedding_bits=4` needs exactly one Gather of a 2-D weight at the graph input {input_name!r}; found "
            f"{len(found)} ({[n.name for n in found]}). Export with `embedding_bits=8`."
        )
    node = found[0]
    users = [n.name for n in model.graph.node if n is not node and node.input[0] in n.input]
    if users or node.input[0] in {o.name for o in model.graph.output}:
        raise ValueError(
            f"`embedding_bits=4`: the word-embedding table {node.input[0]!r} also feeds {users or 'a graph output'} "
            "(an LM head tied to the embeddings); export with `embedding_bits=8`."
        )
    return node


def quantize_word_embeddings(model: Any, group_size: int = 64, input_name: str = "input_ids") -> list[str]:
    """Replace the word-embedding ``Gather`` of ``model`` (an ``onnx.ModelProto``, edited in place) by a 4-bit table.

    Args:
        model (`onnx.ModelProto`):
            A float graph from :func:`hf_compress.export.export_onnx` (or any graph whose embedding lookup is a
            ``Gather`` of a 2-D initializer at ``input_name``).
        group_size (`int`, *optional*, defaults to 64):
            Columns per fp16 scale / offset pair; must be an even divisor of the hidden size.
        input_name (`str`, *optional*, defaults to `"input_ids"`):
            The graph input holding the token ids.

    Returns:
        `list[str]`: The names of the nodes added, to pass as `nodes_to_exclude` to ONNX Runtime's quantiser.

    Example:

    >>> import onnx
    >>> from hf_compress.export.embeddings import quantize_word_embeddings
    >>> graph = onnx.load("out/pruned/onnx/model.onnx")  # doctest: +SKIP
    >>> added = quantize_word_embeddings(graph)  # doctest: +SKIP
    """
    from onnx import TensorProto, helper, numpy_helper

    node = word_embedding_gather(model, input_name)
    inits = _initializers(model)
    table = numpy_helper.to_array(inits[node.input[0]])
    cols = table.shape[1]
    check_group_size(group_size, cols)
    packed, scale, offset = (t.numpy() for t in quantize_groups(torch.from_numpy(np.array(table)), group_size))
    base = node.input[0].replace("/", "_").replace(".", "_") + "_q4"
    groups = cols // group_size
    constants = {
        f"{base}_codes": packed.astype(np.uint8),
        f"{base}_scale": scale.astype(np.float16),
        f"{base}_offset": offset.astype(np.float16),
        f"{base}_16": np.array(16.0, dtype=np.float32),
        f"{base}_8": np.array(8.0, dtype=np.float32),
        f"{base}_axis": np.array([-1], dtype=np.int64),
        f"{base}_grouped": np.array([0, 0, groups, group_size], dtype=np.int64),
        f"{base}_flat": np.array([0, 0, cols], dtype=np.int64),
    }
    n = lambda suffix: f"{base}_{suffix}"  # noqa: E731  (tensor / node names of the decode sub-graph)
    ids = node.input[1]
    steps = [
        ("Gather", [n("codes"), ids], [n("packed")], {}),
        ("Cast", [n("packed")], [n("packed_f")], {"to": TensorProto.FLOAT}),
        ("Div", [n("packed_f"), n("16")], [n("high_div")], {}),
        ("Floor", [n("high_div")], [n("high")], {}),
        ("Mul", [n("high"), n("16")], [n("high16")], {}),
        ("Sub", [n("packed_f"), n("high16")], [n("low")], {}),
        ("Unsqueeze", [n("low"), n("axis")], [n("low_u")], {}),
        ("Unsqueeze", [n("high"), n("axis")], [n("high_u")], {}),
        ("Concat", [n("low_u"), n("high_u")], [n("pairs")], {"axis": -1}),
        ("Reshape", [n("pairs"), n("grouped")], [n("nibbles")], {}),
        ("Sub", [n("nibbles"), n("8")], [n("codes_f")], {}),
        ("Gather", [n("scale"), ids], [n("scale_rows16")], {}),
        ("Cast", [n("scale_rows16")], [n("scale_rows")], {"to": TensorProto.FLOAT}),
        ("Unsqueeze", [n("scale_rows"), n("axis")], [n("scale_u")], {}),
        ("Gather", [n("offset"), ids], [n("offset_rows16")], {}),
        ("Cast", [n("offset_rows16")], [n("offset_rows")], {"to": TensorProto.FLOAT}),
        ("Unsqueeze", [n("offset_rows"), n("axis")], [n("offset_u")], {}),
        ("Mul", [n("codes_f"), n("scale_u")], [n("scaled")], {}),
        ("Add", [n("scaled"), n("offset_u")], [n("decoded")], {}),
        ("Reshape", [n("decoded"), n("flat")], [node.output[0]], {}),
    ]
    added = [helper.make_node(op, inputs, outputs, name=f"{outputs[0]}_node", **attrs) for op, inputs, outputs, attrs
             in steps]  # fmt: skip
    position = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for offset_, new in enumerate(added):
        model.graph.node.insert(position + offset_, new)
    model.graph.initializer.remove(inits[node.input[0]])
    model.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    return [new.name for new in added]
