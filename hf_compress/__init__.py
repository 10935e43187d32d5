"""hf_compress: pruning and knowledge distillation for the Hugging Face Trainer ecosystem.

>>> from hf_compress import DistillationTrainer, DistillationConfig, PruningCallback, PruningConfig
"""

from hf_compress.api import from_pretrained, make_student, prune_vocabulary, quantize_model, save_pretrained
from hf_compress.distillation.cache import cache_teacher_outputs
from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.losses import distillation_loss
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.loading import load_quantized
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.quantization.quantize import quantize_int8
from hf_compress.reporting.card_callback import ModelCardCallback, write_trainer_card

# Every DistillationTrainer writes hf_compress's model card (checkpoints, `save_model`, `push_to_hub`); registered
# here so that `distillation/` does not import `reporting/` (see `hf_compress.distillation.callbacks.CardWriter`).
DistillationTrainer.default_callbacks = (ModelCardCallback,)

__version__ = "0.1.0"

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "ModelCardCallback",
    "PruningCallback",
    "PruningConfig",
    "cache_teacher_outputs",
    "distillation_loss",
    "from_pretrained",
    "load_quantized",
    "make_student",
    "prune_vocabulary",
    "quantize_int8",
    "quantize_model",
    "save_pretrained",
    "write_trainer_card",
]
