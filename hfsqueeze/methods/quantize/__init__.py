"""The ``quantize`` method: bitsandbytes LLM.int8, 4-bit NF4/FP4 and 16-bit casts, applied in place."""

from .apply import apply_quantize
from .config import BNB_MODEL_TYPES, QuantizeConfig
from .stage import QuantizeStage

__all__ = ["BNB_MODEL_TYPES", "QuantizeConfig", "QuantizeStage", "apply_quantize"]
