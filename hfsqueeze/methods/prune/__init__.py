"""The ``prune`` method: structured removal of attention heads (MHA and GQA), FFN neurons and whole layers."""

from .apply import PruneWarning, apply_prune, compute_scores, sync_config
from .checks import check_targets
from .config import PruneConfig
from .stage import PruneStage
from .surgery import SUPPORTED_MODEL_TYPES, drop_layers, prune_ffn, prune_heads

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "PruneConfig",
    "PruneStage",
    "PruneWarning",
    "apply_prune",
    "check_targets",
    "compute_scores",
    "drop_layers",
    "prune_ffn",
    "prune_heads",
    "sync_config",
]
