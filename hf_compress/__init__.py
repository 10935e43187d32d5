"""hf_compress: pruning and knowledge distillation for the Hugging Face Trainer ecosystem.

>>> from hf_compress import DistillationTrainer, DistillationConfig, PruningCallback, PruningConfig
"""

from .card_callback import ModelCardCallback, write_trainer_card
from .distillation.cache import cache_teacher_outputs
from .distillation.config import DistillationConfig
from .distillation.losses import distillation_loss
from .distillation.student import make_student
from .distillation.trainer import DistillationTrainer
from .loading import from_pretrained, save_pretrained
from .pruning.callback import PruningCallback
from .pruning.config import PruningConfig
from .quantization import load_quantized, quantize_int8
from .vocabulary import prune_vocabulary

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
    "save_pretrained",
    "write_trainer_card",
]
