"""`DistillStage`: the distill method's life: checks, recovery insertion (``recover:``), apply, card wording."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.context import CompressionContext
from ...core.errors import RecipeError
from ...core.search import OPTIONAL, Param
from ...core.stage import Description, ModelInfo, Stage, format_of
from .card import load_note, recovery_section
from .config import DistillConfig, check_sources, check_student, check_tasks, uses_lora
from .launch import Launch, check_launch
from .recover import expand_recovery


class DistillStage(Stage):
    """Knowledge distillation from a frozen teacher (see `apply_distill`); recovery after pruning (``recover:``)."""

    name = "distill"
    config_cls = DistillConfig

    def validate(self, config: DistillConfig, info: ModelInfo) -> ModelInfo | None:
        check_sources(config)
        # An engine accelerate would silently replace (FSDP on CPU processes, ...) fails before anything is measured.
        check_launch(Launch.detect(config.resolved_training_args()), torch.cuda.is_available())
        if info.frozen_by and config.adapter == "none":
            raise RecipeError(f"adapter: none cannot train after a {info.frozen_by} stage (quantized weights cannot "
                              "be fine-tuned directly); use adapter: auto or lora")
        uses_lora(config, info.quantized)
        if info.architecture:
            check_tasks(config, info.architecture)
        n_layers = check_student(config, info.num_layers)
        # A student is another model: its layer count is new and the loaded model no longer describes it.
        return info.replace(num_layers=n_layers, model=None) if config.student is not None else None

    def apply(self, model: nn.Module, config: DistillConfig, ctx: CompressionContext) -> dict[str, Any]:
        # Deferred: the training stack (transformers.Trainer, accelerate) takes seconds to import, and only a
        # recipe with a distill stage needs it; every other command stays fast.
        from .apply import apply_distill

        return apply_distill(model, config, ctx)

    def expand(self, recipe: Any) -> Any:
        return expand_recovery(recipe)

    def describe(self, config: dict[str, Any], details: dict[str, Any]) -> Description:
        teacher = config.get("teacher")
        label = "knowledge distillation" + (f" from `{teacher}`" if teacher else "")
        return Description(label=label, short=format_of(details) or "distilled", tags=["distillation"],
                           section_title="Recovery", section=recovery_section(details), load_note=load_note(details))

    def search_space(self, info: ModelInfo | None = None) -> dict[str, Param]:
        return {
            OPTIONAL: Param.choice(True, False),
            "training_args.max_steps": Param.range(25, 400, log=True, integer=True),
            "alpha": Param.range(0.0, 1.0, step=0.25),
            "temperature": Param.choice(1.0, 2.0, 4.0),
        }
