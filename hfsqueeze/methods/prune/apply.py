"""The ``prune`` stage: score, choose, cut; repeated ``steps`` times."""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import torch
from torch import nn

from ...data import check_text_source
from ...errors import HfSqueezeWarning, RecipeError, UnsupportedModelError
from .config import PruneConfig
from .importance import (
    Scores,
    activation_scores,
    gradient_scores,
    head_units,
    is_causal_lm,
    kl_scores,
    magnitude_scores,
)
from .surgery import (
    PLAN_KEY,
    SUPPORTED_MODEL_TYPES,
    attention_shape,
    base_of,
    current_plan,
    drop_layers,
    family_of,
    ffn_width,
    layer_list,
    prune_ffn,
    prune_heads,
)

logger = logging.getLogger("hfsqueeze")


class PruneWarning(HfSqueezeWarning):
    """A prune target could not be met exactly (rounding, ``min_heads_per_layer`` or ``protect_layers``)."""


def check_prunable(model: nn.Module, stage: str = "prune") -> str:
    """Return the model's family, or raise a one-line error naming what is supported (``stage`` prefixes it)."""
    prefix = f"{stage}: " if stage else ""
    config = getattr(model, "config", None)
    family = family_of(config)
    if family is None:
        model_type = getattr(config, "model_type", None)
        raise UnsupportedModelError(
            f"{prefix}model type {model_type!r} ({type(model).__name__}) is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if family == "llama" and not hasattr(base_of(model), "layers"):
        raise UnsupportedModelError(f"{prefix}{type(model).__name__} has no decoder layers where expected")
    quantized = [name for name, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    if quantized or getattr(model, "is_quantized", False):
        raise RecipeError(f"{prefix}the model is already quantized (e.g. {quantized[0] if quantized else 'bnb'}); "
                          "quantized weights cannot be cut, so put the prune stage before quantize")
    return family


def validate_prune(config: PruneConfig, info: Any) -> None:
    """The prune stage's up-front checks (`hfsqueeze.registry.validate_stages`): order, model type and targets."""
    frozen = next((p.frozen_weights() for p in info.previous if p.frozen_weights()), None)
    if frozen:
        raise RecipeError(f"cannot follow a {frozen} stage: quantized weights cannot be cut, so put the prune stage "
                          "before quantize")
    if config.calibration is not None:
        check_text_source(config.calibration)
    if info.model is not None:
        check_targets(check_prunable(info.model, ""), info.model, config)


def _protected_layers(config: PruneConfig, n_layers: int) -> set[int]:
    protected = set()
    for index in config.protect_layers:
        if not -n_layers <= index < n_layers:
            raise RecipeError(f"key 'protect_layers': layer {index} does not exist; the model has {n_layers} layers "
                              f"(0..{n_layers - 1}, or negative from the end)")
        protected.add(index % n_layers)
    return protected


def check_targets(family: str, model: nn.Module, config: PruneConfig) -> list[str]:
    """Check, before any scoring, that the model can meet ``config``'s targets; return warnings about rounding.

    Raises `RecipeError` when a target removes nothing (a fraction rounding to 0, a single key/value group per layer
    under ``gqa_mode: groups``, ``protect_layers``/``min_heads_per_layer`` leaving nothing) or asks for more than
    exists. A layerwise target that rounds to a different amount is a warning: it is what the stage will remove.
    """
    layers = list(layer_list(family, model))
    n_layers = len(layers)
    protected = _protected_layers(config, n_layers)
    eligible = [i not in protected for i in range(n_layers)]
    layers_target = _target(config.layers, n_layers)
    if config.layers and layers_target == 0:
        raise RecipeError(f"key 'layers': {config.layers} of {n_layers} layers rounds to 0; give a count "
                          "(layers: 1) or a larger fraction")
    if layers_target > n_layers - max(1, len(protected)):
        raise RecipeError(f"key 'layers': got {config.layers} ({layers_target} layers) but only "
                          f"{n_layers - max(1, len(protected))} of {n_layers} layers can go (protect_layers="
                          f"{sorted(protected)}; at least one layer stays)")
    notes = []
    if config.heads:
        notes += _check_heads(config, [attention_shape(family, layer) for layer in layers], eligible)
    if config.ffn:
        notes += _check_ffn(config, [ffn_width(family, layer) for layer in layers], eligible)
    return notes


def _check_heads(config: PruneConfig, shapes: list[tuple[int, int, int]], eligible: list[bool]) -> list[str]:
    total = sum(n_q for n_q, _, _ in shapes)
    target = _target(config.heads, total)
    if target == 0:
        raise RecipeError(f"key 'heads': {config.heads} of {total} query heads rounds to 0; give a count "
                          "(heads: 1) or a larger fraction")
    if target > total:
        raise RecipeError(f"key 'heads': asks to remove {target} heads but the model has {total}")
    units = [head_units(n_q, n_kv, config.gqa_mode) for n_q, n_kv, _ in shapes]
    sizes = [len(u[0][0]) for u in units]
    min_keep = max(config.min_heads_per_layer, 1)
    if config.scope == "global":
        can = [s * max(0, (n_q - min_keep) // s) if ok else 0 for (n_q, _, _), s, ok in zip(shapes, sizes, eligible)]
    else:
        can = [s * max(0, min(round(target / total * len(u)), len(u) - math.ceil(min_keep / s))) if ok else 0
               for u, s, ok in zip(units, sizes, eligible)]
    if sum(can) == 0:
        raise RecipeError(f"key 'heads': {config.heads} removes no head: {_why_no_heads(config, shapes, eligible)}")
    if config.scope == "layerwise" and sum(can) != target:
        return [f"layerwise heads={config.heads} removes {sum(can)} of {total} query heads (per layer: {can}), "
                f"not {target}: layers lose whole head units of {sorted(set(sizes))} heads"
                + (f" and protect_layers={config.protect_layers} are kept" if not all(eligible) else "")]
    return []


def _why_no_heads(config: PruneConfig, shapes: list[tuple[int, int, int]], eligible: list[bool]) -> str:
    kept = [shape for shape, ok in zip(shapes, eligible) if ok]
    if not kept:
        return f"protect_layers={config.protect_layers} covers every layer"
    if config.gqa_mode == "groups" and all(n_kv == 1 < n_q for n_q, n_kv, _ in kept):
        n_q = kept[0][0]
        return (f"every layer has a single key/value group ({n_q} query heads share 1 key/value head) and gqa_mode: "
                "groups removes whole groups, one of which must stay; use gqa_mode: slots to remove query heads "
                "and keep the key/value head")
    if config.scope == "layerwise":
        return (f"a layerwise fraction of {len(head_units(kept[0][0], kept[0][1], config.gqa_mode))} head "
                f"units per layer rounds to 0 (min_heads_per_layer={config.min_heads_per_layer}); use scope: global "
                "or a larger fraction")
    return (f"min_heads_per_layer={config.min_heads_per_layer} keeps every head of the layers that may be pruned "
            f"({sorted({q for q, _, _ in kept})} query heads per layer)")


def _check_ffn(config: PruneConfig, widths: list[int], eligible: list[bool]) -> list[str]:
    total = sum(widths)
    target = _target(config.ffn, total)
    if target == 0:
        raise RecipeError(f"key 'ffn': {config.ffn} of {total} FFN neurons rounds to 0; give a count or a larger "
                          "fraction")
    if target > total:
        raise RecipeError(f"key 'ffn': asks to remove {target} FFN neurons but the model has {total}")
    if config.scope == "global":
        can = [w - 1 if ok else 0 for w, ok in zip(widths, eligible)]
    else:
        can = [max(0, min(round(target / total * w), w - 1)) if ok else 0 for w, ok in zip(widths, eligible)]
    if sum(can) == 0:
        why = (f"protect_layers={config.protect_layers} covers every layer" if not any(eligible)
               else "a layerwise fraction rounds to 0 neurons per layer; use scope: global or a larger fraction")
        raise RecipeError(f"key 'ffn': {config.ffn} removes no FFN neuron: {why}")
    if config.scope == "layerwise" and sum(can) != target:
        return [f"layerwise ffn={config.ffn} removes {sum(can)} of {total} FFN neurons (per layer: {can}), not "
                f"{target}" + (f": protect_layers={config.protect_layers} are kept" if not all(eligible) else "")]
    return []


def _warn(notes: list[str], stage: str, message: str) -> None:
    """Record a warning for the report and emit it as a `PruneWarning` (the CLI prints it as one line)."""
    notes.append(message)
    warnings.warn(f"{stage}: {message}", PruneWarning, stacklevel=3)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _target(value: int | float, total: int) -> int:
    """A fraction of ``total`` (rounded) or a count, as a number of items."""
    return int(round(value * total)) if isinstance(value, float) else int(value)


def calibration_blocks(model: nn.Module, config: PruneConfig, ctx: Any, max_tokens: int) -> torch.Tensor:
    """Token blocks from the calibration source; encoders get [CLS] ... [SEP] around each block."""
    causal = is_causal_lm(model)
    seq_len = config.seq_len or (512 if causal else 128)
    max_pos = getattr(model.config, "max_position_embeddings", None) or seq_len
    tok = ctx.require_tokenizer("importance scores from calibration data")
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
    if "blocks" not in cache:
        cache["blocks"] = calibration_blocks(model, config, ctx, config.calibration_tokens)
    blocks = cache["blocks"]
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
    if family == "llama" and uniform:
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
    stage = f"stage {getattr(ctx, 'stage_index', 0) or 1} (prune)"
    family = check_prunable(model, stage)
    try:
        notes = check_targets(family, model, config)
    except RecipeError as exc:
        raise RecipeError(f"{stage}: {exc}") from None
    for note in list(notes):
        warnings.warn(f"{stage}: {note}", PruneWarning, stacklevel=2)
    start_time = time.perf_counter()
    layers0 = list(layer_list(family, model))
    n_layers0 = len(layers0)
    protected = _protected_layers(config, n_layers0)
    layers_target = _target(config.layers, n_layers0)
    start_shapes = [attention_shape(family, layer) for layer in layers0]
    start_units = [len(head_units(n_q, n_kv, config.gqa_mode)) for n_q, n_kv, _ in start_shapes]
    start_ffn = [ffn_width(family, layer) for layer in layers0]
    heads_total0, ffn_total0 = sum(s[0] for s in start_shapes), sum(start_ffn)
    heads_target_total = _target(config.heads, heads_total0)
    ffn_target_total = _target(config.ffn, ffn_total0)
    params_before = count_parameters(model)
    original_ids = list(range(n_layers0))  # current position -> layer index at the start of the stage
    head_ids = [list(range(n_q)) for n_q, _, _ in start_shapes]  # current query head -> index at the start
    cache: dict[str, Any] = {}
    history = []
    scoring_seconds = 0.0
    for step in range(1, config.steps + 1):
        fraction = step / config.steps
        t0 = time.perf_counter()
        if scores is not None and step == 1 and (scores.layers is not None or not layers_target):
            step_scores = scores
            units = [head_units(*attention_shape(family, l)[:2], config.gqa_mode) for l in layer_list(family, model)]
        else:
            step_scores, units = compute_scores(family, model, config, ctx, layers=layers_target > 0, cache=cache)
        scoring_seconds += time.perf_counter() - t0
        layers_now = list(layer_list(family, model))
        eligible = [original_ids[i] not in protected for i in range(len(layers_now))]

        # Whole layers first: what they hold leaves with them.
        drop: set[int] = set()
        layers_need = int(round(layers_target * fraction)) - (n_layers0 - len(layers_now))
        if layers_need > 0:
            ranked = sorted((float(s), i) for i, s in enumerate(step_scores.layers.tolist()) if eligible[i])
            drop = {i for _, i in ranked[:layers_need]}
        survivors = [i for i in range(len(layers_now)) if i not in drop]
        prunable = [eligible[i] and i not in drop for i in range(len(layers_now))]

        removed_heads: list[set[int]] = [set() for _ in layers_now]
        if heads_target_total:
            sizes = [[len(q) for q, _ in layer_units] for layer_units in units]
            n_q_now = [attention_shape(family, l)[0] for l in layers_now]
            if config.scope == "global":
                base = sum(start_shapes[original_ids[i]][0] for i in survivors)
                already = sum(start_shapes[original_ids[i]][0] - n_q_now[i] for i in survivors)
                need = int(round(_target(config.heads, base) * fraction)) - already
                min_keep = [max(config.min_heads_per_layer, 1) for _ in layers_now]
                removed_heads, done = _choose_global(
                    _normalized(step_scores.heads, config), sizes, min_keep, prunable, max(need, 0)
                )
                if done < need:
                    _warn(notes, stage, f"removed {done} of the {need} heads asked for in step {step} "
                          f"(min_heads_per_layer={config.min_heads_per_layer}, protect_layers="
                          f"{config.protect_layers}, units of {sorted({s for z in sizes for s in z})} heads)")
            else:
                per_layer_fraction = heads_target_total / heads_total0
                counts = []
                for i, layer_units in enumerate(units):
                    start = start_units[original_ids[i]]
                    unit_size = max(1, sizes[i][0]) if sizes[i] else 1
                    min_units = math.ceil(config.min_heads_per_layer / unit_size)
                    want = int(round(per_layer_fraction * start * fraction)) - (start - len(layer_units))
                    counts.append(max(0, min(want, len(layer_units) - min_units)))
                removed_heads = _choose_layerwise(step_scores.heads, counts, prunable)

        removed_ffn: list[set[int]] = [set() for _ in layers_now]
        if ffn_target_total:
            widths = [ffn_width(family, l) for l in layers_now]
            if config.scope == "global":
                base = sum(start_ffn[original_ids[i]] for i in survivors)
                already = sum(start_ffn[original_ids[i]] - widths[i] for i in survivors)
                need = int(round(_target(config.ffn, base) * fraction)) - already
                removed_ffn, done = _choose_global(
                    _normalized(step_scores.ffn, config), [[1] * w for w in widths],
                    [1] * len(widths), prunable, max(need, 0),
                )
                if done < need:
                    _warn(notes, stage, f"removed {done} of the {need} FFN neurons asked for in step {step} "
                          f"(protect_layers={config.protect_layers}; every layer keeps one neuron)")
            else:
                per_layer_fraction = ffn_target_total / ffn_total0
                counts = [
                    max(0, min(int(round(per_layer_fraction * start_ffn[original_ids[i]] * fraction))
                               - (start_ffn[original_ids[i]] - w), w - 1))
                    for i, w in enumerate(widths)
                ]
                removed_ffn = _choose_layerwise(step_scores.ffn, counts, prunable)

        for i, layer in enumerate(layers_now):
            if i in drop:
                continue
            if removed_heads[i]:
                keep_units = [u for j, u in enumerate(units[i]) if j not in removed_heads[i]]
                n_q, n_kv, _ = attention_shape(family, layer)
                keep_q = sorted(h for q, _ in keep_units for h in q)
                gone_kv = {kv for j, (_, kvs) in enumerate(units[i]) if j in removed_heads[i] for kv in kvs}
                keep_kv = [kv for kv in range(n_kv) if kv not in gone_kv]
                prune_heads(family, layer, keep_q, keep_kv)
                head_ids[i] = [head_ids[i][h] for h in keep_q]
            if removed_ffn[i]:
                prune_ffn(family, layer, [j for j in range(ffn_width(family, layer)) if j not in removed_ffn[i]])
        dropped = sorted(original_ids[i] for i in drop)
        if drop:
            drop_layers(family, model, survivors)
            original_ids = [original_ids[i] for i in survivors]
            head_ids = [head_ids[i] for i in survivors]
        history.append({
            "step": step,
            "head_units": [_round_list(s) for s in step_scores.heads],
            "ffn_mean": _round_list([float(s.float().mean()) for s in step_scores.ffn]),
            "layers": _round_list(step_scores.layers) if step_scores.layers is not None else [],
            "layers_dropped": dropped,
        })
    reload = sync_config(family, model)
    plan = current_plan(family, model)
    params_after = count_parameters(model)
    return {
        "family": family,
        "scope": config.scope,
        "importance": config.importance,
        "gqa_mode": config.gqa_mode,
        "steps": config.steps,
        "parameters_before": params_before,
        "parameters_after": params_after,
        "parameters_removed": params_before - params_after,
        "heads_before": heads_total0,
        "heads_after": sum(plan["num_attention_heads"]),
        "heads_kept_per_layer": plan["num_attention_heads"],
        "kv_heads_per_layer": plan["num_key_value_heads"],
        "heads_removed_per_layer": [
            sorted(set(range(start_shapes[orig][0])) - set(ids)) for orig, ids in zip(original_ids, head_ids)
        ],
        "ffn_width_per_layer": plan["intermediate_size"],
        "ffn_before": ffn_total0,
        "layers_kept": original_ids,
        "reload": reload,
        "importance_scores": history,
        "scoring_seconds": round(scoring_seconds, 2),
        "seconds": round(time.perf_counter() - start_time, 2),
        "warnings": notes,
    }
