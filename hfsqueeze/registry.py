"""The stage registry: a method name maps to its config class, its apply function and its up-front checks.

Stages register explicitly with `register_stage`; a duplicate name is refused and an unknown one lists the valid
names. Registering imports nothing heavy: a stage's backend (bitsandbytes, peft) is imported inside ``apply``.

A stage may also register ``validate(config, info)``: the checks that can run before any expensive work (what model
types it supports, targets the model cannot meet, stage order). `validate_stages` runs them for a whole recipe, with
the model (``hfsqueeze.compress``, before the baseline is measured) or without one (``hfsqueeze validate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .errors import HfSqueezeError, RecipeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .config import StageConfig
    from .context import CompressionContext

ApplyFn = Callable[["PreTrainedModel", "StageConfig", "CompressionContext"], dict[str, Any]]


@dataclass(frozen=True)
class ModelInfo:
    """What a stage's ``validate`` sees before anything runs.

    Attributes:
        model (`PreTrainedModel`, *optional*): the model as loaded, or ``None`` when only the recipe is checked.
            Earlier stages may still change it (fewer layers, quantized weights): check only what they cannot undo.
        previous (`tuple[StageConfig, ...]`): the configs of the stages that run before this one.
    """

    model: Any = None
    previous: tuple = ()


ValidateFn = Callable[["StageConfig", ModelInfo], None]


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type
    apply: ApplyFn
    validate: ValidateFn | None = None


_REGISTRY: dict[str, StageSpec] = {}


def register_stage(name: str, config_cls: type, *, validate: ValidateFn | None = None
                   ) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply(model, config, context) -> details`` as the stage ``name``.

    ``validate(config, info)`` (optional) raises `RecipeError` / `UnsupportedModelError` for what can be known
    before the stage runs; ``info`` is a `ModelInfo`. It must be cheap: no forward passes, no data.

    Example:

    ```python
    @register_stage("quantize", QuantizeConfig)
    def apply_quantize(model, config, context):
        ...
        return {"quantized_modules": 84}
    ```
    """

    def decorator(fn: ApplyFn) -> ApplyFn:
        if name in _REGISTRY:
            raise ValueError(f"a stage named '{name}' is already registered")
        if getattr(config_cls, "method", None) != name:
            raise ValueError(f"{config_cls.__name__}.method must be '{name}'")
        _REGISTRY[name] = StageSpec(name, config_cls, fn, validate)
        return fn

    return decorator


def _ensure_builtin_stages() -> None:
    from . import methods  # noqa: F401  (registers quantize, prune, distill)


def get_stage(name: str) -> StageSpec:
    _ensure_builtin_stages()
    if name not in _REGISTRY:
        raise RecipeError(f"unknown method {name!r}; allowed: {', '.join(available_stages())}")
    return _REGISTRY[name]


def recipe_expanders() -> list[Callable[[Any], Any]]:
    """The hooks stage packages registered to rewrite a recipe before it runs (``methods.RECIPE_EXPANDERS``)."""
    _ensure_builtin_stages()
    from . import methods

    return list(getattr(methods, "RECIPE_EXPANDERS", []))


def available_stages() -> list[str]:
    _ensure_builtin_stages()
    return sorted(_REGISTRY)


def validate_stages(stages: list["StageConfig"], model: Any = None) -> None:
    """Run every stage's ``validate`` in recipe order; an error names the stage (``stage 2 (prune): ...``)."""
    for index, stage in enumerate(stages, start=1):
        spec = get_stage(stage.method)
        if spec.validate is None:
            continue
        try:
            spec.validate(stage, ModelInfo(model=model, previous=tuple(stages[: index - 1])))
        except HfSqueezeError as exc:
            prefix = f"stage {index} ({stage.method}): "
            message = str(exc)
            raise type(exc)(message if message.startswith(prefix) else prefix + message) from None
