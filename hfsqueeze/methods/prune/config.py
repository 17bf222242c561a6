"""Configuration of the ``prune`` stage."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ...core.config import StageConfig


@dataclasses.dataclass
class PruneConfig(StageConfig):
    """Structured pruning: remove attention heads, FFN neurons and whole layers, so the model gets smaller and faster.

    ``heads``, ``ffn`` and ``layers`` each take a fraction (a float in [0, 1)) or a count (an int). Heads are
    counted as query heads; with grouped-query attention, ``gqa_mode: groups`` removes whole key/value groups (a k/v
    head with its query heads) and ``gqa_mode: slots`` removes the same query slot from every group.

    Example:

    ```yaml
    - method: prune
      heads: 0.25
      ffn: 0.25
      scope: global
      importance: gradient
      protect_layers: [0]
    ```
    """

    method = "prune"

    heads: int | float = dataclasses.field(
        default=0, metadata={"help": "attention heads to remove: a fraction in [0, 1) or a count of query heads"}
    )
    ffn: int | float = dataclasses.field(
        default=0, metadata={"help": "FFN intermediate neurons to remove: a fraction in [0, 1) or a count"}
    )
    layers: int | float = dataclasses.field(
        default=0, metadata={"help": "whole decoder/encoder layers to remove: a fraction in [0, 1) or a count"}
    )
    scope: Literal["global", "layerwise"] = dataclasses.field(
        default="global",
        metadata={"help": "global: rank heads (and neurons) across the model, so layers end up with different "
                  "sizes; layerwise: remove the same fraction in every layer"},
    )
    importance: Literal["gradient", "activation", "magnitude", "kl"] = dataclasses.field(
        default="gradient",
        metadata={"help": "gradient: |d loss / d mask| on calibration data (Michel et al. 2019; first-order Taylor "
                  "for neurons); activation: output norm on calibration data; magnitude: weight norms, no data; "
                  "kl: KL to the unpruned model when each head group (or layer) is masked"},
    )
    gqa_mode: Literal["groups", "slots"] = dataclasses.field(
        default="groups",
        metadata={"help": "grouped-query attention: 'groups' removes whole key/value groups (one must stay, so a "
                  "model with a single group per layer, like Gemma-3-270M, is refused up front), 'slots' removes the "
                  "same query slot from every group (keeps all key/value heads)"},
    )
    normalize: bool | None = dataclasses.field(
        default=None,
        metadata={"help": "global scope: divide each layer's scores by their L2 norm before ranking (Michel et al. "
                  "2019); default: only for activation, whose raw scale follows the residual stream (on SmolLM2 "
                  "normalizing gradient scores quadrupled the KL at 10% of heads)"},
    )
    min_heads_per_layer: int = dataclasses.field(
        default=1, metadata={"help": "query heads every layer keeps at least"}
    )
    protect_layers: list[int] = dataclasses.field(
        default_factory=list, metadata={"help": "layer indices (negative ones count from the end) left untouched"}
    )
    steps: int = dataclasses.field(
        default=1, metadata={"help": "> 1: prune iteratively, re-scoring the pruned model between steps"}
    )
    calibration: str | None = dataclasses.field(
        default=None,
        metadata={"help": "text source for the data-driven scores: 'builtin', a local file or a datasets name "
                  "(default: the calibration source given to compress, else the built-in train text)"},
    )
    calibration_tokens: int = dataclasses.field(
        default=8192, metadata={"help": "calibration tokens for the gradient and activation scores"}
    )
    kl_tokens: int = dataclasses.field(
        default=1024, metadata={"help": "calibration tokens for the kl score (one forward pass per head group)"}
    )
    recover: Any = dataclasses.field(
        default=None,
        metadata={"help": "'auto' (or a mapping of distill options): insert a recovery distill stage from the "
                  "original model right after this stage; 'none'/false: no recovery even if the recipe asks"},
    )
    reconstruct: bool = dataclasses.field(
        default=False,
        metadata={"help": "re-fit the kept columns (and bias) of every narrowed output projection by least squares on "
                  "the calibration text, so each layer's output stays close to the original's (Kwon et al. 2022); "
                  "one extra forward pass"},
    )
    reconstruct_ridge: float = dataclasses.field(
        default=0.1,
        metadata={"help": "ridge term of the reconstruction, relative to the mean input energy; it penalizes the "
                  "correction, so a large value falls back to the plain cut (0.1 was best on SmolLM2 and MiniLM)"},
    )
    seq_len: int | None = dataclasses.field(
        default=None, metadata={"help": "calibration sequence length (default 512 for decoders, 128 for encoders)"}
    )

    def __post_init__(self):
        for key in ("heads", "ffn", "layers"):
            value = getattr(self, key)
            if isinstance(value, float) and not 0.0 <= value < 1.0:
                self.fail(key, f"got {value}; a fraction must be in [0, 1), or give a count as an integer")
            if isinstance(value, int) and value < 0:
                self.fail(key, f"got {value}; a count must be >= 0")
        if not (self.heads or self.ffn or self.layers):
            self.fail("heads", "nothing to prune: set at least one of heads, ffn, layers above 0")
        if self.min_heads_per_layer < 1:
            self.fail("min_heads_per_layer", f"got {self.min_heads_per_layer}; must be >= 1")
        if self.steps < 1:
            self.fail("steps", f"got {self.steps}; must be >= 1")
        for key in ("calibration_tokens", "kl_tokens"):
            if getattr(self, key) < 2:
                self.fail(key, f"got {getattr(self, key)}; must be >= 2")
        if self.reconstruct_ridge < 0:
            self.fail("reconstruct_ridge", f"got {self.reconstruct_ridge}; must be >= 0")
        if self.seq_len is not None and self.seq_len < 2:
            self.fail("seq_len", f"got {self.seq_len}; must be >= 2")
        if len(set(self.protect_layers)) != len(self.protect_layers):
            self.fail("protect_layers", f"got {self.protect_layers}; each layer may be listed once")
