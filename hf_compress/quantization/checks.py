"""Checks of quantisation inputs that need the model."""

from __future__ import annotations

from torch import nn

from hf_compress.quantization.layers import Int8Embedding, Int8Linear


def check_not_quantized(model: nn.Module) -> None:
    """Raise a `ValueError` when `model` already holds int8 / int4 modules (instead of "the selection is empty")."""
    done = [name for name, module in model.named_modules() if isinstance(module, (Int8Linear, Int8Embedding))]
    if done:
        raise ValueError(
            f"`model` is already quantised ({len(done)} int8 modules, e.g. `{done[0]}`); quantise the float model "
            "it was made from instead."
        )
