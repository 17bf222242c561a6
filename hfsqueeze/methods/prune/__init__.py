"""The ``prune`` stage: structured removal of attention heads (MHA and GQA), FFN neurons and whole layers."""

from ...registry import register_stage
from ...save import register_code_check, register_load_snippet, register_loader, register_save_hook
from .apply import (
    PruneWarning,
    apply_prune,
    check_prunable,
    check_targets,
    compute_scores,
    sync_config,
    validate_prune,
)
from .artifact import code_check, load_snippet, loader, save_hook
from .config import PruneConfig
from .surgery import SUPPORTED_MODEL_TYPES, drop_layers, prune_ffn, prune_heads

register_stage("prune", PruneConfig, validate=validate_prune)(apply_prune)
register_save_hook(save_hook)
register_loader(loader)
register_load_snippet(load_snippet)
register_code_check(code_check)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PruneConfig",
    "PruneWarning",
    "apply_prune",
    "check_prunable",
    "check_targets",
    "compute_scores",
    "drop_layers",
    "prune_ffn",
    "prune_heads",
    "sync_config",
    "validate_prune",
]
