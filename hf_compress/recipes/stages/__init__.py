"""The stages of a recipe, one module per kind; :data:`STAGES` maps a stage ``type`` to its function.

Each function is ``run(stage, ctx, out_dir) -> dict`` (see :mod:`hf_compress.recipes.stages.context`).
"""

from hf_compress.recipes.stages import card, distill, evaluate, export, finetune, prune, quantize, vocabulary

STAGES = {
    "finetune_teacher": finetune.run,
    "distill": distill.run,
    "prune": prune.run,
    "prune_vocabulary": vocabulary.run,
    "quantize": quantize.run,
    "evaluate": evaluate.run,
    "card": card.run,
    "export_onnx": export.run,
}

__all__ = ["STAGES"]
