"""Teacher → student knowledge distillation: config, pure loss functions, the Trainer subclass, student init."""

from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.losses import distillation_loss
from hf_compress.distillation.student import make_student
from hf_compress.distillation.trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationTrainer", "distillation_loss", "make_student"]
