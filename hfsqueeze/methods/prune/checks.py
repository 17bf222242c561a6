"""The prune stage's checks, run by `PruneStage.validate` before the model runs (one line naming what is allowed)
and again by `apply_prune` on the model itself: the model family, protected layers, and targets that would remove
nothing or everything."""

from __future__ import annotations

import math

from torch import nn

from ...core.errors import RecipeError, UnsupportedModelError
from ...core.stage import ModelInfo
from .config import PruneConfig
from .importance import head_units
from .surgery import MODEL_TYPES, SUPPORTED_MODEL_TYPES, attention_shape, ffn_width, layer_list


def check_prunable(info: ModelInfo) -> str:
    """Return the model's family, or raise a one-line error naming what is supported."""
    family = MODEL_TYPES.get(info.model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model type {info.model_type!r} ({info.architecture}) is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if info.quantized:
        raise RecipeError(f"the model is already quantized ({info.quantized}); quantized weights cannot be cut, so "
                          "put the prune stage before quantize")
    return family


def _protected_layers(config: PruneConfig, n_layers: int) -> set[int]:
    protected = set()
    for index in config.protect_layers:
        if not -n_layers <= index < n_layers:
            raise RecipeError(f"key 'protect_layers': layer {index} does not exist; the model has {n_layers} layers "
                              f"(0..{n_layers - 1}, or negative from the end)")
        protected.add(index % n_layers)
    return protected


def check_layers(config: PruneConfig, n_layers: int) -> tuple[set[int], int]:
    """The protected layer indices (normalized) and the number of layers to remove; raise when impossible."""
    protected = _protected_layers(config, n_layers)
    layers_target = target_count(config.layers, n_layers)
    if config.layers and layers_target == 0:
        raise RecipeError(f"key 'layers': {config.layers} of {n_layers} layers rounds to 0; give a count "
                          "(layers: 1) or a larger fraction")
    if layers_target > n_layers - max(1, len(protected)):
        raise RecipeError(f"key 'layers': got {config.layers} ({layers_target} layers) but only "
                          f"{n_layers - max(1, len(protected))} of {n_layers} layers can go (protect_layers="
                          f"{sorted(protected)}; at least one layer stays)")
    return protected, layers_target


def check_targets(family: str, model: nn.Module, config: PruneConfig) -> list[str]:
    """Check, before any scoring, that the model can meet ``config``'s targets; return warnings about rounding.

    Raises `RecipeError` when a target removes nothing (a fraction rounding to 0, a single key/value group per layer
    under ``gqa_mode: groups``, ``protect_layers``/``min_heads_per_layer`` leaving nothing) or asks for more than
    exists. A layerwise target that rounds to a different amount is a warning: it is what the stage will remove.
    """
    layers = list(layer_list(family, model))
    protected, _ = check_layers(config, len(layers))
    eligible = [i not in protected for i in range(len(layers))]
    notes = []
    if config.heads:
        notes += _check_heads(config, [attention_shape(family, layer) for layer in layers], eligible)
    if config.ffn:
        notes += _check_ffn(config, [ffn_width(family, layer) for layer in layers], eligible)
    return notes


def _checked_target(key: str, value: int | float, total: int, what: str, count_hint: str) -> int:
    """``value`` of ``key`` as a number of ``what`` to remove out of ``total``; refuse 0 and more than there are."""
    target = target_count(value, total)
    if target == 0:
        raise RecipeError(f"key '{key}': {value} of {total} {what} rounds to 0; give {count_hint} or a larger "
                          "fraction")
    if target > total:
        raise RecipeError(f"key '{key}': asks to remove {target} {what} but the model has {total}")
    return target


def _check_heads(config: PruneConfig, shapes: list[tuple[int, int, int]], eligible: list[bool]) -> list[str]:
    total = sum(n_q for n_q, _, _ in shapes)
    target = _checked_target("heads", config.heads, total, "query heads", "a count (heads: 1)")
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
    target = _checked_target("ffn", config.ffn, total, "FFN neurons", "a count")
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


def target_count(value: int | float, total: int) -> int:
    """A fraction of ``total`` (rounded) or a count, as a number of items."""
    return int(round(value * total)) if isinstance(value, float) else int(value)


__all__ = ["check_layers", "check_prunable", "check_targets", "target_count"]
