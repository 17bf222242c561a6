"""The chosen point, built for real: rebuilt with `compress` from the original, re-measured on the held-out evaluation
text, and tried once more calibrated.

Calibration (GPTQ rounding for 4-bit, folded SmoothQuant scales for int8) keeps a point's format and size, so it is
not a dimension of the search: a calibrated trial would cost minutes where a round-to-nearest one costs seconds, and
the per-module sensitivities the solver uses are round-to-nearest ones. Instead the chosen point is built a second
time with each stage's calibrated variant (`Stage.calibrated`), both builds are measured on the evaluation text, and
the one with the lower KL to the original is kept; the tuning section records both numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any

from ..api import compress
from ..core.errors import RecipeError, UnsupportedModelError
from ..core.hf import sharing_copy
from ..core.memory import unshare
from ..recipe import Recipe
from ..registry import get_stage

logger = logging.getLogger("hfsqueeze")


def calibrated_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``stages`` with each stage's calibrated variant in place of it (`Stage.calibrated`); ``None`` when no stage
    has one."""
    out, changed = [], False
    for stage in stages:
        variant = get_stage(stage["method"]).calibrated(stage)
        changed = changed or variant is not None
        out.append(copy.deepcopy(variant if variant is not None else stage))
    return out if changed else None


def _loss(report: Any) -> float | None:
    """What the two builds are compared on: the mean KL to the original over the evaluation texts."""
    final = report.final
    if final is None:
        return None
    texts = [t.get("kl_divergence") for t in (final.texts or {}).values()]
    values = [v for v in texts if v is not None] or ([final.kl_divergence] if final.kl_divergence is not None else [])
    return sum(values) / len(values) if values else None


def _quality(report: Any) -> dict[str, Any] | None:
    """A build's quality on the evaluation text(s), as the report's final metrics hold it."""
    final = report.final
    if final is None:
        return None
    return {k: getattr(final, k) for k in ("perplexity", "kl_divergence", "top1_agreement", "texts")}


@dataclasses.dataclass
class FinalBuild:
    """How the chosen point is built: the tokenizer, the texts and evaluation settings `compress` gets, whether to
    try it calibrated, and until when (the time budget's deadline)."""

    tokenizer: Any
    calibration: Any
    eval_text: Any
    evaluation: dict[str, Any]
    command: str | None
    calibrate: bool = True
    deadline: float | None = None

    def build(self, model: Any, stages: list[dict[str, Any]], description: str) -> tuple[Any, Any]:
        """``stages`` applied to a copy of ``model`` with `compress` (measured); returns ``(final, report)``."""
        recipe = {"name": "tuned", "description": description, "evaluation": self.evaluation, "stages": stages}
        # A recipe that writes into no tensor (quantize, LoRA recovery) starts from a copy sharing the original's
        # weights, as the trials do: a deep copy would hold a second fp32 model. The tensors still shared at the end
        # (embeddings, norms) are copied then, so the returned model owns all of its weights.
        shared = Recipe.load(recipe).keeps_tensors(model)
        final = sharing_copy(model) if shared else copy.deepcopy(model)
        report = compress(final, recipe, tokenizer=self.tokenizer, calibration=self.calibration,
                          eval_text=self.eval_text, command=self.command)
        if shared:
            unshare(final, model)
        return final, report

    def refine(self, model: Any, stages: list[dict[str, Any]], description: str, final: Any,
               report: Any) -> tuple[Any, Any, dict[str, Any] | None]:
        """Build ``stages`` calibrated too and keep the build with the lower evaluation KL. Returns ``(final,
        report, record)``; ``record`` (the tuning section's ``calibrated``) is ``None`` when nothing could be
        calibrated, and says why when a calibrated build was not tried or failed."""
        variant = calibrated_stages(stages) if self.calibrate else None
        if variant is None:
            return final, report, None
        if self.deadline is not None and time.time() >= self.deadline:
            return final, report, {"tried": False, "why": "the time budget ran out"}
        logger.info("tune: building the chosen point again, calibrated, to keep the better of the two")
        start = time.perf_counter()
        try:
            calibrated, cal_report = self.build(model, variant, description + " (calibrated)")
        except (RecipeError, UnsupportedModelError) as exc:
            logger.warning("tune: the calibrated build failed (%s); keeping round-to-nearest", exc)
            return final, report, {"tried": False, "why": str(exc)}
        plain_kl, cal_kl = _loss(report), _loss(cal_report)
        keep = plain_kl is not None and cal_kl is not None and cal_kl < plain_kl
        record = {"tried": True, "won": keep, "kl_divergence": {"round_to_nearest": plain_kl, "calibrated": cal_kl},
                  "seconds": round(time.perf_counter() - start, 1),
                  "final": {"round_to_nearest": _quality(report), "calibrated": _quality(cal_report)}}
        logger.info("tune: evaluation KL %.4g round-to-nearest, %.4g calibrated: keeping the %s build",
                    plain_kl or float("nan"), cal_kl or float("nan"), "calibrated" if keep else "round-to-nearest")
        if keep:
            return calibrated, cal_report, record
        del calibrated
        return final, report, record


__all__ = ["FinalBuild", "calibrated_stages"]
