"""The ``export_onnx`` stage: the latest float model as an ONNX Runtime / transformers.js repository.

Writes ``onnx/model.onnx`` and the dynamically quantised ``onnx/model_quantized.onnx`` (with ``config.json`` and the
tokenizer) into the stage folder, checked against PyTorch, and reports the accuracy of both graphs on the eval split,
their bytes and their ONNX Runtime latency at batch 1 and 32 (the deployment path that beats PyTorch on CPU, see
BENCHMARKS.md). After a ``quantize`` stage it exports the float stage the int8 model came from: ONNX Runtime
quantises that graph itself. For sentence embeddings it exports the transformer inside the ``SentenceTransformer``
(output: token embeddings, to be pooled as the folder's pooling module says).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hf_compress.export import evaluate_onnx, export_onnx, onnx_latency
from hf_compress.integrations.sentence_transformers import transformer_folder
from hf_compress.recipes.data import data_collator
from hf_compress.recipes.schema import Stage
from hf_compress.recipes.stages.context import StageContext
from hf_compress.recipes.stages.evaluate import latency_inputs


def float_model(ctx: StageContext) -> dict[str, Any]:
    """The latest finished model stage that is not quantised (the teacher when there is none)."""
    for entry in reversed(ctx.models):
        if entry["type"] != "quantize":
            return entry
    return {"name": "teacher", "path": ctx.teacher, "tokenizer": ctx.tokenizer_source}


def run(stage: Stage, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Export, check, and measure the ONNX graphs of the latest float model."""
    source = float_model(ctx)
    if not ctx.is_main_process:
        return {}
    # a SentenceTransformer folder: its transformer, whose token embeddings (`last_hidden_state`) the graph outputs
    folder = transformer_folder(source["path"]) if ctx.sentence_embedding else source["path"]
    result = export_onnx(folder, out_dir, **stage.export)
    report: dict[str, Any] = {"source": source["name"], **result.to_dict()}
    eval_dataset = ctx.datasets_for(source["tokenizer"])[1]
    if ctx.task == "sequence-classification" and eval_dataset is not None:
        tokenizer = ctx.tokenizer_for(source["tokenizer"])
        graphs = {"onnx": result.model, "onnx_int8": result.quantized}
        threads = torch.get_num_threads()
        inputs = latency_inputs(eval_dataset, data_collator(tokenizer, ctx.task), set(result.inputs))
        for name, graph in graphs.items():
            if graph is None:
                continue
            metrics = evaluate_onnx(graph, eval_dataset, pad_token_id=tokenizer.pad_token_id or 0)
            report[name] = {"metrics": {"accuracy": metrics["accuracy"]}, "bytes": Path(graph).stat().st_size}
            if inputs is not None:
                report[name]["latency_ms"] = onnx_latency(graph, inputs, num_threads=threads)
    return report
