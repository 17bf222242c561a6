"""`QuantizeStage`: the quantize method's life: checks, apply, how cards name it, what a tuner may vary."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...core.context import CompressionContext
from ...core.errors import RecipeError, UnsupportedModelError
from ...core.search import Param
from ...core.stage import Description, ModelInfo, SearchSection, Stage, format_of
from .apply import apply_quantize, check_quantizable, conversion_plan, load_snippet, new_module
from .calibrate import apply_calibrated, calibration_phrase
from .config import BNB_MODEL_TYPES, QuantizeConfig
from .smooth import SMOOTH_MODEL_TYPES


def _label(config: dict[str, Any]) -> str:
    bits = config.get("bits")
    if bits == 8:
        return f"8-bit LLM.int8 (bitsandbytes, outlier threshold {config.get('threshold', 6.0)})"
    if bits == 4:
        qt = config.get("quant_type", "nf4")
        dq = ", double quantization" if config.get("double_quant") else ""
        return f"4-bit {qt.upper()} (bitsandbytes{dq}, compute dtype {config.get('compute_dtype', 'float32')})"
    if bits == 16:
        return f"16-bit cast to {config.get('dtype', 'bf16')}"
    return QuantizeStage.name


def _tags(config: dict[str, Any]) -> list[str]:
    bits = config.get("bits")
    if bits in (4, 8):
        kind = "int8" if bits == 8 else str(config.get("quant_type", "nf4"))
        return ["bitsandbytes", f"{bits}-bit", "quantized", kind]
    if bits == 16:
        return [str(config.get("dtype", "bf16"))]
    return []


class QuantizeStage(Stage):
    """bitsandbytes LLM.int8, 4-bit NF4/FP4 and 16-bit casts, in place (see `apply_quantize`)."""

    name = "quantize"
    config_cls = QuantizeConfig

    def validate(self, config: QuantizeConfig, info: ModelInfo) -> ModelInfo | None:
        if info.frozen_by:
            fix = ("put the 16-bit cast before the 8/4-bit stage, or use compute_dtype for 4-bit" if config.bits == 16
                   else "a model is quantized to 8/4 bits once; remove one quantize stage")
            raise RecipeError(f"bits: {config.bits} cannot follow a {info.frozen_by} stage; {fix}")
        check_quantizable(info)
        if config.bits == 16:
            return None
        if info.known and info.model_type not in BNB_MODEL_TYPES:
            raise UnsupportedModelError(
                f"bits: {config.bits} (bitsandbytes) does not support model type {info.model_type!r} "
                f"({info.architecture}); supported model types: {', '.join(BNB_MODEL_TYPES)} (bits: 16 works for "
                "any model)"
            )
        if config.smooth and info.known and info.model_type not in SMOOTH_MODEL_TYPES:
            raise UnsupportedModelError(f"smooth: true does not support model type {info.model_type!r} (its norms "
                                        f"feed a residual or are not known); supported model types: "
                                        f"{', '.join(SMOOTH_MODEL_TYPES)} (set smooth: false)")
        return info.replace(quantized="bitsandbytes", frozen_by=f"bitsandbytes {config.label}")

    def apply(self, model: nn.Module, config: QuantizeConfig, ctx: CompressionContext) -> dict[str, Any]:
        if config.bits != 16 and config.calibrated:
            return apply_calibrated(model, config, ctx)
        return apply_quantize(model, config, ctx)

    def describe(self, config: dict[str, Any], details: dict[str, Any]) -> Description:
        label = _label(config)
        calibration = details.get("calibration") if isinstance(details, dict) else None
        if isinstance(calibration, dict):
            label += f"; {calibration_phrase(calibration)}"
        return Description(label=label, short=format_of(details) or self.name, tags=_tags(config),
                           relation="quantized")

    def load_snippet(self, config: Any, path_or_repo: str) -> str | None:
        return load_snippet(config, path_or_repo)

    def search_section(self) -> SearchSection | None:
        return SearchSection(self.name, not_searched=("skip_modules",))  # the tuner's solver picks skip_modules

    def label(self, config: dict[str, Any]) -> str:
        bits = config.get("bits")
        if bits == 16:
            return config.get("dtype", "bf16")
        if bits == 8:
            return f"int8 t={config.get('threshold', 6.0):g}"
        label = config.get("quant_type", "nf4") + ("-dq" if config.get("double_quant") else "")
        if config.get("compute_dtype", "float32") != "float32":
            label += f" {config['compute_dtype']}"
        return label

    def calibrated(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """4-bit round-to-nearest -> GPTQ rounding onto the same grid (SmolLM2 nf4, held-out perplexity: +30.9% ->
        +5.8%); int8 -> folded SmoothQuant scales with ``alpha: auto``, which shrink the activation error of LLM.int8's
        W8A8 path (SmolLM2 int8: +1.93% -> +0.35%). Already calibrated: ``None``."""
        if config.get("calibration") not in (None, "rtn") or config.get("smooth"):
            return None
        if config.get("bits") == 4:
            return {**config, "calibration": "gptq"}
        if config.get("bits") == 8:
            return {**config, "smooth": True, "alpha": "auto"}
        return None

    # ---- per-module access, for a tuner that scores each module in each format (hfsqueeze.tune) ----------------
    def targets(self, model: nn.Module, config: QuantizeConfig) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs `apply` would convert for an 8/4-bit ``config``."""
        return conversion_plan(model, config)[3]

    def quantized_module(self, module: nn.Module, config: QuantizeConfig) -> nn.Module:
        """The bitsandbytes module `apply` would put in place of ``module`` (same training mode)."""
        return new_module(module, config)

    def search_space(self, info: ModelInfo | None = None) -> dict[str, Param]:
        return {
            "bits": Param.choice(16, 8, 4),
            "dtype": Param.choice("bf16", "fp16", when={"bits": (16,)}),
            # Measured on SmolLM2: lower thresholds trade speed for quality; 0 disables the outlier path.
            "threshold": Param.range(0.0, 8.0, step=0.5, when={"bits": (8,)}),
            "quant_type": Param.choice("nf4", "fp4", when={"bits": (4,)}),
            "double_quant": Param.choice(False, True, when={"bits": (4,)}),
            "compute_dtype": Param.choice("float32", "bfloat16", "float16", when={"bits": (4,)}),
            # Names match by suffix: "down_proj" keeps Llama-family FFN outputs in full precision.
            "skip_modules": Param.choice(("lm_head",), ("lm_head", "down_proj"), when={"bits": (8, 4)}),
            # Not searched: `calibration: gptq` and `smooth` (same format, same size). A calibrated trial costs
            # minutes where a round-to-nearest one costs seconds, and the per-module sensitivities the solver uses
            # are round-to-nearest ones; tune builds its chosen point calibrated too (`calibrated`) and keeps the
            # better build (`hfsqueeze.tune.final`).
        }
