"""The one loop that applies a recipe's stages to a model: `hfsqueeze.compress` and every tune trial run through it.

For each stage it sets the stage's number in the context, takes a frozen copy of the model as it enters when the stage
asks for one (``previous``, dropped once the stage has run), applies the stage in place, puts the model back in eval
mode and records the stage's details in ``ctx.results`` for the stages after it. What a caller does with each applied
stage (compress measures it into the report, a tune trial nothing) is the ``after`` callback.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

from .config import StageConfig
from .hf import frozen_copy

if TYPE_CHECKING:
    from torch import nn

    from .context import CompressionContext
    from .stage import Stage

logger = logging.getLogger("hfsqueeze")


@dataclasses.dataclass
class AppliedStage:
    """One stage as the runner applied it.

    Attributes:
        index: its 1-based number among all stages applied with this context.
        config: its config.
        details: what its `Stage.apply` returned (``{}`` for nothing).
        seconds: how long `Stage.apply` took.
    """

    index: int
    config: StageConfig
    details: dict[str, Any]
    seconds: float


def run_stages(model: "nn.Module", configs: Iterable[StageConfig], ctx: "CompressionContext",
               stage_of: Callable[[str], "Stage"], *, after: Callable[[AppliedStage], None] | None = None,
               total: int | None = None) -> list[AppliedStage]:
    """Apply ``configs`` to ``model`` in place, in order, numbering them after the stages ``ctx`` already holds.

    Args:
        model (`nn.Module`): the model; changed in place and left in eval mode.
        configs: the stage configs, as `Recipe.stages` holds them (already expanded).
        ctx (`CompressionContext`): shared by the stages; ``stage_index``, ``previous`` and ``results`` are set here.
        stage_of: the stage for a method name (the registry's ``get_stage``: ``core`` cannot import it).
        after (*optional*): called with each applied stage before the next one runs (compress measures it here).
        total (*optional*): the number of stages in the whole run, for the ``stage i/n`` log line; ``None``: no
            log line (a tune trial runs many recipes).

    Returns:
        `list[AppliedStage]`: the stages applied by this call.
    """
    applied = []
    for index, config in enumerate(configs, start=len(ctx.results) + 1):
        ctx.stage_index = index
        ctx.previous = frozen_copy(model) if config.snapshot_needed() == "previous" else None
        if total is not None:
            logger.info("stage %d/%d: %s", index, total, config.method)
        start = time.perf_counter()
        details = stage_of(config.method).apply(model, config, ctx) or {}
        seconds = time.perf_counter() - start
        ctx.previous = None  # the copy is the stage's alone: do not hold it while the caller measures
        model.eval()
        applied.append(AppliedStage(index, config, details, seconds))
        if after is not None:
            after(applied[-1])
        ctx.results.append({"method": config.method, **details})
    return applied


__all__ = ["AppliedStage", "run_stages"]
