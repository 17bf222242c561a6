"""The ``quantize`` stage: bitsandbytes LLM.int8, 4-bit NF4/FP4 and 16-bit casts, applied in place."""

from ...registry import register_stage
from .apply import apply_quantize, guard_bnb_cpu_repack, is_bnb_quantized
from .config import QuantizeConfig

register_stage("quantize", QuantizeConfig)(apply_quantize)

__all__ = ["QuantizeConfig", "apply_quantize", "guard_bnb_cpu_repack", "is_bnb_quantized"]
