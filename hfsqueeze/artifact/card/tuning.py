"""The card's "Tuning" section, from the report's ``tuning`` (written by `hfsqueeze.tune`), read through
`hfsqueeze.evaluation.trials.TrialRecord`; the columns are `TRIAL_COLUMNS` of the one metric table."""

from __future__ import annotations

from typing import Any

from ...evaluation.metrics import TRIAL_COLUMNS
from ...evaluation.trials import TrialRecord

_ROWS_NOTE = ("Rows: the feasible Pareto front, then the uniform stock recipes measured in the same run (ratios are "
              "to the original, latency timed side by side in one process).")


def _intro(tuning: dict[str, Any], trials: list[TrialRecord]) -> str:
    budget = tuning.get("budget", {})
    ran = len([t for t in trials if not t.skipped and t.duplicate_of is None])
    return (f"Found by `hfsqueeze tune`: lowest {budget.get('minimize', 'kl')} within the budget "
            f"**{budget.get('text') or 'none'}**, after {ran} trials ({tuning.get('stopped', 'done')}). Every trial "
            "was built and measured for real on the calibration text; the chosen point was then re-measured on the "
            "held-out evaluation text (the results above).")


def _calibrated_line(calibrated: dict[str, Any] | None) -> list[str]:
    """One sentence on the calibrated build of the chosen point, when one was tried (see `hfsqueeze.tune.final`)."""
    if not calibrated:
        return []
    if not calibrated.get("tried"):
        return [f"The chosen point was not built calibrated: {calibrated.get('why')}.", ""]
    kl = calibrated.get("kl_divergence") or {}
    plain, cal = kl.get("round_to_nearest"), kl.get("calibrated")
    if plain is None or cal is None:
        return []
    kept = "calibrated" if calibrated.get("won") else "round-to-nearest"
    return [f"The chosen point was built twice, as searched (round-to-nearest) and calibrated on the calibration text "
            f"(same format and size): KL {plain:.4g} vs {cal:.4g} on the evaluation text; the {kept} build is this "
            "model.", ""]


def _table(rows: list[TrialRecord], chosen: int | None) -> list[str]:
    cols = [c for c in TRIAL_COLUMNS if any(r.metric(c.key) is not None for r in rows)]
    lines = ["| # | Recipe | " + " | ".join(c.trial_label for c in cols) + " | Within budget |",
             "|---:|---|" + "---:|" * len(cols) + "---|"]
    for r in rows:
        mark = " (chosen)" if r.number == chosen else ""
        kind = " (uniform stock)" if r.uniform else ""
        cells = [c.trial_fmt(r.metric(c.key)) if r.metric(c.key) is not None else "n/a" for c in cols]
        lines.append(f"| {r.number} | {r.label or ''}{kind}{mark} | " + " | ".join(cells)
                     + f" | {'yes' if r.feasible else 'no'} |")
    return lines + ["", _ROWS_NOTE, ""]


def tuning_card_section(tuning: dict[str, Any] | None) -> list[str]:
    """The model card's "Tuning" section: budget, objective, the feasible Pareto table beside the uniform stock
    recipes that were measured, and the plot. Empty when the artifact was not tuned."""
    if not tuning:
        return []
    trials = [TrialRecord.from_dict(t) for t in tuning.get("trials", [])]
    records = {r.number: r for r in trials if r.metrics}
    front = tuning.get("pareto", [])
    pareto = [records[n] for n in front if n in records]
    uniform = [r for r in records.values() if r.uniform and r.number not in front]
    second = tuning.get("objectives", ["kl", "size"])[1]
    rows = sorted(pareto, key=lambda r: r.metric(second) or 0) + sorted(uniform, key=lambda r: r.metric("size") or 0)
    lines = ["## Tuning", "", _intro(tuning, trials), "", *_calibrated_line(tuning.get("calibrated"))]
    if rows:
        lines += _table(rows, tuning.get("chosen"))
    if tuning.get("plot"):
        lines += [f"![Pareto front]({tuning['plot']})", ""]
    return lines


__all__ = ["tuning_card_section"]
