"""`TrialRecord`: one trial of ``hfsqueeze tune``, as ``trials.jsonl``, the report's ``tuning.trials`` and the card
read it. The one module that knows a record's fields: tune writes records through it, the card reads them through it.

A record's ``metrics`` use the keys of `hfsqueeze.evaluation.metrics.METRICS` (``kl_divergence``,
``top1_agreement``, and the ratios ``size``, ``ppl``, ``prefill``, ``decode``); records written before that (``kl``,
``top1``) are read back with the keys renamed, so a study of an earlier version resumes and its artifact's card
renders.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .metrics import metric_key


def normalize_metrics(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """``metrics`` with every key in the table's vocabulary (an older record's ``kl`` becomes ``kl_divergence``)."""
    if metrics is None:
        return None
    return {metric_key(k): v for k, v in metrics.items()}


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """One finished or failed trial.

    Attributes:
        number: optuna's trial number.
        state: ``COMPLETE`` or ``FAIL``.
        kind: ``search``, ``uniform:<recipe>`` (a stock recipe measured for comparison) or ``solved:<format>``.
        label: a short name for its explicit recipe; point: the drawn point; stages: the explicit recipe.
        metrics: measured on the calibration text (`normalize_metrics`); solution: the solver's choice.
        constraints: per budget limit, the relative excess (feasible when every one is <= 0).
        feasible: complete, measured (not skipped, not a duplicate) and within the budget.
        values: the objective values optuna got; seconds: how long it took.
        error, interrupted, worker: why it failed, whether a signal stopped it, the process that ran it.
        skipped: why it was not built (predicted over the size limit); duplicate_of: the trial it repeated.
    """

    number: int
    state: str
    kind: str = "search"
    label: str | None = None
    point: dict[str, Any] | None = None
    stages: list[dict[str, Any]] | None = None
    metrics: dict[str, Any] | None = None
    solution: dict[str, Any] | None = None
    constraints: dict[str, float] = dataclasses.field(default_factory=dict)
    feasible: bool = False
    values: list[float] | None = None
    seconds: float | None = None
    error: str | None = None
    interrupted: bool = False
    worker: int | None = None
    skipped: str | None = None
    duplicate_of: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "metrics", normalize_metrics(self.metrics))

    @property
    def uniform(self) -> bool:
        """A uniform stock recipe measured beside the search."""
        return str(self.kind).startswith("uniform:")

    @property
    def measured(self) -> bool:
        """Built and measured in its own right (not skipped, not a repeat of an earlier point)."""
        return self.state == "COMPLETE" and bool(self.metrics) and not self.skipped and self.duplicate_of is None

    def metric(self, name: str) -> Any:
        """A metric by its key or its budget word (``kl``); ``None`` when not measured."""
        return (self.metrics or {}).get(metric_key(name))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialRecord":
        """Read a record (``trials.jsonl`` line, report entry); keys this version does not know are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


__all__ = ["TrialRecord", "normalize_metrics"]
