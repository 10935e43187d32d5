"""Teacher → student knowledge distillation: config, pure loss functions, the Trainer subclass, student init."""

from .config import DistillationConfig
from .losses import distillation_loss
from .student import make_student
from .trainer import DistillationTrainer

__all__ = ["DistillationConfig", "DistillationTrainer", "distillation_loss", "make_student"]
