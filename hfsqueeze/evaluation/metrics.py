"""`Metrics` (one measurement of a model) and `METRICS`, the one table of how each metric is named and shown.

The report's before/after table and the model card both render from `METRICS`, so a metric added here appears in
both, with the same order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class Metrics:
    """One measurement of a model. ``None`` means "not measured" (e.g. perplexity of an encoder)."""

    parameters: int | None = None
    footprint_bytes: int | None = None
    disk_bytes: int | None = None
    perplexity: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    embedding_cosine: float | None = None
    prefill_ms_per_token: float | None = None
    decode_ms_per_token: float | None = None
    eval_tokens: int | None = None
    latency_spread: dict[str, dict[str, Any]] | None = None  # per latency field: min, median, max, runs
    load_average: float | None = None  # highest 1-minute load average while latency was timed
    # Quality on every evaluation text, by label, when there are several (the fields above are the first text's).
    texts: dict[str, dict[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Metrics | None":
        if data is None:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---- how numbers are written --------------------------------------------------------------------------------------
def fmt_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.2e}"
    if abs(value) < 10:
        return f"{value:.4f}"
    return f"{value:,.2f}"


def fmt_bytes(value: int) -> str:
    if value < 2**20:
        return f"{value / 2**10:,.1f} KiB"
    if value < 2**30:
        return f"{value / 2**20:,.1f} MiB"
    return f"{value / 2**30:,.2f} GiB"


def fmt_params(value: int) -> str:
    return f"{value / 1e6:,.2f}M ({value:,})"


@dataclasses.dataclass(frozen=True)
class MetricRow:
    """How one `Metrics` field is named and shown.

    Attributes:
        key: the `Metrics` field.
        label, fmt: the model card's words and number format.
        short, short_fmt: the report table's (``CompressionReport.to_markdown``).
        change: how the card shows the change: ``ratio``, ``delta``, ``delta_pct`` or ``points``.
        report_change: how the report's final / original column shows it: ``ratio``, ``delta`` or ``points``.
        model_index: the ``metric_type`` of the card's model-index entry: only a standard metric of the model's own
            (perplexity); measures against the original (KL, agreement, cosine) stay in the card's body.
        per_stage: shown in the card's stage-by-stage table.
        latency: a timing, with a spread of runs, whose ratio can be flagged unreliable (see `latency_check`).
    """

    key: str
    label: str
    fmt: Callable[[Any], str]
    short: str
    short_fmt: Callable[[Any], str]
    change: str
    report_change: str
    model_index: str | None = None
    per_stage: bool = False
    latency: bool = False


METRICS = [
    MetricRow("parameters", "Parameters", fmt_params, "Parameters", lambda v: f"{v / 1e6:,.2f}M", "ratio", "ratio",
              per_stage=True),
    MetricRow("disk_bytes", "Weights on disk", fmt_bytes, "Disk size", lambda v: f"{v / 2**20:,.1f} MiB", "ratio",
              "ratio", per_stage=True),
    MetricRow("footprint_bytes", "Memory footprint (weights + buffers)", fmt_bytes, "Memory footprint",
              lambda v: f"{v / 2**20:,.1f} MiB", "ratio", "ratio"),
    MetricRow("perplexity", "Perplexity", fmt_number, "Perplexity", lambda v: f"{v:.3f}", "delta_pct", "ratio",
              model_index="perplexity", per_stage=True),
    MetricRow("kl_divergence", "KL divergence to the original (nats/token)", fmt_number,
              "KL to original (nats/token)", lambda v: f"{v:.4f}", "delta", "delta", per_stage=True),
    MetricRow("top1_agreement", "Top-1 next-token agreement with the original", lambda v: f"{v:.2%}",
              "Top-1 agreement", lambda v: f"{v:.2%}", "points", "points", per_stage=True),
    MetricRow("embedding_cosine", "Embedding cosine similarity to the original", lambda v: f"{v:.4f}",
              "Embedding cosine to original", lambda v: f"{v:.4f}", "delta", "delta", per_stage=True),
    MetricRow("prefill_ms_per_token", "Prefill latency (ms/token)", lambda v: f"{v:.3f}",
              "Prefill latency (ms/token)", lambda v: f"{v:.3f}", "ratio", "ratio", latency=True),
    MetricRow("decode_ms_per_token", "Decode latency (ms/token)", lambda v: f"{v:.2f}", "Decode latency (ms/token)",
              lambda v: f"{v:.2f}", "ratio", "ratio", latency=True),
]

__all__ = ["METRICS", "MetricRow", "Metrics", "fmt_bytes", "fmt_number", "fmt_params"]
