"""Configuration of the ``quantize`` stage."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from ...core.config import StageConfig

DEFAULT_SKIP_MODULES = ["lm_head"]
# bitsandbytes 8/4-bit: model types whose modeling code calls its nn.Linear modules (checked: compress, save and a
# stock reload). Some architectures read `.weight` directly (Mamba's dt_proj), which breaks after the swap.
# Calibration text for `calibration: gptq` / `smooth: true`: GPTQ's Hessians need at least the widest quantized input
# width in tokens (fewer hurts unseen text); 4096 covers SmolLM2 (1536) and Gemma-3-270M (2048) after the held-out
# eighth. Fewer than `MIN_TOKENS` cannot calibrate anything.
DEFAULT_TOKENS = 4096
MIN_TOKENS = 64
# `alpha: auto` tries these migration strengths (and no folding) per layer.
ALPHA_GRID = (0.25, 0.5, 0.75)
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

    calibration: Literal["rtn", "gptq"] | None = dataclasses.field(
        default=None,
        metadata={"help": "8/4-bit: rtn (bitsandbytes' own round-to-nearest, default) or gptq (GPTQ-style rounding "
                  "onto bnb's grid from the calibration text; the artifact still reloads with plain from_pretrained)"},
    )
    damp: float | None = dataclasses.field(
        default=None, metadata={"help": "gptq: dampening, a fraction of the Hessian's mean diagonal (default 0.01)"}
    )
    absmax_search: bool | None = dataclasses.field(
        default=None, metadata={"help": "gptq, 4-bit: shrink each block's absmax where that lowers the "
                                "Hessian-weighted error (default true)"}
    )
    tokens: int | None = dataclasses.field(
        default=None, metadata={"help": f"gptq/smooth: calibration tokens (default {DEFAULT_TOKENS}; GPTQ needs at "
                                "least the widest quantized input width, 1/8 is held out for the check against "
                                "round-to-nearest; taken from the compress calibration source, or by default half "
                                "from "
                                "builtin:generated and half from the built-in text, both train splits)"}
    )
    smooth: bool | None = dataclasses.field(
        default=None, metadata={"help": "8/4-bit: fold SmoothQuant per-channel scales into the norms and weights "
                                "before quantizing (default false; Llama-family and Gemma-3 models)"}
    )
    alpha: float | Literal["auto"] | None = dataclasses.field(
        default=None, metadata={"help": "smooth: migration strength in [0, 1] (default 0.5), or auto: per layer the "
                                f"one of {ALPHA_GRID} or no folding whose round-to-nearest layer is closest to the "
                                "original on calibration tokens (the real bnb kernels, int8's activation path "
                                "included)"}
    )

    def keeps_tensors(self, info: Any) -> bool:
        # Replaces modules (8/4 bits) or rebinds `.data` (16-bit casts, folded SmoothQuant scales): never writes into
        # a tensor, so a copy sharing the original's tensors leaves the original as it was.
        return True

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
        self._check_calibration()

    def _check_calibration(self) -> None:
        """Calibration options: each refused where it does nothing; defaults filled only when calibration is on, so
        a plain recipe's canonical form does not change."""
        for key in ("calibration", "smooth"):
            if getattr(self, key) is not None and self.bits == 16:
                self.fail(key, "only applies to bits: 8 or 4 (a 16-bit cast has nothing to calibrate)")
        gptq, smooth = self.calibration == "gptq", bool(self.smooth)
        for key, on, why in (("damp", gptq, "calibration: gptq"), ("absmax_search", gptq, "calibration: gptq"),
                             ("tokens", gptq or smooth, "calibration: gptq or smooth: true"),
                             ("alpha", smooth, "smooth: true")):
            if getattr(self, key) is not None and not on:
                self.fail(key, f"only applies with {why}")
        if gptq and self.bits == 8 and self.absmax_search is not None:
            self.fail("absmax_search", "only applies to bits: 4 (int8 rows keep bitsandbytes' max-abs scale)")
        if self.damp is not None and not (isinstance(self.damp, (int, float)) and 0 < self.damp <= 1):
            self.fail("damp", f"got {self.damp!r}; must be a number in (0, 1] (default 0.01)")
        if self.tokens is not None and not (isinstance(self.tokens, int) and not isinstance(self.tokens, bool)
                                            and self.tokens >= MIN_TOKENS):
            self.fail("tokens", f"got {self.tokens!r}; must be an integer >= {MIN_TOKENS} (default {DEFAULT_TOKENS})")
        if self.alpha is not None and self.alpha != "auto" and not (
                isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0 <= self.alpha <= 1):
            self.fail("alpha", f"got {self.alpha!r}; must be a number in [0, 1] or auto (default 0.5)")
        if gptq:
            self.damp = 0.01 if self.damp is None else float(self.damp)
            if self.bits == 4:
                self.absmax_search = True if self.absmax_search is None else self.absmax_search
        if smooth:
            self.alpha = 0.5 if self.alpha is None else (self.alpha if self.alpha == "auto" else float(self.alpha))
        if gptq or smooth:
            self.tokens = DEFAULT_TOKENS if self.tokens is None else self.tokens

    @property
    def calibrated(self) -> bool:
        """Whether `apply` needs calibration text (GPTQ rounding or folded scales)."""
        return self.calibration == "gptq" or bool(self.smooth)

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
