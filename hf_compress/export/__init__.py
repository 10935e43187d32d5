"""ONNX / ONNX Runtime artefacts: export a float model folder in the transformers.js layout, then evaluate and time
the graphs with ONNX Runtime. Needs the optional dependencies of ``pip install "hf-compress[onnx]"``.

>>> from hf_compress.export import export_onnx, evaluate_onnx, onnx_latency
"""

from hf_compress.export.onnx import CHECK_TEXTS, OnnxExport, export_onnx, float_source
from hf_compress.export.runtime import ONNX_EXTRA, evaluate_onnx, onnx_latency, onnx_session, run_onnx

__all__ = [
    "CHECK_TEXTS",
    "ONNX_EXTRA",
    "OnnxExport",
    "evaluate_onnx",
    "export_onnx",
    "float_source",
    "onnx_latency",
    "onnx_session",
    "run_onnx",
]
