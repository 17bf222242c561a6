"""`PruneStage`: the prune method's life: checks, apply, the card's per-layer table, the artifact's modeling file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...core.context import CompressionContext
from ...core.data import check_text_source
from ...core.errors import RecipeError
from ...core.search import Param
from ...core.stage import Description, ModelInfo, SearchSection, Stage, format_of
from .apply import apply_prune, first_step_scores
from .checks import check_layers, check_prunable, check_targets
from .artifact import code_check, load_snippet, loader, save_hook
from .config import PruneConfig


def _label(config: dict[str, Any]) -> str:
    parts = [f"{k.replace('_', ' ')} {v}" for k, v in config.items()
             if k != "method" and not isinstance(v, (dict, list))]
    return "structured pruning" + (f" ({', '.join(parts)})" if parts else "")


def _same_length(details: dict[str, Any], key: str, n: int) -> list | None:
    value = details.get(key)
    return value if isinstance(value, list) and len(value) == n else None


def layer_rows(details: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-layer rows from the stage's details (heads / KV heads / FFN width kept per layer); tolerant of gaps."""
    kept = details.get("heads_kept_per_layer")
    if not isinstance(kept, list) or not kept:
        return []
    n = len(kept)
    layer_ids = _same_length(details, "layers_kept", n) or list(range(n))
    removed = _same_length(details, "heads_removed_per_layer", n)
    kv = _same_length(details, "kv_heads_per_layer", n)
    ffn = _same_length(details, "ffn_width_per_layer", n)
    history = details.get("importance_scores") or []
    first = history[0] if history and isinstance(history[0], dict) else {}
    original_layers = len(first.get("head_units") or []) or (max(layer_ids) + 1 if layer_ids else n)
    ffn_before = details.get("ffn_before")
    ffn_each = ffn_before // original_layers if isinstance(ffn_before, int) and ffn_before % original_layers == 0 \
        else None
    rows = []
    for i, layer in enumerate(layer_ids):
        row: dict[str, Any] = {"layer": layer}
        if removed is not None:
            row["attention heads kept"] = f"{kept[i]} of {kept[i] + len(removed[i])}"
            row["heads removed"] = ", ".join(str(h) for h in removed[i]) or "none"
        else:
            row["attention heads kept"] = kept[i]
        if kv is not None:
            row["KV heads"] = kv[i]
        if ffn is not None:
            row["FFN width"] = f"{ffn[i]} of {ffn_each}" if ffn_each else ffn[i]
        rows.append(row)
    for layer in range(original_layers):
        if layer not in layer_ids:
            rows.append({"layer": layer, "attention heads kept": "layer removed"})
    return sorted(rows, key=lambda r: r["layer"])


class PruneStage(Stage):
    """Structured pruning of heads, FFN neurons and layers (see `apply_prune`); the artifact keeps the plan."""

    name = "prune"
    config_cls = PruneConfig

    def validate(self, config: PruneConfig, info: ModelInfo) -> ModelInfo | None:
        if info.frozen_by:
            raise RecipeError(f"cannot follow a {info.frozen_by} stage: quantized weights cannot be cut, so put the "
                              "prune stage before quantize")
        if config.calibration is not None:
            check_text_source(config.calibration)
        if not info.known:
            return None
        family = check_prunable(info)
        if info.model is not None:  # the model as loaded: every target can be checked against its shapes
            check_targets(family, info.model, config)
        n_layers = info.num_layers
        if n_layers is not None:
            n_layers -= check_layers(config, n_layers)[1]
        # Shapes change: later stages see the layer count, no longer the loaded model's shapes.
        return info.replace(num_layers=n_layers, model=None)

    def apply(self, model: nn.Module, config: PruneConfig, ctx: CompressionContext) -> dict[str, Any]:
        # A caller that prunes many copies of one model (hfsqueeze.tune) keeps the first step's importance scores in
        # ctx.scores_cache, computed once per importance setting.
        cache = ctx.scores_cache.setdefault(self.name, {}) if getattr(ctx, "scores_cache", None) is not None else None
        scores = first_step_scores(model, config, ctx, cache) if cache is not None else None
        return apply_prune(model, config, ctx, scores=scores)

    def describe(self, config: dict[str, Any], details: dict[str, Any]) -> Description:
        return Description(label=_label(config), short=format_of(details) or "pruned", tags=["pruned"],
                           layer_rows=layer_rows(details))

    def on_save(self, model: nn.Module, directory: Path) -> None:
        save_hook(model, directory)

    def load(self, path: str, config: Any, **kwargs: Any) -> nn.Module | None:
        return loader(path, config, **kwargs)

    def load_snippet(self, config: Any, path_or_repo: str) -> str | None:
        return load_snippet(config, path_or_repo)

    def verify_code(self, file: Path, config: Any) -> bool | None:
        return code_check(file, config)

    def search_section(self) -> SearchSection | None:
        return SearchSection(self.name, not_searched=("recover", "calibration"))

    def label(self, config: dict[str, Any]) -> str:
        return (f"{self.name} h{config.get('heads', 0):.3g}/f{config.get('ffn', 0):.3g} ({config.get('importance')})"
                + (" + recover" if config.get("recover") else ""))

    def search_space(self, info: ModelInfo | None = None) -> dict[str, Param]:
        # All three at 0 is refused ("nothing to prune"): leaving pruning out is the stage being off, not a point.
        return {
            "heads": Param.range(0.0, 0.5, step=0.05),
            "ffn": Param.range(0.0, 0.5, step=0.05),
            "layers": Param.range(0.0, 0.25, step=0.05),
            "importance": Param.choice("gradient", "activation", "magnitude", "kl"),
            "scope": Param.choice("global", "layerwise"),
            "reconstruct": Param.choice(True, False),
        }
