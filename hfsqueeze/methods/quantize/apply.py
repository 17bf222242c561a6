"""In-place quantization of an already loaded model.

Transformers only quantizes while loading (``from_pretrained(..., quantization_config=...)``). To work on a model
already in memory (perhaps pruned or distilled a moment ago), each eligible `nn.Linear` (or GPT-2 `Conv1D`) is swapped
for the bitsandbytes module that Transformers itself would have created, using Transformers' own rules for which
modules to skip; then the model is given the same quantizer state a quantized load leaves behind. So
`save_pretrained` writes a standard bnb checkpoint and plain `from_pretrained(dir)` restores it without hfsqueeze.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from ...compat.bnb import import_bnb
from ...core.errors import HfSqueezeWarning, RecipeError
from ...core.hf import auto_class_name, strip_gguf
from ...core.stage import ModelInfo
from .config import DEFAULT_SKIP_MODULES, QuantizeConfig

logger = logging.getLogger("hfsqueeze")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "bf16": torch.bfloat16, "fp16": torch.float16}


def check_quantizable(info: ModelInfo) -> None:
    """A model is quantized once: refuse one that already is (bitsandbytes or any other method)."""
    if info.quantized == "bitsandbytes":
        raise RecipeError("the model is already quantized with bitsandbytes; a model can be quantized to 8/4 bits "
                          "once (remove the extra quantize stage)")
    if info.quantized is not None:
        raise RecipeError(f"the model is already quantized with {info.quantized}; load it unquantized to use the "
                          "quantize stage")


# Appended to the stock loading code of a 4-bit artifact. bnb's own choice on CPUs with AVX512-BF16 would be a bf16
# kernel (activations and scales rounded to bf16) that moves Gemma-3-270M's logits by up to 2.5 (2.8% of their
# range): the live model, the report and `load_compressed` run the exact kernel, so the card's code must too.
EXACT_4BIT_KERNEL_CODE = """
# hfsqueeze measured this model with bitsandbytes' exact 4-bit CPU kernel. On CPUs with AVX512-BF16, bitsandbytes
# would switch to a bf16 kernel at the first forward pass, which gives slightly different outputs (and, with
# bitsandbytes 0.50.2, makes a later save_pretrained write wrong weights); these lines keep the exact kernel.
for module in model.modules():
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
"""

# Prepended to the stock loading code of an int8 artifact. In eval mode bnb casts the activations of every int8 matmul
# to float16 and logs that on each call (1,680 lines for 20 generated tokens of SmolLM2). Loading the float rest in
# 16 bits is not possible: Transformers keeps a pre-quantized checkpoint's dtype (`dtype=` is ignored, `.half()` is
# refused), and a bf16 rest is cast (and logged) the same way. So the card's code quiets that one logger.
INT8_QUIET_CODE = """
# LLM.int8 multiplies in float16 by design, and bitsandbytes logs a notice saying so on every int8 matrix
# multiplication (hundreds of lines per generate call); this line hides that notice and nothing else.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
"""


def _config_value(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _bnb_quantization(config: Any) -> dict[str, Any] | None:
    qc = _config_value(config, "quantization_config")
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes" else None


def is_bnb_8bit_config(config: Any) -> bool:
    """Whether a model config (object or dict) describes a bitsandbytes LLM.int8 checkpoint."""
    return bool((_bnb_quantization(config) or {}).get("load_in_8bit"))


def is_bnb_4bit_config(config: Any) -> bool:
    """Whether a model config (object or dict) describes a bitsandbytes 4-bit checkpoint."""
    return bool((_bnb_quantization(config) or {}).get("load_in_4bit"))


def load_snippet(config: Any, path_or_repo: str) -> str | None:
    """Stock ``from_pretrained`` code for a bitsandbytes artifact: a 4-bit one plus `EXACT_4BIT_KERNEL_CODE`, so the
    card's code gives the outputs hfsqueeze measured and recorded; an int8 one with `INT8_QUIET_CODE`, so it loads and
    generates without a log line per matmul. Artifacts that bring their own modeling code are left to the stage that
    wrote it."""
    if _config_value(config, "auto_map"):
        return None
    auto = auto_class_name(config)
    load = f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{path_or_repo}")\n'
    if is_bnb_4bit_config(config):
        return load + EXACT_4BIT_KERNEL_CODE
    if is_bnb_8bit_config(config):
        return f"import logging\n\nfrom transformers import {auto}\n{INT8_QUIET_CODE}\n" + load.split("\n\n", 1)[1]
    return None


def bnb_config(config: QuantizeConfig):
    from transformers import BitsAndBytesConfig

    if config.bits == 8:
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=config.threshold, llm_int8_skip_modules=list(config.skip_modules)
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[config.compute_dtype],
        llm_int8_skip_modules=list(config.skip_modules),
    )


# Rows quantized at a time: bnb's own `Int8Params` makes an fp16 copy of the whole weight first, and those transients,
# interleaved with the int8 results that stay, grew the heap by ~1.3 GB that glibc never returned at 800M.
_INT8_ROWS = 256


def _int8_params(bnb, weight: torch.Tensor):
    """The `Int8Params` bnb's ``Int8Params(weight).to(device)`` makes (int8 rows and their absmax scales, the same
    bits: the quantization is per row), a block of rows at a time into tensors allocated once."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _INT8_ROWS):
        rows = slice(start, start + _INT8_ROWS)
        codes[rows], scales[rows], _ = bnb.functional.int8_vectorwise_quant(weight[rows].to(torch.float16))
    return bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)


def stock_bnb_module(bnb, module: nn.Module, qc, config: QuantizeConfig) -> nn.Module:
    """The bitsandbytes module bnb's own quantization (round-to-nearest) puts in place of ``module``: what
    `apply_quantize` and, for what it does not calibrate, `calibrate.apply_calibrated` write."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight.data
    if isinstance(module, Conv1D):  # Conv1D stores [in, out]; bnb expects nn.Linear's [out, in]
        weight = weight.t()
    out_features, in_features = weight.shape
    bias = module.bias is not None
    if config.bits == 8:
        # On `meta`: built on the CPU, nn.Linear's __init__ allocates and initialises an fp32 weight only to drop it.
        new = bnb.nn.Linear8bitLt(in_features, out_features, bias, has_fp16_weights=False, threshold=config.threshold,
                                  device="meta")
        new.weight = _int8_params(bnb, weight)
    else:
        new = bnb.nn.Linear4bit(
            in_features, out_features, bias, qc.bnb_4bit_compute_dtype,
            compress_statistics=config.double_quant, quant_type=config.quant_type,
            quant_storage=qc.bnb_4bit_quant_storage, device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.contiguous(), requires_grad=False, quant_type=config.quant_type,
            compress_statistics=config.double_quant, quant_storage=qc.bnb_4bit_quant_storage, module=new,
        ).to(weight.device)  # quantized where the weight it replaces lives (CUDA kernels for a CUDA model)
        new.support_avx512bf16_for_cpu = False
    return finish_module(new, module, bias)


def finish_module(new: nn.Module, module: nn.Module, bias: bool) -> nn.Module:
    """The bitsandbytes module ``new`` made ready to stand in for ``module``: its bias copied, frozen, and in the
    original's train/eval mode (new modules start in training mode, where int8 takes another code path: outputs
    differ by ~2e-2)."""
    if bias:
        new.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
    new.source_cls = type(module)
    new.requires_grad_(False)
    new.train(module.training)
    return new


def _cast_16bit(model: nn.Module, config: QuantizeConfig) -> dict[str, Any]:
    dtype = _DTYPES[config.dtype]
    # Non-persistent float buffers (rotary inv_freq) are rebuilt in fp32 on reload; keep them fp32 here too, or the
    # live model and the reloaded artifact disagree.
    kept = [
        (module, name, buf) for module in model.modules() for name, buf in module.named_buffers(recurse=False)
        if name in module._non_persistent_buffers_set and buf.is_floating_point()
    ]
    model.to(dtype)
    for module, name, buf in kept:
        setattr(module, name, buf)
    model.config.dtype = dtype
    return {"format": config.label, "dtype": str(dtype).replace("torch.", "")}


def conversion_plan(model: nn.Module, config: QuantizeConfig
                    ) -> tuple[Any, Any, list[str], list[tuple[str, nn.Module]]]:
    """What `apply_quantize` converts for an 8/4-bit ``config``: the ``BitsAndBytesConfig``, the quantizer, the skip
    list and the ``(name, module)`` pairs to convert."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    qc = bnb_config(config)
    hf_quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    # The same skip list Transformers computes when it reloads this checkpoint, so both sides agree.
    skip = hf_quantizer.get_modules_to_not_convert(model, qc.llm_int8_skip_modules, model._keep_in_fp32_modules)
    hf_quantizer.modules_to_not_convert = skip
    targets = [
        (name, module) for name, module in model.named_modules()
        if (isinstance(module, Conv1D) or type(module) is nn.Linear) and should_convert_module(name, skip)
    ]
    return qc, hf_quantizer, skip, targets


def new_module(module: nn.Module, config: QuantizeConfig) -> nn.Module:
    """The bitsandbytes module `apply_quantize` puts in place of ``module`` for an 8/4-bit ``config``."""
    return stock_bnb_module(import_bnb(), module, bnb_config(config), config)


def apply_quantize(model: nn.Module, config: QuantizeConfig, context: Any = None) -> dict[str, Any]:
    """Quantize ``model`` in place according to ``config``; return the details for the report."""
    strip_gguf(model)
    check_quantizable(ModelInfo.of(model))
    if config.bits == 16:
        return _cast_16bit(model, config)

    bnb = import_bnb()
    qc, hf_quantizer, skip, targets = conversion_plan(model, config)
    if not targets:
        raise RecipeError("the quantize stage found no nn.Linear/Conv1D module to quantize (all skipped by "
                          f"skip_modules={config.skip_modules})")
    unmatched = _unmatched_skip_patterns(model, config)
    for pattern in unmatched:
        warnings.warn(f"quantize: skip_modules entry {pattern!r} matches no nn.Linear/Conv1D module of this model, so "
                      "it keeps nothing in full precision (names match by prefix, suffix or regex, e.g. "
                      f"{_example_names(model)})", HfSqueezeWarning, stacklevel=3)
    names = [name for name, _ in targets]
    del targets  # it holds every fp32 module: each must be freed as soon as its replacement is in place
    quantized_params = 0
    for name in names:
        module = model.get_submodule(name)
        quantized_params += module.weight.numel()
        model.set_submodule(name, stock_bnb_module(bnb, module, qc, config))
        # Dropping the last reference frees this fp32 weight now, so at most one is alive beside the quantized
        # model (peak ~ the model plus one Linear, as a quantized `from_pretrained` load).
        del module

    details = mark_quantized(model, config, qc, hf_quantizer, skip, names, quantized_params)
    logger.info("quantized %d modules to %s", len(names), config.label)
    if unmatched:
        details["warnings"] = [f"skip_modules entry {p!r} matched no module" for p in unmatched]
    return details


def mark_quantized(model: nn.Module, config: QuantizeConfig, qc: Any, hf_quantizer: Any, skip: list[str],
                   names: list[str], quantized_params: int) -> dict[str, Any]:
    """Give ``model`` (its Linears ``names`` already swapped) the quantizer state a quantized load leaves behind, so
    ``save_pretrained`` writes a bnb checkpoint; return the report details every 8/4-bit quantize stage shares."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    model.hf_quantizer = hf_quantizer
    model.config.quantization_config = qc
    model.is_quantized = True
    model.quantization_method = qc.quant_method
    model.is_loaded_in_8bit = config.bits == 8
    model.is_loaded_in_4bit = config.bits == 4
    skipped = sorted(
        name for name, m in model.named_modules()
        if (isinstance(m, Conv1D) or type(m) is nn.Linear) and not should_convert_module(name, skip)
    )
    return {
        "format": config.label,
        "quantized_modules": len(names),
        "quantized_parameters": quantized_params,
        "kept_modules": skipped,
    }


def _linear_names(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in model.named_modules() if isinstance(m, Conv1D) or type(m) is nn.Linear]


def _unmatched_skip_patterns(model: nn.Module, config: QuantizeConfig) -> list[str]:
    """The user's ``skip_modules`` entries that keep no module (the default ``lm_head`` is exempt: an encoder has
    none, and that is fine)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = _linear_names(model)
    return [pattern for pattern in config.skip_modules or [] if pattern not in DEFAULT_SKIP_MODULES
            and all(should_convert_module(name, [pattern]) for name in names)]


def _example_names(model: nn.Module) -> str:
    names = _linear_names(model)
    return ", ".join(repr(n) for n in names[:2]) + (", ..." if len(names) > 2 else "")
