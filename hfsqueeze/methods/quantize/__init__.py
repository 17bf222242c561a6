"""The ``quantize`` method: bitsandbytes LLM.int8, 4-bit NF4/FP4 and 16-bit casts, applied in place."""

from .apply import apply_quantize
from .config import QuantizeConfig
from .stage import QuantizeStage

__all__ = ["QuantizeConfig", "QuantizeStage", "apply_quantize"]
