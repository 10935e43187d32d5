"""The ``quantize`` stage: int8 Linear layers, and int8 or 4-bit embeddings, of the latest model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_compress.api import quantize_model
from hf_compress.recipes.schema import Stage
from hf_compress.recipes.stages.context import StageContext, finish


def run(stage: Stage, ctx: StageContext, out_dir: Path) -> dict[str, Any]:
    """Quantise the latest model with the stage's ``quantization`` arguments (``embedding_bits: 4`` for int4)."""
    model = quantize_model(ctx.load(ctx.model), **stage.quantization)  # a SentenceTransformer: its transformer
    return finish(model, ctx, out_dir, {"quantization": dict(stage.quantization)})
