"""The ``distill`` method: knowledge distillation from a frozen teacher, used for recovery after compression.

The training code (`apply_distill` in ``apply``, `DistillationTrainer` in ``trainer``) imports
``transformers.Trainer``; it is not imported here, so loading a recipe stays fast.
"""

from .config import DistillConfig
from .recover import expand_recovery, recovery_config
from .stage import DistillStage

__all__ = ["DistillConfig", "DistillStage", "expand_recovery", "recovery_config"]
