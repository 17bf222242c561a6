"""`CompressionReport`: what a recipe did to a model, measured before and after each stage."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from pathlib import Path
from typing import Any

import torch

from ..core.utils import cpu_name, versions
from .measure import latency_check, model_task
from .metrics import MEASURED, Metrics, format_change

REPORT_SCHEMA = "hfsqueeze.report"
REPORT_VERSION = 1


def environment(model: Any) -> dict[str, Any]:
    """Where a measurement ran: library versions, CPU, threads and the model's device."""
    return {**versions(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "device": str(getattr(model, "device", "cpu"))}


def model_summary(model: Any) -> dict[str, Any]:
    """What the report says about the model: where it came from, its type, class and task."""
    return {
        "name_or_path": getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None),
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "task": model_task(model),
    }


@dataclasses.dataclass
class StageResult:
    index: int
    method: str
    config: dict[str, Any]
    details: dict[str, Any]
    seconds: float
    metrics: Metrics | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["metrics"] = self.metrics.to_dict() if self.metrics else None
        return out


@dataclasses.dataclass
class CompressionReport:
    """The result of `hfsqueeze.compress`: baseline, per-stage and final measurements.

    Example:

    ```python
    report = model.compress("int8", tokenizer=tok)
    print(report.to_markdown())
    report.final.perplexity / report.baseline.perplexity
    ```
    """

    model: dict[str, Any]
    recipe: dict[str, Any]
    environment: dict[str, Any]
    evaluation: dict[str, Any]
    baseline: Metrics | None = None
    stages: list[StageResult] = dataclasses.field(default_factory=list)
    final: Metrics | None = None
    command: str | None = None
    # Set by `hfsqueeze.tune`: budget, objective, every trial and the Pareto set (see hfsqueeze.tune.output).
    tuning: dict[str, Any] | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    created: str = dataclasses.field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    )
    latency_interleaved: bool = False  # the original and the final model were timed in alternating runs
    latency_skipped: str | None = None  # why ``evaluation.latency: auto`` timed nothing (`measure.latency_skipped`)

    def latency_check(self) -> dict[str, Any] | None:
        """Whether the final/original latency ratios can be trusted (`hfsqueeze.evaluation.measure.latency_check`)."""
        return latency_check(self.baseline, self.final, threads=self.environment.get("threads"),
                             interleaved=self.latency_interleaved)

    # ---- serialization ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "version": REPORT_VERSION,
            "created": self.created,
            "command": self.command,
            "model": self.model,
            "environment": self.environment,
            "evaluation": self.evaluation,
            "recipe": self.recipe,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "stages": [s.to_dict() for s in self.stages],
            "final": self.final.to_dict() if self.final else None,
            **({"tuning": self.tuning} if self.tuning is not None else {}),
            "warnings": list(self.warnings),
            "latency": self.latency_check(),
            **({"latency_skipped": self.latency_skipped} if self.latency_skipped else {}),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionReport":
        if data.get("schema") != REPORT_SCHEMA:
            raise ValueError(f"not an hfsqueeze report (schema {data.get('schema')!r})")
        stages = [
            StageResult(s["index"], s["method"], s["config"], s["details"], s["seconds"],
                        Metrics.from_dict(s.get("metrics")))
            for s in data.get("stages", [])
        ]
        return cls(
            model=data["model"], recipe=data["recipe"], environment=data["environment"],
            evaluation=data["evaluation"], baseline=Metrics.from_dict(data.get("baseline")), stages=stages,
            final=Metrics.from_dict(data.get("final")), command=data.get("command"), created=data.get("created", ""),
            tuning=data.get("tuning"),
            warnings=list(data.get("warnings") or []),
            latency_interleaved=bool((data.get("latency") or {}).get("interleaved", False)),
            latency_skipped=data.get("latency_skipped"),
        )

    @classmethod
    def load(cls, path: str | Path) -> "CompressionReport":
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        return cls.from_dict(json.loads(path.read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    # ---- presentation ----------------------------------------------------------------------------------------
    def columns(self) -> list[tuple[str, Metrics]]:
        """(heading, metrics) for the baseline, each measured stage and (if not already last) the final state."""
        cols = [("original", self.baseline)] if self.baseline else []
        for s in self.stages:
            if s.metrics is not None:
                cols.append((f"{s.index}. {s.method}{_stage_suffix(s)}", s.metrics))
        if self.final is not None and (not cols or cols[-1][1] is not self.final and cols[-1][1] != self.final):
            cols.append(("final", self.final))
        return cols

    def to_markdown(self) -> str:
        """A before/after table: one column per measured state, then the final/original ratio, then a footer that
        says what was measured (and flags latency ratios that cannot be trusted)."""
        cols = self.columns()
        if not cols:
            return "_nothing was measured_"
        check = self.latency_check()
        unreliable = check is not None and not check["reliable"]
        head = ["Metric"] + [c[0] for c in cols] + (["final / original"] if self.baseline and len(cols) > 1 else [])
        lines = [self.caption(), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for metric in MEASURED:
            values = [getattr(m, metric.key) for _, m in cols]
            if all(v is None for v in values):
                continue
            row = [metric.short] + [metric.short_fmt(v) if v is not None else "n/a" for v in values]
            if len(head) > len(cols) + 1:
                change = format_change(metric.report_change, values[0], values[-1], brief=True)
                flag = unreliable and metric.latency and metric.report_change == "ratio" and bool(values[0]) \
                    and values[-1] is not None
                row.append(change + (" (unreliable)" if flag else ""))
            lines.append("| " + " | ".join(row) + " |")
        extra = self._texts_table(cols) + self._warnings_lines()
        return "\n".join(lines) + "\n\n" + "".join(f"{block}\n\n" for block in extra) + self._footer(cols, check)

    def caption(self) -> str:
        """The table's caption: which model, compressed with which recipe (a local path shows its last part)."""
        name = str(self.model.get("name_or_path") or self.model.get("architecture") or "model")
        if Path(name).is_absolute():
            name = Path(name).name
        recipe = self.recipe.get("name") or "an unnamed recipe"
        return f"**{name}** ({self.model.get('architecture')}), recipe **{recipe}**:"

    def _texts_table(self, cols: list[tuple[str, Metrics]]) -> list[str]:
        """Quality on every evaluation text (``evaluation.text`` as a list), one row per text and metric."""
        labels = list(dict.fromkeys(label for _, m in cols for label in (m.texts or {})))
        if len(labels) < 2:
            return []
        lines = ["Quality on each evaluation text:", "",
                 "| Text | Metric | " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * (len(cols) + 2)]
        for label in labels:
            for metric in MEASURED:
                values = [(m.texts or {}).get(label, {}).get(metric.key) for _, m in cols]
                if all(v is None for v in values):
                    continue
                cells = [metric.short_fmt(v) if v is not None else "n/a" for v in values]
                lines.append(f"| {label} | {metric.short} | " + " | ".join(cells) + " |")
        return ["\n".join(lines)]

    def _warnings_lines(self) -> list[str]:
        return ["Warnings:\n\n" + "\n".join(f"- {w}" for w in self.warnings)] if self.warnings else []

    def _footer(self, cols: list[tuple[str, Metrics]], check: dict[str, Any] | None) -> str:
        """What was measured, and only that: no token count without quality metrics, no latency claim without it."""
        env, ev = self.environment, self.evaluation
        measured = []
        tokens = ev.get("eval_tokens") or next((m.eval_tokens for _, m in reversed(cols) if m.eval_tokens), None)
        if tokens:
            measured.append(f"quality on {tokens} tokens of {ev.get('text')} text")
        if self.latency_skipped:
            measured.append(f"latency not measured: {self.latency_skipped}")
        if check is not None:
            counts = sorted({len(s.get("runs") or []) for _, m in cols for s in (m.latency_spread or {}).values()})
            runs = ev.get("repeats") if not counts else str(counts[0]) if len(counts) == 1 else \
                f"{counts[0]}-{counts[-1]}"
            how = ("the original and the result timed in alternating runs" if check["interleaved"]
                   else "the original timed before compression")
            plural = "s" if str(runs) != "1" else ""
            measured.append(f"latency as the median of {runs} run{plural} ({how}; min/median/max in report.json)")
        what = "; ".join(measured) if measured else "sizes only (no quality or latency measurements)"
        where = f"{env.get('cpu', 'CPU')} ({env.get('threads')} threads, {env.get('device', 'cpu')})"
        foot = f"Measured on {where}: {what}."
        if check is not None and not check["reliable"]:
            foot += "\nLatency ratios are unreliable: " + "; ".join(check["reasons"]) + "."
        return foot


def _stage_suffix(stage: StageResult) -> str:
    fmt = stage.details.get("format") if isinstance(stage.details, dict) else None
    return f" ({fmt})" if fmt else ""
