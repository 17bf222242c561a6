"""`DistillStage`: the distill method's life: checks, recovery insertion (``recover:``), apply, card wording."""

from __future__ import annotations

from typing import Any

from torch import nn

from ...core.context import CompressionContext
from ...core.search import OPTIONAL, Param
from ...core.stage import Description, ModelInfo, Stage, format_of
from .config import DistillConfig, check_tasks, uses_lora
from .recover import expand_recovery


def _student_layers(config: DistillConfig, info: ModelInfo) -> int | None:
    """The layer count of the student the config builds (``None``: unknown before it runs)."""
    student = config.student
    if student.layers is not None:
        return len(student.layers)
    if isinstance(student.keep, int):
        return student.keep
    if student.keep is not None and info.num_layers is not None:
        return max(1, round(student.keep * info.num_layers))
    layers = (student.config or {}).get("num_hidden_layers")
    return layers if isinstance(layers, int) else None


class DistillStage(Stage):
    """Knowledge distillation from a frozen teacher (see `apply_distill`); recovery after pruning (``recover:``)."""

    name = "distill"
    config_cls = DistillConfig

    def validate(self, config: DistillConfig, info: ModelInfo) -> ModelInfo | None:
        check_tasks(config, info.architecture)
        uses_lora(config, info.quantized)
        if config.student is None:
            return None
        return info.replace(num_layers=_student_layers(config, info))

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
        return Description(label=label, short=format_of(details) or "distilled", tags=["distillation"])

    def search_space(self, info: ModelInfo | None = None) -> dict[str, Param]:
        return {
            OPTIONAL: Param.choice(True, False),
            "training_args.max_steps": Param.range(25, 400, log=True, integer=True),
            "alpha": Param.range(0.0, 1.0, step=0.25),
            "temperature": Param.choice(1.0, 2.0, 4.0),
        }
