"""The end of a distill run: what is kept, in which form, and whether it is better than what came in.

Routes (``details["route"]``):

- ``adapter``: a bitsandbytes-quantized model keeps its LoRA adapter unmerged (saved beside the base weights), so
  what is saved is exactly what was trained. Merging would re-quantize the weights and round most of the update away.
- ``merged``: LoRA merged into the weights: exact for a full-precision model; for a quantized one only when asked
  (``lora.merge: true``), and then the merged model is scored again, since it is not what was trained.
- ``full``: full fine-tuning; the weights are the trained ones.
- ``none``: the guard found the recovered model worse than the model before training and restored it.

The guard (``DistillConfig.guard``) compares the saved form with the model that entered the stage on every evaluation
set (held-out split and evaluation texts); worse on any of them beyond ``guard_tolerance`` means the stage restores
the model it started from, warns, and says so in the report and the model card.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ...compat.peft import adapter_summary, drop_adapter, keep_adapter
from .quality import EvalSet, regressions, score
from .recover import merge_lora

logger = logging.getLogger("hfsqueeze")

KEPT_RECOVERED = "recovered"
KEPT_BEFORE = "before"


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters training may change (so the guard can restore them)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def _transplant(target: nn.Module, source: nn.Module) -> None:
    # The stage works in place: the caller's object must become the merged copy.
    target.__dict__.clear()
    target.__dict__.update(source.__dict__)


def finish(model: nn.Module, train_model: nn.Module, *, teacher: nn.Module, sets: list[EvalSet],
           before: dict[str, dict[str, float]], use_lora: bool, quantized: bool, merge: Any, guard: bool,
           tolerance: float, snapshot: dict[str, torch.Tensor] | None, fit_text: bool = False) -> dict[str, Any]:
    """Score the trained model, choose the form to keep, apply the guard; ``model`` ends in its final state.

    ``merge`` is ``"auto"`` (merge LoRA into full-precision weights, keep it unmerged on a quantized model), ``True``
    or ``False``. ``fit_text``: the hard loss is on, so only a set that is both further from the teacher and higher
    in perplexity counts as worse. Returns the report details: ``quality`` (per set: before / trained / saved), ``route``, ``kept``,
    ``regressions`` and ``adapter_kept``.
    """
    trained = score(model, teacher, sets) if sets else {}
    route, saved, candidate = "full", trained, None
    if use_lora:
        if merge is False or (merge == "auto" and quantized):
            route = "adapter"
        elif not quantized:
            route = "merged"  # exact in full precision: the merged model is the trained one
        else:
            # Merging re-quantizes the weights, so the merged model is not what was trained: score it on a copy.
            candidate = merge_lora(copy.deepcopy(train_model))
            route, saved = "merged", score(candidate, teacher, sets) if sets else {}
    found = regressions(before, saved, tolerance, fit_text=fit_text) if guard else []
    if found:
        logger.warning("distill: recovery made the model worse (%s); kept the model from before recovery",
                       "; ".join(found))
        if use_lora:
            drop_adapter(model)  # LoRA never touched the base weights
        elif snapshot is not None:
            restore(model, snapshot)
        route = "none"
    elif route == "adapter":
        keep_adapter(train_model)
    elif candidate is not None:
        drop_adapter(model)
        _transplant(model, candidate)
    elif use_lora:
        merge_lora(train_model)
    quality = {label: {"before": before.get(label), "trained": trained.get(label), "saved": saved.get(label)}
               for label in before}
    return {"quality": quality, "route": route, "kept": KEPT_BEFORE if found else KEPT_RECOVERED,
            "regressions": found, "adapter_kept": adapter_summary(model) if route == "adapter" else None}
