"""What a stage receives besides the model and its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .data import load_texts, token_blocks
from .errors import RecipeError


@dataclass
class CompressionContext:
    """Shared state of one `compress` call.

    Attributes:
        tokenizer: the model's tokenizer, or ``None`` (stages that need data then raise a clear error).
        calibration: the calibration/training text source: ``"builtin"`` (train split), a path or a dataset.
        original: a frozen copy of the model as it was before the recipe, when a stage asked for one.
        previous: a frozen copy of the model as it was before the current stage, when the stage asked for one.
        stage_index: 1-based number of the stage being applied.
        results: details returned by the stages already applied (``[{"method": ..., **details}]``).
        extras: free-form per-call objects passed to `compress(..., **extras)`.
        eval_texts: the recipe's evaluation text sources by report label (a distill stage scores each one before
            and after training, next to its own held-out split).
        scores_cache: a dict a caller keeps across calls that compress copies of one model (``hfsqueeze.tune``: one
            per process); a stage keeps what it computed from that model there, under its own name, so the copies
            are scored once (prune: its first step's importance scores). ``None``: nothing is kept.
    """

    tokenizer: Any = None
    calibration: Any = "builtin"
    original: Any = None
    previous: Any = None
    stage_index: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    eval_texts: dict[str, Any] = field(default_factory=dict)
    scores_cache: dict[str, Any] | None = None

    def require_tokenizer(self, why: str) -> Any:
        if self.tokenizer is None:
            raise RecipeError(f"stage {self.stage_index}: {why} needs a tokenizer; pass compress(..., tokenizer=tok)")
        return self.tokenizer

    def calibration_blocks(self, *, max_tokens: int, seq_len: int, source: Any = None) -> torch.Tensor:
        """Token blocks ``[n, seq_len]`` from the calibration source (built-in text: the train split)."""
        tok = self.require_tokenizer("calibration data")
        texts = load_texts(self.calibration if source is None else source, split="train")
        return token_blocks(tok, texts, max_tokens=max_tokens, seq_len=seq_len)
