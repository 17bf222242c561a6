"""The two PNGs hfsqueeze writes, drawn from small synthetic inputs (no model): the distill loss curve and the tune
Pareto plot. `write_examples(folder)` writes both for a person to look at:
``python -c "import sys; sys.path.insert(0, 'tests/artifact'); import test_plots; test_plots.write_examples('/tmp/plots')"``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from hfsqueeze.methods.distill.plot import loss_curve_figure, loss_curve_png  # noqa: E402
from hfsqueeze.evaluation.trials import TrialRecord  # noqa: E402
from hfsqueeze.tune.output import pareto_figure, plot_pareto  # noqa: E402
from matplotlib.text import Text  # noqa: E402


def synthetic_loss(steps: int = 12, micro_batches: int = 2) -> tuple[list[dict], list[dict]]:
    """A Trainer log (total loss every other step) and per-micro-batch components, as `DistillTrainer` records."""
    rng = random.Random(0)
    components = []
    for step in range(steps):  # the record's step counts the updates done before it
        for _ in range(micro_batches):
            kd = 2.5 * math.exp(-step / (steps / 3)) + 0.3 + rng.uniform(-0.1, 0.1)
            hard = 3.2 * math.exp(-step / (steps / 2)) + 1.1 + rng.uniform(-0.1, 0.1)
            components.append({"step": float(step), "kd": kd, "hard": hard, "loss": 0.5 * kd + 0.5 * hard})
    history = [{"step": s, "loss": sum(c["loss"] for c in components if int(c["step"]) + 1 == s) / micro_batches}
               for s in range(1, steps + 1) if s % 2 == 0 or s == steps]
    return history, components


UNIFORM = [("int8", 0.302, 0.0187), ("int8-rest-bf16", 0.302, 0.0187), ("nf4", 0.181, 0.162),
           ("nf4-dq", 0.1805, 0.1625), ("fp4", 0.181, 0.241), ("bf16", 0.5, 0.0009)]


def synthetic_trials() -> tuple[list[TrialRecord], list[int], int, list[str], dict[str, float]]:
    """Tune records: six uniform stock recipes (two measure the same, two almost), 14 searched points, a front."""
    rng = random.Random(1)
    records = []
    for number, (name, size, kl) in enumerate(UNIFORM):
        records.append({"number": number, "state": "COMPLETE", "kind": f"uniform:{name}", "label": name,
                        "metrics": {"size": size, "kl": kl}, "feasible": size <= 0.35})
    for number in range(len(UNIFORM), len(UNIFORM) + 14):
        size = rng.uniform(0.17, 0.55)
        kl = 0.9 * math.exp(-9 * (size - 0.17)) * rng.uniform(1.0, 2.0)
        records.append({"number": number, "state": "COMPLETE", "kind": "search", "label": f"mixed {number}",
                        "metrics": {"size": size, "kl": kl}, "feasible": size <= 0.35})
    feasible = sorted((r for r in records if r["feasible"]), key=lambda r: r["metrics"]["size"])
    pareto, best = [], math.inf
    for r in feasible:
        if r["metrics"]["kl"] < best:
            pareto.append(r["number"])
            best = r["metrics"]["kl"]
    chosen = min((r for r in feasible), key=lambda r: r["metrics"]["kl"])["number"]
    # Read as `TrialRecord`s, from the keys an earlier version wrote (``kl``): the plot reads either.
    return [TrialRecord.from_dict(r) for r in records], pareto, chosen, ["kl", "size"], {"size": 0.35}


def write_examples(folder: str | Path) -> list[Path]:
    """Both plots from the synthetic inputs, plus a 300-step loss curve (moving averages)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    short = loss_curve_png(*synthetic_loss(), folder / "loss_short.png",
                           "Distillation loss (teacher: original), 12 steps")
    long = loss_curve_png(*synthetic_loss(300, 1), folder / "loss_long.png",
                          "Distillation loss (teacher: original), 300 steps")
    pareto = plot_pareto(folder / "pareto.png", *synthetic_trials())
    return [short, long, pareto]


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("steps", [1, 7, 12, 300])
def test_loss_curve_is_readable(steps):
    fig = loss_curve_figure(*synthetic_loss(steps), "Distillation loss")
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks  # steps are whole numbers
    assert ax.get_title() and "step" in ax.get_xlabel() and "nats/token" in ax.get_ylabel()
    labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert labels[0].startswith("total loss") and any(label.startswith("KD") for label in labels)
    for line in ax.get_lines():  # every labelled curve is drawn opaque and at least 1.5 points wide
        if not line.get_label().startswith("_"):
            assert (line.get_alpha() or 1.0) >= 0.9 and line.get_linewidth() >= 1.5, line.get_label()
    renderer = fig.canvas.get_renderer()
    # The legend sits outside the plotting area, so it covers no curve.
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    _close(fig)


def test_loss_curve_png_is_written(tmp_path):
    path = loss_curve_png(*synthetic_loss(), tmp_path / "loss.png", "Distillation loss")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert loss_curve_png([], [], tmp_path / "none.png", "nothing logged") is None


def test_pareto_plot_marks_the_chosen_point_and_keeps_labels_apart(tmp_path):
    records, pareto, chosen, objectives, limits = synthetic_trials()
    fig = pareto_figure(records, pareto, chosen, objectives, limits)
    ax = fig.axes[0]
    fig.canvas.draw()
    notes = [child for child in ax.texts]
    texts = [n.get_text() for n in notes]
    pick = next(r for r in records if r.number == chosen)
    chosen_notes = [n for n in notes if n.get_text().startswith(f"chosen: #{chosen}")]
    assert len(chosen_notes) == 1 and chosen_notes[0].xy == (pick.metric("size"), pick.metric("kl"))
    # Two recipes that measured the same share one label; no two labels point at the same coordinates.
    assert chosen_notes[0].get_text() == "chosen: #0 int8 = int8-rest-bf16"  # a stock recipe was the best
    assert not any(t.startswith("int8") for t in texts)
    assert len({n.xy for n in notes}) == len(notes)
    assert {"nf4", "nf4-dq", "fp4", "bf16"} <= set(texts)
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(n, renderer) for n in notes]  # the label texts, without leader lines
    for i, a in enumerate(boxes):
        for j in range(i):
            assert not a.overlaps(boxes[j]), (texts[i], texts[j])
    assert ax.get_title() and "x original" in ax.get_xlabel() and "nats/token" in ax.get_ylabel()
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    _close(fig)
    path = plot_pareto(tmp_path / "pareto.png", records, pareto, chosen, objectives, limits)
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"


def test_examples_are_written(tmp_path):
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in write_examples(tmp_path))
