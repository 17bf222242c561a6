"""Every bitsandbytes workaround in one place (bnb 0.50.2 on CPU, Transformers 5.24; see the measured notes).

- `guard_bnb_cpu_repack`: the first no-grad CPU forward of a `Linear4bit` repacks its weights when the CPU has
  AVX512-BF16, and saving afterwards writes ``absmax`` in the wrong layout and damages the live model. Guard every
  model before it runs or is saved; `check_not_repacked` refuses to save a model that already repacked.
- `saveable`: Transformers cannot ``save_pretrained`` a 4-bit model it *loaded* pre-quantized.
- `import_bnb`: imports bitsandbytes (or names the pip command); its import-time and per-matmul noise is
  filtered by `hfsqueeze.core.utils.silence_bnb_noise`, installed when hfsqueeze is imported.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

from torch import nn

from ..core.errors import ArtifactError, require_backend
from ..core.hf import quantization_method


def import_bnb() -> Any:
    """Import bitsandbytes, or raise `BackendMissingError` with the pip command."""
    bnb = require_backend("bitsandbytes")
    # Older bnb releases warned (instead of logging, see core.utils.silence_bnb_noise) on every int8 matmul.
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    return bnb


def is_bnb_quantized(model: nn.Module) -> bool:
    """True when the model carries bitsandbytes layers (flags set by a quantized load or by the quantize stage)."""
    return quantization_method(model) == "bitsandbytes"


def guard_bnb_cpu_repack(model: nn.Module) -> nn.Module:
    """Disable bitsandbytes' CPU weight repacking on every `Linear4bit` of ``model``; return the model.

    bnb 0.50.2 repacks 4-bit weights on the first no-grad CPU forward when the CPU has AVX512-BF16; saving afterwards
    writes ``absmax`` in the wrong layout and damages the live model. The unpacked kernel is exact.
    """
    if not getattr(model, "is_loaded_in_4bit", False):
        return model
    bnb = import_bnb()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def has_repacked_4bit(model: nn.Module) -> bool:
    """True when some `Linear4bit` already ran the CPU repack (its weights can no longer be saved correctly)."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return False
    return any(
        getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
        for m in model.modules()
    )


def check_not_repacked(model: nn.Module) -> None:
    """Refuse to save a 4-bit model whose weights bitsandbytes already repacked (it would write corrupt weights)."""
    if has_repacked_4bit(model):
        raise ArtifactError("this 4-bit model already ran bitsandbytes' CPU weight repacking, after which saving "
                            "writes corrupt weights (bnb 0.50.2); save it before inference, or reload and call "
                            "hfsqueeze.compat.bnb.guard_bnb_cpu_repack(model) first")


@contextlib.contextmanager
def saveable(model: nn.Module) -> Iterator[nn.Module]:
    """Let `save_pretrained` run on a model: guard the CPU repack, and hide a 4-bit load's reverse conversion.

    Transformers 5.24 records a ``Bnb4bitDeserialize`` weight conversion on a 4-bit model it loaded pre-quantized and,
    on save, tries to reverse it, which fails (that reverse step is not implemented upstream). bnb's `Linear4bit`
    already writes its quantization state itself, so the reverse step has nothing to do: hide that conversion for
    the duration of the save.
    """
    guard_bnb_cpu_repack(model)
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions:
        yield model
        return
    kept = [c for c in conversions
            if not all(type(op).__name__.startswith("Bnb") for op in getattr(c, "operations", []) or [None])]
    model._weight_conversions = kept
    try:
        yield model
    finally:
        model._weight_conversions = conversions


__all__ = ["check_not_repacked", "guard_bnb_cpu_repack", "has_repacked_4bit", "import_bnb", "is_bnb_quantized",
           "saveable"]
