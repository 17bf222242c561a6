"""The ``quantize`` stage: bitsandbytes LLM.int8, 4-bit NF4/FP4 and 16-bit casts, applied in place."""

from ...registry import register_stage
from ...save import register_load_snippet
from .apply import apply_quantize, guard_bnb_cpu_repack, is_bnb_quantized, load_snippet
from .config import BNB_MODEL_TYPES, QuantizeConfig, validate_quantize

register_stage("quantize", QuantizeConfig, validate=validate_quantize)(apply_quantize)
register_load_snippet(load_snippet)

__all__ = [
    "BNB_MODEL_TYPES",
    "QuantizeConfig",
    "apply_quantize",
    "guard_bnb_cpu_repack",
    "is_bnb_quantized",
    "validate_quantize",
]
