"""Configuration of the ``quantize`` stage."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from ...core.config import StageConfig

DEFAULT_SKIP_MODULES = ["lm_head"]
# bitsandbytes 8/4-bit: model types whose modeling code calls its nn.Linear modules (checked: compress, save and a
# stock reload). Some architectures read `.weight` directly (Mamba's dt_proj), which breaks after the swap.
BNB_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "opt", "gpt2", "bert",
                   "roberta", "xlm-roberta", "distilbert")


@dataclasses.dataclass
class QuantizeConfig(StageConfig):
    """Quantize the loaded model in place with bitsandbytes (8-bit LLM.int8, 4-bit NF4/FP4) or cast it to 16 bits.

    Options that only make sense for one bit width (``threshold`` for 8, ``quant_type``/``double_quant``/
    ``compute_dtype`` for 4, ``dtype`` for 16) are refused for the others. Embeddings are never quantized (they are
    not `nn.Linear`); ``skip_modules`` keeps further modules in full precision.

    Example:

    ```yaml
    - method: quantize
      bits: 4
      quant_type: nf4
      double_quant: true
    ```
    """

    method = "quantize"

    bits: Literal[4, 8, 16] = dataclasses.field(default=8, metadata={"help": "8 (LLM.int8), 4 (NF4/FP4) or 16"})
    threshold: float | None = dataclasses.field(
        default=None, metadata={"help": "8-bit: outlier threshold of LLM.int8 (default 6.0; 0 disables outliers)"}
    )
    quant_type: Literal["nf4", "fp4"] | None = dataclasses.field(
        default=None, metadata={"help": "4-bit: data type, nf4 (default) or fp4"}
    )
    double_quant: bool | None = dataclasses.field(
        default=None, metadata={"help": "4-bit: also quantize the quantization constants (default false)"}
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = dataclasses.field(
        default=None, metadata={"help": "4-bit: dtype of the matmul (default float32)"}
    )
    dtype: Literal["bf16", "fp16"] | None = dataclasses.field(
        default=None, metadata={"help": "16-bit: target dtype, bf16 (default) or fp16"}
    )
    skip_modules: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "8/4-bit: module names (prefixes, suffixes or regexes) to keep unquantized "
                  "(default [lm_head])"},
    )

    def keeps_tensors(self, info: Any) -> bool:
        return True  # replaces modules (8/4 bits) or rebinds `.data` (16-bit casts)

    def __post_init__(self):
        only = {
            "threshold": 8, "quant_type": 4, "double_quant": 4, "compute_dtype": 4, "dtype": 16,
        }
        for key, bits in only.items():
            if getattr(self, key) is not None and self.bits != bits:
                self.fail(key, f"only applies to bits: {bits}, but this stage has bits: {self.bits}")
        if self.skip_modules is not None and self.bits == 16:
            self.fail("skip_modules", "only applies to bits: 8 or 4 (a 16-bit cast converts every weight)")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold >= 0):
            self.fail("threshold", f"got {self.threshold}; must be a finite number >= 0 (default 6.0; 0 disables the "
                      "outlier columns)")
        if self.bits == 8:
            self.threshold = 6.0 if self.threshold is None else self.threshold
        if self.bits == 4:
            self.quant_type = self.quant_type or "nf4"
            self.double_quant = bool(self.double_quant)
            self.compute_dtype = self.compute_dtype or "float32"
        if self.bits == 16:
            self.dtype = self.dtype or "bf16"
        if self.bits in (4, 8) and self.skip_modules is None:
            self.skip_modules = list(DEFAULT_SKIP_MODULES)

    @property
    def label(self) -> str:
        """Short name: ``int8``, ``nf4``, ``nf4-dq``, ``fp4``, ``bf16``, ``fp16``."""
        if self.bits == 8:
            return "int8"
        if self.bits == 4:
            return f"{self.quant_type}{'-dq' if self.double_quant else ''}"
        return self.dtype

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}
