"""The ``prune`` stage, in named steps: plan (targets from the config and the model), then per step score, choose
and cut, and at the end the report. ``steps > 1`` re-scores the pruned model between steps."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from typing import Any

import torch
from torch import nn

from ...core.errors import HfSqueezeWarning, UnsupportedModelError, prefixed
from ...core.hf import count_parameters, is_causal_lm
from ...core.stage import ModelInfo
from .checks import check_layers, check_prunable, check_targets, target_count
from .config import PruneConfig
from .importance import Scores, activation_scores, gradient_scores, head_units, kl_scores, magnitude_scores
from .reconstruct import InputMoments, reconstruct
from .surgery import (
    FAMILIES,
    PLAN_KEY,
    attention_shape,
    current_plan,
    drop_layers,
    ffn_output_proj,
    ffn_width,
    head_output_proj,
    layer_list,
    prune_ffn,
    prune_heads,
)

logger = logging.getLogger("hfsqueeze")


class PruneWarning(HfSqueezeWarning):
    """A prune target could not be met exactly (rounding, ``min_heads_per_layer`` or ``protect_layers``)."""


def calibration_blocks(model: nn.Module, config: PruneConfig, ctx: Any, max_tokens: int) -> torch.Tensor:
    """Token blocks from the calibration source; encoders get [CLS] ... [SEP] around each block."""
    causal = is_causal_lm(model)
    seq_len = config.seq_len or (512 if causal else 128)
    max_pos = getattr(model.config, "max_position_embeddings", None) or seq_len
    tok = ctx.require_tokenizer("calibration data (data-driven importance scores, reconstruct)")
    if causal:
        seq_len = min(seq_len, max_pos)
        return ctx.calibration_blocks(max_tokens=max_tokens, seq_len=seq_len, source=config.calibration)
    seq_len = min(seq_len, max_pos - 2)
    blocks = ctx.calibration_blocks(max_tokens=max_tokens, seq_len=seq_len - 2, source=config.calibration)
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    if cls_id is None or sep_id is None:
        return blocks
    n = blocks.shape[0]
    return torch.cat([torch.full((n, 1), cls_id), blocks, torch.full((n, 1), sep_id)], dim=1)


def _cached_blocks(model: nn.Module, config: PruneConfig, ctx: Any, cache: dict[str, Any]) -> torch.Tensor:
    """The calibration blocks, tokenized once per stage (scoring and reconstruction, every step, use the same)."""
    if "blocks" not in cache:
        cache["blocks"] = calibration_blocks(model, config, ctx, config.calibration_tokens)
    return cache["blocks"]


def compute_scores(
    family: str,
    model: nn.Module,
    config: PruneConfig,
    ctx: Any,
    *,
    layers: bool,
    cache: dict[str, Any] | None = None,
) -> tuple[Scores, list[list[tuple[list[int], list[int]]]]]:
    """Score the current model's head units, FFN neurons and (when ``layers``) layers with ``config.importance``.

    ``cache`` keeps the calibration blocks and the kl reference outputs between the steps of iterative pruning.
    """
    cache = cache if cache is not None else {}
    units = [head_units(*attention_shape(family, layer)[:2], config.gqa_mode) for layer in layer_list(family, model)]
    if config.importance == "magnitude":
        return magnitude_scores(family, model, units), units
    blocks = _cached_blocks(model, config, ctx, cache)
    logger.info("prune: scoring heads, FFN neurons%s by %s importance on %d calibration tokens",
                " and layers" if layers else "", config.importance, blocks.numel())
    if config.importance == "activation":
        return activation_scores(family, model, blocks, units, layers=layers), units
    grad = gradient_scores(family, model, blocks, units, layers=layers)
    if config.importance == "gradient":
        return grad, units
    if "kl_blocks" not in cache:
        cache["kl_blocks"] = calibration_blocks(model, config, ctx, config.kl_tokens)
    kl, cache["kl_reference"] = kl_scores(
        family, model, cache["kl_blocks"], units, layers=layers, reference=cache.get("kl_reference")
    )
    return Scores(heads=kl.heads, ffn=grad.ffn, layers=kl.layers), units


def first_step_scores(model: nn.Module, config: PruneConfig, ctx: Any, cache: dict[Any, Scores]) -> Scores:
    """The first step's scores of ``model`` for ``config``, kept in ``cache`` under everything they depend on.

    For a caller that prunes many copies of one model with different targets (``hfsqueeze.tune``): it scores the
    model once per importance setting instead of once per copy.
    """
    plan, _ = plan_prune(model, config)
    params = list(model.parameters())
    model_key = (tuple(tuple(p.shape) for p in params), float(params[0].detach().float().sum()),
                 float(params[-1].detach().float().sum()))
    key = (model_key, config.importance, config.gqa_mode, config.calibration, config.calibration_tokens,
           config.kl_tokens, config.seq_len, plan.layers_target > 0)
    if key not in cache:
        cache[key] = compute_scores(plan.family, model, config, ctx, layers=plan.layers_target > 0)[0]
    return cache[key]


def _normalized(scores: list[torch.Tensor], config: PruneConfig) -> list[torch.Tensor]:
    """Scores ready for ranking across layers: per-layer L2-normalized when ``config.normalize`` says so."""
    normalize = config.normalize if config.normalize is not None else config.importance == "activation"
    if not normalize:
        return [s.float() for s in scores]
    return [s.float() / s.float().norm().clamp_min(1e-12) for s in scores]


def _choose_global(
    scores: list[torch.Tensor], sizes: list[list[int]], min_keep: list[int], eligible: list[bool], need: int
) -> tuple[list[set[int]], int]:
    """Remove the lowest-scoring units across layers until ``need`` items (heads or neurons) are gone."""
    ranked = sorted(
        (float(s), layer, unit)
        for layer, layer_scores in enumerate(scores) if eligible[layer]
        for unit, s in enumerate(layer_scores.tolist())
    )
    removed: list[set[int]] = [set() for _ in scores]
    kept_items = [sum(s) for s in sizes]
    done = 0
    for _, layer, unit in ranked:
        if done >= need:
            break
        size = sizes[layer][unit]
        if done + size > need or kept_items[layer] - size < min_keep[layer]:
            continue
        removed[layer].add(unit)
        kept_items[layer] -= size
        done += size
    return removed, done


def _choose_layerwise(
    scores: list[torch.Tensor], counts: list[int], eligible: list[bool]
) -> list[set[int]]:
    removed: list[set[int]] = []
    for layer_scores, count, ok in zip(scores, counts, eligible):
        order = torch.argsort(layer_scores.float(), stable=True).tolist()
        removed.append(set(order[:count]) if ok and count > 0 else set())
    return removed


def _round_list(values: torch.Tensor | list, digits: int = 4) -> list[float]:
    values = values.tolist() if isinstance(values, torch.Tensor) else values
    return [float(f"{v:.{digits}g}") for v in values]


def sync_config(family: str, model: nn.Module) -> str:
    """Make the config describe the pruned shapes; return ``"stock"`` or ``"trust_remote_code"`` (how it reloads).

    A uniformly pruned Llama-family model whose config stays valid gets plain config values (stock Transformers
    rebuilds the same shapes); anything else keeps its config and records the per-layer plan under
    ``config.hfsqueeze_pruning``, which the class in the artifact's modeling file applies.
    """
    config = model.config
    plan = current_plan(family, model)
    uniform = all(len(set(plan[k])) == 1 for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size"))
    if FAMILIES[family].stock_reload and uniform:
        updates = {
            "num_attention_heads": plan["num_attention_heads"][0],
            "num_key_value_heads": plan["num_key_value_heads"][0],
            "intermediate_size": plan["intermediate_size"][0],
            "head_dim": attention_shape(family, layer_list(family, model)[0])[2],
        }
        if _stock_rebuilds(model, updates):
            for key, value in updates.items():
                setattr(config, key, value)
            if hasattr(config, PLAN_KEY):
                delattr(config, PLAN_KEY)
            return "stock"
    setattr(config, PLAN_KEY, plan)
    return "trust_remote_code"


def _stock_rebuilds(model: nn.Module, updates: dict[str, Any]) -> bool:
    """Whether the stock class, built from the config with ``updates``, has exactly the model's weight shapes."""
    config = model.config
    data = config.to_dict()
    data.pop(PLAN_KEY, None)
    data.update(updates)
    try:
        candidate = type(config).from_dict(data)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stock = type(model)(candidate)
    except Exception as exc:  # noqa: BLE001 - any refusal of the config means "not stock"
        logger.info("pruned config is not loadable by stock Transformers (%s); using a modeling file", exc)
        return False
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    return want == have


# ---- the stage -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Plan:
    """What the stage removes in all, fixed before the first step from the config and the model as it entered."""

    family: str
    protected: set[int]
    layers_target: int
    shapes: list[tuple[int, int, int]]  # per original layer: query heads, key/value heads, head_dim
    units: list[int]  # per original layer: head units
    ffn: list[int]  # per original layer: FFN width
    heads_target: int
    ffn_target: int

    @property
    def n_layers(self) -> int:
        return len(self.shapes)

    @property
    def heads_total(self) -> int:
        return sum(s[0] for s in self.shapes)


@dataclasses.dataclass
class _Progress:
    """Where the kept layers and heads came from, and what each step scored and removed."""

    original_ids: list[int]  # current layer position -> its index when the stage started
    head_ids: list[list[int]]  # per current layer: current query head -> its index when the stage started
    where: str = "stage 1 (prune)"  # the stage, for warnings
    warnings: list[str] = dataclasses.field(default_factory=list)  # what did not go as asked, for the report
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    scoring_seconds: float = 0.0
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)  # calibration blocks, kl reference

    def warn(self, message: str) -> None:
        """Record a warning for the report and emit it as a `PruneWarning` (the CLI prints it as one line)."""
        self.warnings.append(message)
        warnings.warn(f"{self.where}: {message}", PruneWarning, stacklevel=4)


@dataclasses.dataclass
class _Choice:
    """What one step removes, by current layer position."""

    drop: set[int]
    heads: list[set[int]]
    ffn: list[set[int]]


def plan_prune(model: nn.Module, config: PruneConfig) -> tuple[_Plan, list[str]]:
    """Check the model and the config against each other (before any scoring) and fix the targets; return the plan
    and the warnings about targets that round (see `check_targets`)."""
    family = check_prunable(ModelInfo.of(model))
    try:
        layers = list(layer_list(family, model))
    except AttributeError:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder layers where expected") from None
    notes = check_targets(family, model, config)
    protected, layers_target = check_layers(config, len(layers))
    shapes = [attention_shape(family, layer) for layer in layers]
    ffn = [ffn_width(family, layer) for layer in layers]
    plan = _Plan(family, protected, layers_target, shapes,
                 [len(head_units(n_q, n_kv, config.gqa_mode)) for n_q, n_kv, _ in shapes], ffn,
                 target_count(config.heads, sum(s[0] for s in shapes)), target_count(config.ffn, sum(ffn)))
    return plan, notes


def _score_step(model: nn.Module, config: PruneConfig, ctx: Any, plan: _Plan, progress: _Progress,
                given: Scores | None) -> tuple[Scores, list[list[tuple[list[int], list[int]]]]]:
    """Scores of the model as it is now (``given`` ones, computed on this very model, for the first step)."""
    start = time.perf_counter()
    if given is not None and not progress.history and (given.layers is not None or not plan.layers_target):
        units = [head_units(*attention_shape(plan.family, layer)[:2], config.gqa_mode)
                 for layer in layer_list(plan.family, model)]
        result = given, units
    else:
        result = compute_scores(plan.family, model, config, ctx, layers=plan.layers_target > 0,
                                cache=progress.cache)
    progress.scoring_seconds += time.perf_counter() - start
    return result


def _choose_layers(plan: _Plan, progress: _Progress, scores: Scores, eligible: list[bool], fraction: float
                   ) -> set[int]:
    """Whole layers go first (what they hold leaves with them): the lowest-scoring eligible ones."""
    need = int(round(plan.layers_target * fraction)) - (plan.n_layers - len(progress.original_ids))
    if need <= 0:
        return set()
    ranked = sorted((float(s), i) for i, s in enumerate(scores.layers.tolist()) if eligible[i])
    return {i for _, i in ranked[:need]}


def _choose_heads(model: nn.Module, config: PruneConfig, plan: _Plan, progress: _Progress, scores: Scores,
                  units: list, survivors: list[int], prunable: list[bool], step: int) -> list[set[int]]:
    """Head units to remove per current layer: ranked across layers (global) or the same share per layer."""
    fraction = step / config.steps
    sizes = [[len(q) for q, _ in layer_units] for layer_units in units]
    ids = progress.original_ids
    if config.scope == "global":
        n_q_now = [attention_shape(plan.family, layer)[0] for layer in layer_list(plan.family, model)]
        base = sum(plan.shapes[ids[i]][0] for i in survivors)
        already = sum(plan.shapes[ids[i]][0] - n_q_now[i] for i in survivors)
        need = int(round(target_count(config.heads, base) * fraction)) - already
        min_keep = [max(config.min_heads_per_layer, 1) for _ in units]
        removed, done = _choose_global(_normalized(scores.heads, config), sizes, min_keep, prunable, max(need, 0))
        if done < need:
            progress.warn(f"removed {done} of the {need} heads asked for in step {step} "
                          f"(min_heads_per_layer={config.min_heads_per_layer}, protect_layers="
                          f"{config.protect_layers}, units of {sorted({s for z in sizes for s in z})} heads)")
        return removed
    per_layer_fraction = plan.heads_target / plan.heads_total
    counts = []
    for i, layer_units in enumerate(units):
        start = plan.units[ids[i]]
        unit_size = max(1, sizes[i][0]) if sizes[i] else 1
        min_units = math.ceil(config.min_heads_per_layer / unit_size)
        want = int(round(per_layer_fraction * start * fraction)) - (start - len(layer_units))
        counts.append(max(0, min(want, len(layer_units) - min_units)))
    return _choose_layerwise(scores.heads, counts, prunable)


def _choose_ffn(model: nn.Module, config: PruneConfig, plan: _Plan, progress: _Progress, scores: Scores,
                survivors: list[int], prunable: list[bool], step: int) -> list[set[int]]:
    """FFN neurons to remove per current layer (every layer keeps at least one)."""
    fraction = step / config.steps
    widths = [ffn_width(plan.family, layer) for layer in layer_list(plan.family, model)]
    ids = progress.original_ids
    if config.scope == "global":
        base = sum(plan.ffn[ids[i]] for i in survivors)
        already = sum(plan.ffn[ids[i]] - widths[i] for i in survivors)
        need = int(round(target_count(config.ffn, base) * fraction)) - already
        removed, done = _choose_global(_normalized(scores.ffn, config), [[1] * w for w in widths], [1] * len(widths),
                                       prunable, max(need, 0))
        if done < need:
            progress.warn(f"removed {done} of the {need} FFN neurons asked for in step {step} "
                          f"(protect_layers={config.protect_layers}; every layer keeps one neuron)")
        return removed
    per_layer_fraction = plan.ffn_target / sum(plan.ffn)
    counts = [max(0, min(int(round(per_layer_fraction * plan.ffn[ids[i]] * fraction)) - (plan.ffn[ids[i]] - w),
                         w - 1))
              for i, w in enumerate(widths)]
    return _choose_layerwise(scores.ffn, counts, prunable)


def _choose_step(model: nn.Module, config: PruneConfig, plan: _Plan, progress: _Progress, scores: Scores,
                 units: list, step: int) -> _Choice:
    """What this step removes: layers first, then heads and neurons from the layers that stay."""
    n_now = len(progress.original_ids)
    eligible = [progress.original_ids[i] not in plan.protected for i in range(n_now)]
    drop = _choose_layers(plan, progress, scores, eligible, step / config.steps)
    survivors = [i for i in range(n_now) if i not in drop]
    prunable = [eligible[i] and i not in drop for i in range(n_now)]
    heads = _choose_heads(model, config, plan, progress, scores, units, survivors, prunable, step) \
        if plan.heads_target else [set() for _ in range(n_now)]
    ffn = _choose_ffn(model, config, plan, progress, scores, survivors, prunable, step) \
        if plan.ffn_target else [set() for _ in range(n_now)]
    return _Choice(drop, heads, ffn)


def _kept_columns(family: str, layer: nn.Module, choice: _Choice, units: list, i: int
                  ) -> dict[str, tuple[nn.Module, list[int], torch.Tensor]]:
    """Per narrowed output projection of current layer ``i``: the module, what it keeps (query heads or neurons)
    and the input columns that stay."""
    out = {}
    if choice.heads[i]:
        keep_q = sorted(h for j, (q, _) in enumerate(units[i]) if j not in choice.heads[i] for h in q)
        head_dim = attention_shape(family, layer)[2]
        columns = torch.tensor([h * head_dim + d for h in keep_q for d in range(head_dim)])
        out[f"{i}.heads"] = (head_output_proj(family, layer), keep_q, columns)
    if choice.ffn[i]:
        keep = [j for j in range(ffn_width(family, layer)) if j not in choice.ffn[i]]
        out[f"{i}.ffn"] = (ffn_output_proj(family, layer), keep, torch.tensor(keep))
    return out


def _reconstruct(model: nn.Module, config: PruneConfig, ctx: Any, plan: _Plan, progress: _Progress,
                 choice: _Choice, units: list) -> dict[str, float]:
    """Re-fit every projection the cut narrows (see `reconstruct`); return the relative error left per projection."""
    layers = list(layer_list(plan.family, model))
    kept = {k: v for i, layer in enumerate(layers) if i not in choice.drop
            for k, v in _kept_columns(plan.family, layer, choice, units, i).items()}
    if not kept:
        return {}
    blocks = _cached_blocks(model, config, ctx, progress.cache)
    stats = InputMoments({k: module for k, (module, _, _) in kept.items()}).collect(model, blocks)
    return {k: reconstruct(module, columns, stats.moments(k), config.reconstruct_ridge)
            for k, (module, _, columns) in kept.items()}


def _cut(model: nn.Module, plan: _Plan, progress: _Progress, choice: _Choice, units: list) -> list[int]:
    """Remove what ``choice`` names, keep track of where the rest came from; return the dropped original layers."""
    family = plan.family
    for i, layer in enumerate(list(layer_list(family, model))):
        if i in choice.drop:
            continue
        kept = _kept_columns(family, layer, choice, units, i)
        if f"{i}.heads" in kept:
            keep_q = kept[f"{i}.heads"][1]
            n_kv = attention_shape(family, layer)[1]
            gone_kv = {kv for j, (_, kvs) in enumerate(units[i]) if j in choice.heads[i] for kv in kvs}
            prune_heads(family, layer, keep_q, [kv for kv in range(n_kv) if kv not in gone_kv])
            progress.head_ids[i] = [progress.head_ids[i][h] for h in keep_q]
        if f"{i}.ffn" in kept:
            prune_ffn(family, layer, kept[f"{i}.ffn"][1])
    dropped = sorted(progress.original_ids[i] for i in choice.drop)
    if choice.drop:
        survivors = [i for i in range(len(progress.original_ids)) if i not in choice.drop]
        drop_layers(family, model, survivors)
        progress.original_ids = [progress.original_ids[i] for i in survivors]
        progress.head_ids = [progress.head_ids[i] for i in survivors]
    return dropped


def _report(model: nn.Module, config: PruneConfig, plan: _Plan, progress: _Progress, params_before: int,
            started: float) -> dict[str, Any]:
    """Sync the config with the new shapes and return the details for the report."""
    reload = sync_config(plan.family, model)
    shapes = current_plan(plan.family, model)
    params_after = count_parameters(model)
    return {
        "family": plan.family,
        "scope": config.scope,
        "importance": config.importance,
        "gqa_mode": config.gqa_mode,
        "steps": config.steps,
        "parameters_before": params_before,
        "parameters_after": params_after,
        "parameters_removed": params_before - params_after,
        "heads_before": plan.heads_total,
        "heads_after": sum(shapes["num_attention_heads"]),
        "heads_kept_per_layer": shapes["num_attention_heads"],
        "kv_heads_per_layer": shapes["num_key_value_heads"],
        "heads_removed_per_layer": [sorted(set(range(plan.shapes[orig][0])) - set(ids))
                                    for orig, ids in zip(progress.original_ids, progress.head_ids)],
        "ffn_width_per_layer": shapes["intermediate_size"],
        "ffn_before": sum(plan.ffn),
        "layers_kept": progress.original_ids,
        "reload": reload,
        "importance_scores": progress.history,
        "scoring_seconds": round(progress.scoring_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "warnings": progress.warnings,
    }


def apply_prune(
    model: nn.Module, config: PruneConfig, ctx: Any, *, scores: Scores | None = None
) -> dict[str, Any]:
    """Prune ``model`` in place and return the details for the report.

    Args:
        model (`PreTrainedModel`): a supported, not yet quantized model.
        config (`PruneConfig`): what to remove and how to rank it.
        ctx (`CompressionContext`): tokenizer and calibration source (for the data-driven scores).
        scores (`Scores`, *optional*): precomputed scores of this very model (used for the first step; lets a sweep
            score once and prune at several ratios).

    Example:

    ```python
    report = hfsqueeze.compress(model, {"stages": [{"method": "prune", "heads": 0.25}]}, tokenizer=tok)
    ```
    """
    started = time.perf_counter()
    where = f"stage {getattr(ctx, 'stage_index', 0) or 1} (prune)"
    with prefixed(where):
        plan, notes = plan_prune(model, config)
    params_before = count_parameters(model)
    progress = _Progress(list(range(plan.n_layers)), [list(range(n_q)) for n_q, _, _ in plan.shapes], where)
    for note in notes:
        progress.warn(note)
    for step in range(1, config.steps + 1):
        step_scores, units = _score_step(model, config, ctx, plan, progress, scores)
        choice = _choose_step(model, config, plan, progress, step_scores, units, step)
        residual = _reconstruct(model, config, ctx, plan, progress, choice, units) if config.reconstruct else {}
        dropped = _cut(model, plan, progress, choice, units)
        progress.history.append({
            "step": step,
            "head_units": [_round_list(s) for s in step_scores.heads],
            "ffn_mean": _round_list([float(s.float().mean()) for s in step_scores.ffn]),
            "layers": _round_list(step_scores.layers) if step_scores.layers is not None else [],
            "layers_dropped": dropped,
            **({"reconstruction_error": round(sum(residual.values()) / len(residual), 4)} if residual else {}),
        })
    return _report(model, config, plan, progress, params_before, started)
