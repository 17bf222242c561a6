"""`Metrics` (one measurement of a model) and `METRICS`, the one table of how each metric is named and shown.

The report's before/after table, the model card and tune's trial table (the card's "Tuning" section) all render from
`METRICS`, so a metric added here appears in each, in the same order; their change columns come from `format_change`.
Tune's trial records use the same keys (`hfsqueeze.evaluation.trials`); its budget words (``kl``) name rows through
`metric_key`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..core.formatting import fmt_bytes, fmt_number, fmt_params


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


@dataclasses.dataclass(frozen=True)
class MetricRow:
    """How one metric is named and shown, by the report, the model card and tune's trial tables.

    Attributes:
        key: the `Metrics` field, or the key of a ratio only tune's trial records hold (``measured=False``).
        label, fmt: the model card's words and number format.
        short, short_fmt: the report table's (``CompressionReport.to_markdown``).
        change: how the card shows the change: ``ratio``, ``delta``, ``delta_pct`` or ``points`` (`format_change`).
        report_change: how the report's final / original column shows it: ``ratio``, ``delta`` or ``points``.
        model_index: the ``metric_type`` of the card's model-index entry: only a standard metric of the model's own
            (perplexity); measures against the original (KL, agreement, cosine) stay in the body.
        per_stage: shown in the card's stage-by-stage table.
        latency: a timing, with a spread of runs, whose ratio can be flagged unreliable (see `latency_check`).
        measured: a `Metrics` field (``False``: a ratio to the original that only trial records hold).
        budget: the word ``hfsqueeze tune --budget`` and ``--minimize`` use for it (``kl``, ``size``...).
        trial_label, trial_fmt: the column of tune's trial table (the card's "Tuning" section), if it has one.
    """

    key: str
    label: str
    fmt: Callable[[Any], str]
    short: str = ""
    short_fmt: Callable[[Any], str] | None = None
    change: str = "ratio"
    report_change: str = "ratio"
    model_index: str | None = None
    per_stage: bool = False
    latency: bool = False
    measured: bool = True
    budget: str | None = None
    trial_label: str | None = None
    trial_fmt: Callable[[Any], str] | None = None


def _times(v: float) -> str:
    return f"{v:.3f}x"


def _times2(v: float) -> str:
    return f"{v:.2f}x"


# One row per metric, in the order every table shows them. A trial record holds the measured metrics it has under the
# same keys, and ratios to the original under their own (``size``, ``ppl``, ``prefill``, ``decode``).
METRICS = [
    MetricRow("parameters", "Parameters", fmt_params, "Parameters", lambda v: f"{v / 1e6:,.2f}M", "ratio", "ratio",
              per_stage=True),
    MetricRow("size", "Weights on disk (x original)", _times, measured=False, budget="size",
              trial_label="Size (x original)", trial_fmt=_times),
    MetricRow("disk_bytes", "Weights on disk", fmt_bytes, "Disk size", lambda v: f"{v / 2**20:,.1f} MiB", "ratio",
              "ratio", per_stage=True, trial_label="Disk", trial_fmt=lambda v: f"{v / 2**20:,.1f} MiB"),
    MetricRow("footprint_bytes", "Memory footprint (weights + buffers)", fmt_bytes, "Memory footprint",
              lambda v: f"{v / 2**20:,.1f} MiB", "ratio", "ratio"),
    MetricRow("perplexity", "Perplexity", fmt_number, "Perplexity", lambda v: f"{v:.3f}", "delta_pct", "ratio",
              model_index="perplexity", per_stage=True),
    MetricRow("kl_divergence", "KL divergence to the original (nats/token)", fmt_number,
              "KL to original (nats/token)", lambda v: f"{v:.4f}", "delta", "delta", per_stage=True, budget="kl",
              trial_label="KL (calibration)", trial_fmt=lambda v: f"{v:.4g}"),
    MetricRow("ppl", "Perplexity (x original)", _times, measured=False, budget="ppl",
              trial_label="Perplexity change", trial_fmt=lambda v: f"{100 * (v - 1):+.2f}%"),
    MetricRow("top1_agreement", "Top-1 next-token agreement with the original", lambda v: f"{v:.2%}",
              "Top-1 agreement", lambda v: f"{v:.2%}", "points", "points", per_stage=True, budget="top1",
              trial_label="Top-1 agreement", trial_fmt=lambda v: f"{v:.2%}"),
    MetricRow("embedding_cosine", "Embedding cosine similarity to the original", lambda v: f"{v:.4f}",
              "Embedding cosine to original", lambda v: f"{v:.4f}", "delta", "delta", per_stage=True),
    MetricRow("prefill_ms_per_token", "Prefill latency (ms/token)", lambda v: f"{v:.3f}",
              "Prefill latency (ms/token)", lambda v: f"{v:.3f}", "ratio", "ratio", latency=True),
    MetricRow("prefill", "Prefill latency (x original)", _times2, measured=False, budget="prefill",
              trial_label="Prefill (x)", trial_fmt=_times2),
    MetricRow("decode_ms_per_token", "Decode latency (ms/token)", lambda v: f"{v:.2f}", "Decode latency (ms/token)",
              lambda v: f"{v:.2f}", "ratio", "ratio", latency=True),
    MetricRow("decode", "Decode latency (x original)", _times2, measured=False, budget="decode",
              trial_label="Decode (x)", trial_fmt=_times2),
]
# Views of the one table: what a `Metrics` holds (report and card), and the columns of tune's trial table.
MEASURED = [row for row in METRICS if row.measured]
TRIAL_COLUMNS = [row for row in METRICS if row.trial_label]
# The keys trial records used before they shared this table's (``kl``, ``top1``): read back by `metric_key`.
_BUDGET_KEYS = {row.budget: row.key for row in METRICS if row.budget}


def metric_key(name: str) -> str:
    """The metric key of a budget word or of a key an older trial record used (``kl`` -> ``kl_divergence``)."""
    return _BUDGET_KEYS.get(name, name)


def format_change(style: str, before: float | None, after: float | None, fmt: Callable[[Any], str] | None = None,
                  *, brief: bool = False) -> str:
    """How a metric changed from ``before`` (the original) to ``after``, in one of the table's styles.

    Args:
        style (`str`): ``ratio`` (``0.800x (20.0% less)``), ``delta`` (a signed difference in ``fmt``),
            ``delta_pct`` (that and the relative change) or ``points`` (percentage points, ``-0.39 pp``).
        before, after (`float`, *optional*): the two values; a missing one gives ``"n/a"`` (``brief``) or ``""``.
        fmt (`Callable`, *optional*): the row's number format, for differences.
        brief (`bool`, defaults to `False`): the report's short form: ``0.800x``, or ``+0.0123`` for a difference
            (also for a ratio to zero).

    Example:

    ```python
    format_change("ratio", 100, 80)  # '0.800x (20.0% less)'
    ```
    """
    if before is None or after is None:
        return "n/a" if brief else ""
    if style == "ratio" and before:
        ratio = after / before
        if brief:
            return f"{ratio:.3f}x"
        if after == before:
            return "unchanged"
        return f"{ratio:.3f}x ({(1 - ratio):.1%} less)" if ratio < 1 else f"{ratio:.3f}x ({(ratio - 1):+.1%})"
    if style == "ratio" and not brief:
        return ""
    if style == "points":
        return f"{(after - before) * 100:+.2f} pp"
    if brief or fmt is None:
        return f"{after - before:+.4g}"
    change = f"{'+' if after - before >= 0 else '-'}{fmt(abs(after - before))}"
    if style == "delta_pct" and before:
        change += f" ({(after - before) / before:+.2%})"
    return change


__all__ = ["MEASURED", "METRICS", "TRIAL_COLUMNS", "MetricRow", "Metrics", "fmt_bytes", "fmt_number", "fmt_params",
           "format_change", "metric_key"]
