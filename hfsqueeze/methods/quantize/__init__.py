"""The ``quantize`` stage: bitsandbytes LLM.int8, 4-bit NF4/FP4 and 16-bit casts, applied in place."""

from ...registry import register_stage
from .apply import apply_quantize, guard_bnb_cpu_repack, is_bnb_quantized
from .config import BNB_MODEL_TYPES, QuantizeConfig, validate_quantize

register_stage("quantize", QuantizeConfig, validate=validate_quantize)(apply_quantize)

__all__ = [
    "BNB_MODEL_TYPES",
    "QuantizeConfig",
    "apply_quantize",
    "guard_bnb_cpu_repack",
    "is_bnb_quantized",
    "validate_quantize",
]
