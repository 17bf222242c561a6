"""Budgets and objectives of `hfsqueeze.tune`: what a tuned model must satisfy and what it minimizes.

A budget is a comma-separated list of limits, each ``key=value``:

- size: ``size=0.30`` (fraction of the original's disk size), ``size=150MiB`` (bytes, with a unit), ``bits=4.5``
  (disk bits per original parameter);
- latency, as ratios to the original measured side by side in one process: ``prefill=0.6``, ``decode=0.8``;
- quality, on the calibration split: ``kl=0.005`` (nats/token), ``ppl=+1%`` (perplexity increase), ``top1=0.95``
  (top-1 agreement with the original, at least).

The objective is the lowest KL within the budget (``minimize="kl"``), or the smallest size / prefill / decode within a
quality budget.

```python
budget = Budget.parse("size=0.30,ppl=+2%")
budget.limits   # {'size': 0.3, 'ppl': 0.02}
```
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from ..core.errors import HfSqueezeError, RecipeError
from ..evaluation.metrics import metric_key

OBJECTIVES = ("kl", "size", "prefill", "decode")
SIZE_KEYS = ("size", "size_bytes", "bits")
LATENCY_KEYS = ("prefill", "decode")
QUALITY_KEYS = ("kl", "ppl", "top1")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BUDGET_HELP = ("size=0.30 | size=150MiB | bits=4.5 | prefill=0.6 | decode=0.8 | kl=0.005 | ppl=+1% | top1=0.95, "
                "comma-separated")


class InfeasibleBudgetError(HfSqueezeError, RuntimeError):
    """No measured point met the budget. The message names the closest point found."""


def _number(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise RecipeError(f"budget {key}={raw!r}: not a number; allowed: {_BUDGET_HELP}") from None
    if not math.isfinite(value) or value <= 0:
        raise RecipeError(f"budget {key}={raw!r}: must be a positive number")
    return value


def _parse_size(raw: str) -> tuple[str, float]:
    match = re.fullmatch(r"\s*([0-9.]+(?:e-?\d+)?)\s*([a-zA-Z]*)\s*", raw)
    if match is None:
        raise RecipeError(f"budget size={raw!r}: expected a fraction of the original (size=0.30) or a size with a "
                          f"unit (size=150MiB; units: B, KB, MB, GB, KiB, MiB, GiB)")
    number, unit = match.groups()
    if not unit:
        value = _number("size", number)
        if value > 1:
            raise RecipeError(f"budget size={raw!r}: a fraction of the original's size must be <= 1; for bytes add "
                              "a unit (size=150MiB)")
        return "size", value
    if unit.lower() not in _UNITS:
        raise RecipeError(f"budget size={raw!r}: unknown unit {unit!r}; allowed: B, KB, MB, GB, KiB, MiB, GiB")
    return "size_bytes", _number("size", number) * _UNITS[unit.lower()]


def _parse_ppl(raw: str) -> float:
    match = re.fullmatch(r"\s*\+?\s*([0-9.]+)\s*%\s*", raw)
    if match is None:
        raise RecipeError(f"budget ppl={raw!r}: expected a perplexity increase in percent, e.g. ppl=+1%")
    return _number("ppl", match.group(1)) / 100


def describe_bytes(value: float) -> str:
    """A byte count in the largest binary unit it reaches, to four significant digits (``150MiB``, ``1.397GiB``,
    ``10.49B``): a limit like ``size=1e-5MiB`` must not read as ``0.0MiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.4g}{unit}"
    return f"{value:.4g}B"


# How each limit reads in messages and the card; prefill/decode (ratios to the original) fall back to "<=...x".
_DESCRIBE = {
    "size": lambda v: f"size<={v:.3g}x",
    "size_bytes": lambda v: f"size<={describe_bytes(v)}",
    "ppl": lambda v: f"ppl<=+{v * 100:.3g}%",
    "top1": lambda v: f"top1>={v:.3g}",
    "bits": lambda v: f"bits<={v:.3g}",
    "kl": lambda v: f"kl<={v:.3g}",
}


@dataclasses.dataclass
class Budget:
    """Limits a tuned model must meet (every key optional) and the objective it minimizes.

    Attributes:
        limits: ``size`` (fraction of the original disk size), ``size_bytes``, ``bits`` (disk bits per original
            parameter), ``prefill``/``decode`` (latency ratios), ``kl`` (nats/token), ``ppl`` (relative increase,
            0.01 = +1%), ``top1`` (minimum agreement).
        minimize: ``kl`` (default), ``size``, ``prefill`` or ``decode``.
    """

    limits: dict[str, float] = dataclasses.field(default_factory=dict)
    minimize: str = "kl"

    def __post_init__(self):
        if self.minimize not in OBJECTIVES:
            raise RecipeError(f"minimize: got {self.minimize!r}; allowed: {', '.join(OBJECTIVES)}")
        unknown = sorted(set(self.limits) - set(SIZE_KEYS + LATENCY_KEYS + QUALITY_KEYS))
        if unknown:
            raise RecipeError(f"budget: unknown key {unknown[0]!r}; allowed: {_BUDGET_HELP}")
        if self.minimize == "kl" and not any(k in self.limits for k in SIZE_KEYS + LATENCY_KEYS):
            raise RecipeError("budget: minimizing KL needs a size or latency limit (e.g. size=0.30 or prefill=0.6); "
                              f"got {self.describe() or 'none'}")
        if self.minimize != "kl" and not any(k in self.limits for k in QUALITY_KEYS):
            raise RecipeError(f"budget: minimizing {self.minimize} needs a quality limit (kl=0.005, ppl=+1% or "
                              f"top1=0.95); got {self.describe() or 'none'}")
        if "top1" in self.limits and not 0 < self.limits["top1"] <= 1:
            raise RecipeError(f"budget top1={self.limits['top1']}: top-1 agreement must be in (0, 1]")

    @classmethod
    def parse(cls, spec: str | dict[str, Any] | Budget, minimize: str = "kl") -> Budget:
        """Parse ``"size=0.30,kl=0.01"`` (or a dict ``{"size": 0.30}``, values as in the string form)."""
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, dict):
            items = [(str(k), str(v)) for k, v in spec.items()]
        elif isinstance(spec, str) and spec.strip():
            items = []
            for part in spec.split(","):
                key, sep, value = part.partition("=")
                if not sep or not key.strip() or not value.strip():
                    raise RecipeError(f"budget {part.strip()!r}: expected key=value; allowed: {_BUDGET_HELP}")
                items.append((key.strip().lower(), value.strip()))
        else:
            raise RecipeError(f"budget: got {spec!r}; expected {_BUDGET_HELP}")
        limits: dict[str, float] = {}
        for key, value in items:
            if key == "size":
                key, number = _parse_size(value)
            elif key == "ppl":
                number = _parse_ppl(value)
            elif key in ("bits", "prefill", "decode", "kl", "top1"):
                number = _number(key, value)
            else:
                raise RecipeError(f"budget: unknown key {key!r}; allowed: {_BUDGET_HELP}")
            if key in limits:
                raise RecipeError(f"budget: {key} is given twice")
            limits[key] = number
        return cls(limits, minimize)

    def describe(self) -> str:
        """The budget in its string form (``size<=0.30x, ppl<=+1%``)."""
        return ", ".join(_DESCRIBE.get(key, lambda v, k=key: f"{k}<={v:.3g}x")(value)
                         for key, value in self.limits.items())

    def objectives(self) -> list[str]:
        """The study's objective names, all minimized: the objective first, then KL (or size) for the front."""
        second = "size" if self.minimize == "kl" else "kl"
        return [self.minimize, second]

    def size_limit_bytes(self, original_bytes: int, original_params: int) -> float | None:
        """The tightest disk-size limit in bytes, or ``None`` when the budget has none."""
        limits = []
        if "size" in self.limits:
            limits.append(self.limits["size"] * original_bytes)
        if "size_bytes" in self.limits:
            limits.append(self.limits["size_bytes"])
        if "bits" in self.limits:
            limits.append(self.limits["bits"] * original_params / 8)
        return min(limits) if limits else None

    def constraints(self, m: dict[str, float]) -> dict[str, float]:
        """Constraint values for measured metrics ``m`` (relative excess; feasible when every value is <= 0).

        ``m`` holds the metrics of a trial record: ``size`` (ratio), ``disk_bytes``, ``bits``, ``prefill``,
        ``decode``, ``kl_divergence``, ``ppl`` (ratio to the original) and ``top1_agreement``; a limit's word
        (``kl``) names its metric through `hfsqueeze.evaluation.metrics.metric_key`.
        """
        out = {}
        m = {metric_key(k): v for k, v in m.items()}
        for key, limit in self.limits.items():
            if m.get("disk_bytes" if key == "size_bytes" else metric_key(key)) is None:
                out[key] = 1.0  # not measured (latency off): cannot be shown to fit
            elif key == "size_bytes":
                out[key] = m["disk_bytes"] / limit - 1
            elif key == "ppl":
                out[key] = (m["ppl"] - 1) - limit
            elif key == "top1":
                out[key] = limit - m["top1_agreement"]
            elif key == "kl":
                out[key] = m["kl_divergence"] / limit - 1
            else:
                out[key] = m[key] / limit - 1
        return out

    def quality_kl_target(self) -> float | None:
        """A KL level the quality limits stand for (the solver's target when minimizing size or latency).

        ``ppl=+x%`` maps to KL ``ln(1 + x)`` (perplexity is exp of the cross-entropy, and KL to the original bounds
        how far that can move on average); ``top1`` has no such map and is left to the measurements.
        """
        targets = []
        if "kl" in self.limits:
            targets.append(self.limits["kl"])
        if "ppl" in self.limits:
            targets.append(math.log1p(self.limits["ppl"]))
        return min(targets) if targets else None

    def to_dict(self) -> dict[str, Any]:
        return {"limits": dict(self.limits), "minimize": self.minimize, "text": self.describe()}
