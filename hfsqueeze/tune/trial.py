"""One trial of `hfsqueeze.tune`: a point of the space made into a concrete recipe, applied and measured for real.

A fresh copy of the original model (deep-copied from memory) goes through the point's stages; the quantize stage's
``skip_modules`` comes from the solver run on the model as it is just before quantizing. Then it is measured: disk
size as saved, KL / perplexity / top-1 against the original on the calibration tokens, and prefill/decode latency
as ratios to the original timed side by side in this process.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.context import CompressionContext
from ..core.errors import RecipeError
from ..core.hf import count_parameters, sharing_copy
from ..core.quality import REFERENCE_DTYPE, score_lm
from ..evaluation.measure import disk_bytes, interleaved_latency
from ..registry import stages as registered_stages
from .budget import Budget
from .sensitivity import find_layers, format_key
from .solve import SizeModel, Solution, estimate_bytes, solve
from .space import Plan, Space, plan_of, run_stages


@dataclasses.dataclass
class TuneSettings:
    """How much work each measurement does (defaults suit a 135M model on 2 CPU cores)."""

    calibration_tokens: int = 1024
    seq_len: int = 512
    sensitivity_tokens: int = 256
    latency: bool | None = None  # None: only when the budget limits or minimizes latency (`tune`)
    prompt_tokens: int = 64
    decode_tokens: int = 8
    latency_rounds: int = 3

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise RecipeError(f"settings: key '{field.name}': got {value!r}; must be an integer >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, value: TuneSettings | dict[str, Any] | None) -> TuneSettings:
        """From a `TuneSettings`, a dict of its fields (unknown keys refused in one line) or ``None``."""
        if isinstance(value, cls):
            return value
        value = dict(value or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise RecipeError(f"settings: unknown key {unknown[0]!r}; allowed: {', '.join(known)}")
        try:
            return cls(**value)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"settings: {exc}") from None


@dataclasses.dataclass
class TrialContext:
    """What every trial in one process needs: the original, its reference outputs, budget, space, sensitivities."""

    original: nn.Module
    tokenizer: Any
    calibration: Any
    blocks: torch.Tensor
    budget: Budget
    space: Space
    settings: TuneSettings
    sensitivity: dict[str, dict[str, Any]]
    original_bytes: int
    original_params: int
    reference: list[torch.Tensor] = dataclasses.field(default_factory=list)
    original_nll: float = 0.0
    sizes: SizeModel = dataclasses.field(default_factory=SizeModel)
    importance_cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # `CompressionContext.scores_cache`
    workdir: Path | None = None
    _teacher: nn.Module | None = None

    @property
    def teacher(self) -> nn.Module:
        """A frozen copy of the original, as `compress` gives a distill stage (the original itself stays as it is).

        It shares the original's tensors (`sharing_copy`): nothing in tune writes into the original, and the teacher
        only runs forward, so one set of fp32 weights serves both."""
        if self._teacher is None:
            self._teacher = sharing_copy(self.original)
            self._teacher.eval()
            self._teacher.requires_grad_(False)
        return self._teacher

    def __post_init__(self):
        if not self.reference:
            # Kept in 16-bit, as `compress` keeps its reference (vocabulary-sized, one per block).
            score = score_lm(self.original, self.blocks, keep=REFERENCE_DTYPE)
            self.reference, self.original_nll = score.reference, score.mean_nll


_MAX_LOG = 700.0  # math.exp overflows just above 709


def quality(model: nn.Module, tctx: TrialContext) -> dict[str, float]:
    """KL(original || model) per token, perplexity ratio and top-1 agreement on the calibration blocks."""
    score = score_lm(model, tctx.blocks, tctx.reference)
    kl, nll = score.kl, score.mean_nll
    if not (math.isfinite(kl) and math.isfinite(nll)) or nll > _MAX_LOG:
        # Recorded as a failed trial with this reason (optuna's own words would be "The value nan is not acceptable").
        raise FloatingPointError("the compressed model's outputs are not finite (NaN/inf, or a perplexity beyond e^700) "
                                 "on the calibration text")
    return {"kl_divergence": score.kl_per_token, "top1_agreement": score.top1,
            "ppl": math.exp(nll - tctx.original_nll), "perplexity": math.exp(nll),
            "perplexity_original": math.exp(tctx.original_nll)}


def latency_ratios(model: nn.Module, original: nn.Module, settings: TuneSettings, prompt: torch.Tensor
                   ) -> dict[str, float | None]:
    """Prefill and decode time of ``model`` over the original's, alternating the two in every round so a change in
    machine load hits both alike (`hfsqueeze.evaluation.measure.interleaved_latency`)."""
    prompt = prompt[: settings.prompt_tokens].unsqueeze(0)
    orig, new = interleaved_latency([original, model], prompt, decode_tokens=settings.decode_tokens,
                                    repeats=settings.latency_rounds)
    out: dict[str, float | None] = {"load_average": new.get("load_average")}
    for key in ("prefill", "decode"):
        a, b = new.get(f"{key}_ms_per_token"), orig.get(f"{key}_ms_per_token")
        out[key] = a / b if a and b else None
        out[f"{key}_ms"] = a
    return out


def _layer_name_map(model: nn.Module, details: list[dict[str, Any]]) -> Callable[[str], str] | None:
    """After layers were dropped, map ``<blocks>.J.`` names back to the original layer index (for the scores)."""
    kept = next((d["layers_kept"] for d in reversed(details) if "layers_kept" in d), None)  # the last that cut layers
    found = find_layers(model)
    if not kept or found is None or kept == list(range(len(kept))):
        return None
    head = found[0] + "."

    def name_map(name: str) -> str:
        if not name.startswith(head):
            return name
        index, _, rest = name[len(head):].partition(".")
        return f"{head}{kept[int(index)]}.{rest}"

    return name_map


def _solve(tctx: TrialContext, model: nn.Module, plan: Plan, details: list[dict[str, Any]]) -> Solution | None:
    if plan.bits not in (4, 8):
        return None
    scores = tctx.sensitivity[format_key(plan.quantize)]["scores"]
    return solve(
        model, plan.quantize, plan.rest_dtype, scores, keep=plan.keep,
        size_limit=tctx.budget.size_limit_bytes(tctx.original_bytes, tctx.original_params),
        kl_target=tctx.budget.quality_kl_target(), name_map=_layer_name_map(model, details), sizes=tctx.sizes,
    )


def predict(tctx: TrialContext, point: dict[str, Any]) -> tuple[int, list[dict[str, Any]]] | None:
    """The disk size (exact to about 0.01%) and the explicit stages of a point that only quantizes, without building
    it; ``None`` when the point prunes first (its size is only known once pruned)."""
    plan = plan_of(point)
    if plan.pre_stages or plan.quantize is None:
        return None
    solution = _solve(tctx, tctx.original, plan, [])
    if solution is not None:
        return solution.predicted_bytes, plan.stages(solution.skip_modules)
    return estimate_bytes(tctx.original, None, plan.quantize["dtype"], sizes=tctx.sizes), plan.stages()


def build(tctx: TrialContext, plan: Plan) -> tuple[nn.Module, list[dict[str, Any]], Solution | None]:
    """Apply ``plan`` to a fresh copy of the original; return the model, the explicit stages and the solution."""
    # Quantizing only replaces modules and rebinds `.data` (casts): it can start from a copy that shares the
    # original's tensors. Pruning and recovery write into weights, so they get a full copy.
    model = sharing_copy(tctx.original) if not plan.pre_stages else copy.deepcopy(tctx.original)
    # A stage that scores the model (prune) scores the original once (the cache lives as long as this process's
    # context).
    ctx = CompressionContext(tokenizer=tctx.tokenizer, calibration=tctx.calibration,
                             scores_cache=tctx.importance_cache)
    if any(s.get("recover") for s in plan.pre_stages):  # recovery distills from the original
        ctx.original = tctx.teacher
    details = run_stages(model, plan.pre_stages, ctx)
    solution = _solve(tctx, model, plan, details)
    stages = plan.stages(solution.skip_modules if solution else None)
    run_stages(model, stages[len(plan.pre_stages):], ctx)
    return model, stages, solution


def run_point(tctx: TrialContext, point: dict[str, Any]) -> dict[str, Any]:
    """Build and measure one point; returns ``stages`` (the explicit recipe), ``metrics`` and ``solution``."""
    start = time.perf_counter()
    plan = plan_of(point)
    model, stages, solution = build(tctx, plan)
    build_seconds = time.perf_counter() - start
    size = disk_bytes(model, registered_stages())  # before any forward (bnb 4-bit CPU repacking, see `compat.bnb`)
    metrics: dict[str, Any] = {
        "disk_bytes": size, "size": size / tctx.original_bytes, "bits": 8 * size / tctx.original_params,
        "parameters": count_parameters(model),
    }
    metrics.update(quality(model, tctx))
    if tctx.settings.latency:
        metrics.update(latency_ratios(model, tctx.original, tctx.settings, tctx.blocks[0]))
    else:
        metrics.update({"prefill": None, "decode": None})
    del model
    return {"stages": stages, "metrics": metrics, "solution": solution.to_dict() if solution else None,
            "build_seconds": round(build_seconds, 2), "seconds": round(time.perf_counter() - start, 2)}


__all__ = ["TrialContext", "TuneSettings", "build", "latency_ratios", "predict", "quality", "run_point"]
