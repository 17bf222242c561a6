"""Recovery fine-tuning: ``recover: auto`` recipe expansion, and LoRA (QLoRA-style) training of bnb-quantized models.

``recover`` may be set at the top of a recipe (every pruning stage gets a recovery step) or on one pruning stage (that
stage only; it wins over the top-level value). A pruning stage is any stage whose config declares a ``recover`` field
(see `hfsqueeze.core.config.StageConfig`), so this module names no other method. Its value is ``auto`` (the defaults
below), a mapping of `DistillConfig` overrides, or ``none``/``false``. `expand_recovery` turns it into explicit
``distill`` stages, so the saved recipe says exactly what ran and expanding twice changes nothing.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from ...core.errors import RecipeError, require_backend
from .config import DistillConfig, LoraConfig

logger = logging.getLogger("hfsqueeze")

# Pure distillation: recovery imitates the original model (alpha 1.0). The hard-label half of the loss fits the model
# to the one text it trains on: measured on SmolLM2 nf4 + LoRA, alpha 0.5 raised KL to the original on out-of-domain
# text by 6% over alpha 1.0 while lowering in-domain perplexity (see recipes/README.md). Sized for minutes on a CPU.
RECOVER_DEFAULTS: dict[str, Any] = {
    "teacher": "original",
    "temperature": 2.0,
    "alpha": 1.0,
    "data": {"text": "calibration", "eval_tokens": 2048},
    "freeze_embeddings": True,
    "student_dropout": False,
    "training_args": {"max_steps": 40, "per_device_train_batch_size": 4, "learning_rate": 2e-4,
                      "warmup_steps": 0.1},
}


def recovery_config(value: Any, where: str = "recover") -> DistillConfig | None:
    """The `DistillConfig` a ``recover`` value stands for, or ``None`` when recovery is off."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("none", "off", "false")):
        return None
    if value is True or value == "auto":
        overrides: dict[str, Any] = {}
    elif isinstance(value, dict):
        overrides = value
    else:
        raise RecipeError(f"{where}: got {value!r}; allowed: auto, none, or a mapping of distill options "
                          f"(e.g. {{training_args: {{max_steps: 50}}}})")
    merged = copy.deepcopy(RECOVER_DEFAULTS)
    for key, item in overrides.items():
        if isinstance(item, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **item}
        else:
            merged[key] = item
    return DistillConfig.from_dict(merged, where=where)


def expand_recovery(recipe: Any) -> Any:
    """Return a copy of ``recipe`` with a ``distill`` stage after each pruning stage that asks for recovery.

    Reads ``recipe.recover`` and each pruning stage's ``recover`` attribute (both optional); a pruning stage already
    followed by a ``distill`` stage is left alone. The copy has every ``recover`` cleared, so it is idempotent.

    Example:

    ```python
    recipe = Recipe.load({"recover": "auto", "stages": [{"method": "prune", "heads": 0.25}]})
    expand_recovery(recipe).stages  # [PruneConfig(...), DistillConfig(teacher='original', ...)]
    ```
    """
    top = getattr(recipe, "recover", None)
    stages = list(recipe.stages)
    out = []
    for i, stage in enumerate(stages):
        out.append(stage)
        if not hasattr(stage, "recover"):  # only configs that declare a `recover` field take part
            continue
        own = getattr(stage, "recover", None)
        value = own if own is not None else top
        where = f"stage {i + 1} ({stage.method}): key 'recover'" if own is not None else "recipe: key 'recover'"
        config = recovery_config(value, where)
        following = stages[i + 1] if i + 1 < len(stages) else None
        if config is None or (following is not None and following.method == DistillConfig.method):
            continue
        out.append(config)
    if len(out) == len(stages) and top is None and not any(getattr(s, "recover", None) for s in stages):
        return recipe
    expanded = copy.deepcopy(recipe)
    expanded.stages = [copy.deepcopy(s) for s in out]
    for stage in expanded.stages:
        if getattr(stage, "recover", None) is not None:
            stage.recover = None
    if hasattr(expanded, "recover"):
        expanded.recover = None
    logger.info("recover: %d recovery stage(s) inserted", len(out) - len(stages))
    return expanded


# ---- QLoRA ------------------------------------------------------------------------------------------------------


def attach_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap ``model`` (modified in place) in a peft `PeftModel` with trainable LoRA adapters; the rest is frozen."""
    peft = require_backend("peft")
    lora = peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target_modules,
        bias="none",
    )
    peft_model = peft.get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("recovery: training %d LoRA parameters on the bnb-quantized model", trainable)
    return peft_model


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Merge the adapters into the (re-quantized) base weights and remove them; returns the base model.

    Merging keeps the artifact a plain bnb checkpoint that reloads with ``from_pretrained`` and no peft; the cost is
    that the merged update is rounded to the quantization grid.
    """
    model = peft_model.merge_and_unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model
