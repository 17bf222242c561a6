"""The stage registry: a method name maps to its `Stage` (see `hfsqueeze.core.stage`).

This is the one module that imports the method folders, the way ``transformers/quantizers/auto.py`` holds its
quantizers; everything above it (recipes, compress, save, card, hub) asks it for stages and never imports a method.
A fourth method is one folder under ``methods/`` plus one line below. Registering imports nothing heavy: a stage's
backend (bitsandbytes, peft, the Trainer) is imported when the stage runs. A duplicate name is refused, and an unknown
one lists the valid names.
"""

from __future__ import annotations

from typing import Any, Callable

from .core.config import StageConfig
from .core.errors import RecipeError
from .core.stage import FunctionStage, Stage
from .methods.distill import DistillStage
from .methods.prune import PruneStage
from .methods.quantize import QuantizeStage

_REGISTRY: dict[str, Stage] = {}


def _add(stage: Stage) -> Stage:
    if not stage.name:
        raise ValueError(f"{type(stage).__name__} has no name")
    if stage.name in _REGISTRY:
        raise ValueError(f"a stage named '{stage.name}' is already registered")
    if getattr(stage.config_cls, "method", None) != stage.name:
        raise ValueError(f"{stage.config_cls.__name__}.method must be '{stage.name}'")
    _REGISTRY[stage.name] = stage
    return stage


def register_stage(stage: Stage | str, config_cls: type[StageConfig] | None = None, *,
                   validate: Callable | None = None) -> Any:
    """Register a `Stage` (``register_stage(MyStage())``), or, as a decorator, an apply function (with an optional
    ``validate(config, info)``, see `Stage.validate`).

    Example:

    ```python
    hfsqueeze.register_stage(CastStage())

    @register_stage("cast", CastConfig)
    def apply_cast(model, config, context):
        model.to(torch.bfloat16)
        return {"format": "bf16"}
    ```
    """
    if isinstance(stage, Stage):
        return _add(stage)
    if config_cls is None:
        raise TypeError("register_stage(name, config_cls) needs the config class")

    def decorator(fn: Callable) -> Callable:
        _add(FunctionStage(stage, config_cls, fn, validate))
        return fn

    return decorator


def unregister_stage(name: str) -> Stage:
    """Remove the stage ``name`` and return it (for plugins and tests that register a stage for a while)."""
    return _REGISTRY.pop(name)


def get_stage(name: str) -> Stage:
    if name not in _REGISTRY:
        raise RecipeError(f"unknown method {name!r}; allowed: {', '.join(available_stages())}")
    return _REGISTRY[name]


def find_stage(name: str | None) -> Stage | None:
    """The stage ``name``, or ``None`` for a method this installation does not know (e.g. in an old report)."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def available_stages() -> list[str]:
    return sorted(_REGISTRY)


def stages() -> list[Stage]:
    """Every registered stage, in registration order (save hooks, loaders and recipe expansion run in this order)."""
    return list(_REGISTRY.values())


register_stage(QuantizeStage())
register_stage(PruneStage())
register_stage(DistillStage())
