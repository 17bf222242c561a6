"""`EvaluationConfig`: what the report measures before and after each stage (the ``evaluation:`` key of a recipe).

Its own module, importing nothing heavy, so the command line can list its keys in ``--help`` without torch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import yaml

from ..core.config import ConfigBase
from ..core.errors import RecipeError


@dataclasses.dataclass
class EvaluationConfig(ConfigBase):
    """What the report measures before and after each stage."""

    text: str | list[str] = dataclasses.field(
        default="builtin",
        metadata={"help": "'builtin' (held-out pydoc_data.topics), 'builtin:bible' (out-of-domain English prose), a "
                  "local .txt/.json/.jsonl/.csv/.parquet file, a datasets name, or a list of these (the first is "
                  "the headline number; the report shows every text)"},
    )
    max_tokens: int = dataclasses.field(default=4096, metadata={"help": "tokens scored for perplexity and KL"})
    seq_len: int = dataclasses.field(default=512, metadata={"help": "window length for perplexity"})
    latency: bool | Literal["auto"] = dataclasses.field(
        default="auto",
        metadata={"help": "measure prefill and decode latency: true, false, or auto (the default: measured, except "
                  "for a bitsandbytes model on a CPU, whose kernels there say nothing about the speed it is built "
                  "for; the report says 'not measured' and why)"},
    )
    latency_seconds: float = dataclasses.field(
        default=10.0,
        metadata={"help": "wall-time budget of one latency measurement's timed rounds: repeats stop once it is "
                  "spent (every model is timed at least once)"},
    )
    prompt_tokens: int = dataclasses.field(default=128, metadata={"help": "prompt length for latency"})
    decode_tokens: int = dataclasses.field(default=32, metadata={"help": "greedy steps timed for decode latency"})
    repeats: int = dataclasses.field(default=3, metadata={"help": "timed repeats (the median is reported)"})
    per_stage: bool = dataclasses.field(default=True, metadata={"help": "measure after every stage, not just the end"})
    disk_size: bool = dataclasses.field(default=True, metadata={"help": "size the weights on disk (nothing written)"})

    def __post_init__(self):
        for key in ("max_tokens", "seq_len", "prompt_tokens", "decode_tokens", "repeats"):
            if getattr(self, key) < 1:
                self.fail(key, f"got {getattr(self, key)}; must be >= 1")
        if not self.latency_seconds > 0:
            self.fail("latency_seconds", f"got {self.latency_seconds}; must be a number of seconds > 0")
        if self.max_tokens < 2:
            self.fail("max_tokens", "must be at least 2")
        if isinstance(self.text, list):
            if not self.text:
                self.fail("text", "got an empty list; give at least one text source")
            if len(set(self.text)) != len(self.text):
                self.fail("text", f"got {self.text}; each text may appear once")

    @property
    def texts(self) -> list[str]:
        """The evaluation text sources as a list (``text`` may be one source or a list)."""
        return list(self.text) if isinstance(self.text, list) else [self.text]

    def overridden(self, overrides: list[str]) -> "EvaluationConfig":
        """A copy with ``evaluation.KEY=VALUE`` overrides applied (as ``hfsqueeze eval --set``)."""
        data = self.to_dict()
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key.startswith("evaluation.") or key.count(".") != 1:
                raise RecipeError(f"eval --set {item!r}: only evaluation.KEY=VALUE applies here; keys: "
                                  f"{', '.join(self.allowed_keys())}")
            data[key.split(".", 1)[1]] = yaml.safe_load(value)
        return EvaluationConfig.from_dict(data, where="evaluation")


__all__ = ["EvaluationConfig"]
