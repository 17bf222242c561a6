"""The stage registry: a method name maps to its config class and its apply function.

Stages register explicitly with `register_stage`; a duplicate name is refused and an unknown one lists the valid
names. Registering imports nothing heavy: a stage's backend (bitsandbytes, peft) is imported inside ``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .errors import RecipeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .config import StageConfig
    from .context import CompressionContext

ApplyFn = Callable[["PreTrainedModel", "StageConfig", "CompressionContext"], dict[str, Any]]


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type
    apply: ApplyFn


_REGISTRY: dict[str, StageSpec] = {}


def register_stage(name: str, config_cls: type) -> Callable[[ApplyFn], ApplyFn]:
    """Register ``apply(model, config, context) -> details`` as the stage ``name``.

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
        _REGISTRY[name] = StageSpec(name, config_cls, fn)
        return fn

    return decorator


def _ensure_builtin_stages() -> None:
    from . import methods  # noqa: F401  (registers quantize, prune, distill)


def get_stage(name: str) -> StageSpec:
    _ensure_builtin_stages()
    if name not in _REGISTRY:
        raise RecipeError(f"unknown method {name!r}; allowed: {', '.join(available_stages())}")
    return _REGISTRY[name]


def available_stages() -> list[str]:
    _ensure_builtin_stages()
    return sorted(_REGISTRY)
