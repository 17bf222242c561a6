"""The distillation loss curve (``distill_loss_stage<i>.png``), drawn with matplotlib's Agg backend.

The total loss the Trainer logs is an average over each logging window; the components (``kd``, ``hard``,
``hidden``, ``attention``) are recorded every micro-batch, so they are averaged per optimizer step here and, over
many steps, shown with a moving average on top of the raw values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMPONENTS = {  # key: (legend label, colour)
    "kd": ("KD: KL to the teacher", "#1f77b4"),
    "hard": ("hard labels: cross-entropy", "#d62728"),
    "hidden": ("hidden states", "#2ca02c"),
    "attention": ("attention maps", "#9467bd"),
}
SMOOTH_ABOVE = 60  # steps; fewer are drawn as they are


def _per_step(components: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    """Mean of ``key`` per optimizer step (1-based: the record's step counts the updates done before it)."""
    sums: dict[int, list[float]] = {}
    for c in components:
        if key in c and "step" in c:
            sums.setdefault(int(c["step"]) + 1, []).append(float(c[key]))
    return [(step, sum(v) / len(v)) for step, v in sorted(sums.items())]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def loss_curve_figure(history: list[dict[str, Any]], components: list[dict[str, float]], title: str):
    """The loss curve as a matplotlib ``Figure`` (``None`` when nothing was logged): the total loss in black,
    each component in its own colour, integer step ticks, the legend outside the plot."""
    points = [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h and "step" in h]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    ax.plot(*zip(*points), color="#111111", linewidth=2.2, marker="o" if len(points) < 30 else None,
            markersize=4, label="total loss (logged average)", zorder=4)
    drawn = {"total"}
    for key, (label, colour) in COMPONENTS.items():
        series = _per_step(components, key)
        if not series:
            continue
        steps, values = zip(*series)
        if len(series) > SMOOTH_ABOVE:
            window = max(2, len(series) // 30)
            ax.plot(steps, values, color=colour, linewidth=0.8, alpha=0.3)
            ax.plot(steps, _moving_average(list(values), window), color=colour, linewidth=1.8,
                    label=f"{label} ({window}-step average)")
        else:
            ax.plot(steps, values, color=colour, linewidth=1.8, marker="." if len(series) < 30 else None, label=label)
        drawn.add(key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if max(p[0] for p in points) <= 1:
        ax.set_xlim(0.5, 1.5)  # one step: one tick, not 0.96, 0.98, ...
    ax.set_xlabel("optimizer step")
    # KD (KL at temperature T, times T^2) and cross-entropy are in nats per token; feature losses have no unit.
    ax.set_ylabel("loss (nats/token)" if drawn <= {"total", "kd", "hard"} else "loss (KD, cross-entropy: nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def loss_curve_png(history: list[dict[str, Any]], components: list[dict[str, float]], path: Path,
                   title: str) -> Path | None:
    """Write `loss_curve_figure` to ``path``; returns the path, or ``None`` when nothing was logged."""
    fig = loss_curve_figure(history, components, title)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
