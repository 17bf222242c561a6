"""What `hfsqueeze.tune` leaves behind: ``trials.jsonl``, ``pareto.png`` and the tuned artifact itself (a normal
`hfsqueeze.save_compressed` directory holding ``tuning/``; the card renders the report's ``tuning`` section)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from ..artifact.files import TUNING_DIR  # one name: the Hub push leaves this folder out unless asked
from ..core.utils import atomic_write
from ..evaluation.trials import TrialRecord

PARETO_PNG = "pareto.png"
def write_trials_jsonl(tuning_dir: Path, records: list[TrialRecord]) -> None:
    """Rewrite ``trials.jsonl`` from the study (the authoritative copy; workers also append as they go)."""
    atomic_write(Path(tuning_dir) / "trials.jsonl",
                 "".join(json.dumps(r.to_dict(), default=str) + "\n" for r in records))


_AXIS_LABELS = {
    "size": "weights on disk (x original)",
    "kl": "KL to the original (nats/token, calibration text)",
    "ppl": "perplexity (x original)",
    "top1": "top-1 agreement with the original",
    "prefill": "prefill latency (x original)",
    "decode": "decode latency (x original)",
}


def plot_pareto(path: Path, records: list[TrialRecord], pareto: list[int], chosen: int | None,
                objectives: list[str], limits: dict[str, float]) -> Path | None:
    """Write `pareto_figure` to ``path``. Returns the path, or ``None`` without matplotlib or points."""
    fig = pareto_figure(records, pareto, chosen, objectives, limits)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def pareto_figure(records: list[TrialRecord], pareto: list[int], chosen: int | None, objectives: list[str],
                  limits: dict[str, float]):
    """Scatter every measured trial (second objective on x, first on y), the feasible Pareto front, the budget's
    limits and the chosen point, marked and labelled; uniform stock recipes are labelled, one label per position
    (recipes that measured the same are named together) and nudged apart where labels would overlap. Returns a
    matplotlib ``Figure``, or ``None`` without matplotlib or measured trials."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = [r for r in records if r.measured]
    if not done:
        return None
    y_key, x_key = objectives[0], objectives[1]

    def point(r):
        return r.metric(x_key), max(r.metric(y_key), 1e-9)

    def xy(rows):
        return [point(r)[0] for r in rows], [point(r)[1] for r in rows]

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.scatter(*xy([r for r in done if not r.feasible]), s=16, c="#bbbbbb", label="outside the budget")
    ax.scatter(*xy([r for r in done if r.feasible]), s=20, c="#6a9fd8", label="within the budget")
    front = sorted((r for r in done if r.number in pareto), key=lambda r: r.metric(x_key))
    if front:
        ax.plot(*xy(front), "-o", c="#1f4e9a", ms=5, label="Pareto front (within the budget)")
    uniform = [r for r in done if r.uniform]
    if uniform:
        ax.scatter(*xy(uniform), marker="s", s=40, facecolors="none", edgecolors="#444444",
                   label="uniform stock recipe")
    labels = _merged_labels([(point(r), r.kind.split(":", 1)[1]) for r in uniform])
    pick = next((r for r in done if r.number == chosen), None)
    if pick is not None:
        ax.scatter(*xy([pick]), marker="*", s=220, c="#d62728", edgecolors="black", linewidths=0.6, zorder=5,
                   label="chosen")
        # A stock recipe at the chosen point is named in the chosen label rather than in a second label there.
        same = [lab for lab in labels if _same_place(lab[0], point(pick))]
        labels = [lab for lab in labels if lab not in same]
        names = [pick.label, *(n for lab in same for n in lab[1].split(" = "))]
        name = " = ".join(dict.fromkeys(n for n in names if n))
        labels.append((point(pick), f"chosen: #{pick.number}" + (f" {name}" if name else ""), True))
    for key, limit in limits.items():
        line = ax.axvline if key == x_key else ax.axhline if key == y_key else None
        if line is not None:
            line(limit, ls="--", c="#d62728", lw=0.9, label=f"budget: {key} ≤ {limit:.3g}")
    if y_key == "kl":
        ax.set_yscale("log")
    ax.set_xlabel(_AXIS_LABELS.get(x_key, f"{x_key} (x original)"))
    ax.set_ylabel(_AXIS_LABELS.get(y_key, f"{y_key} (x original)"))
    ax.set_title(f"hfsqueeze tune: {len(done)} trials, the Pareto front and the chosen recipe")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    _annotate_apart(fig, ax, labels)
    return fig


def _merged_labels(points: list[tuple[tuple[float, float], str]]) -> list[tuple[tuple[float, float], str, bool]]:
    """One label per position: recipes whose measurements coincide (to 4 significant digits) share one label."""
    merged: dict[tuple[str, str], tuple[tuple[float, float], list[str]]] = {}
    for (x, y), name in points:
        slot = merged.setdefault(_place((x, y)), ((x, y), []))
        if name not in slot[1]:
            slot[1].append(name)
    return [(xy, " = ".join(names), False) for xy, names in merged.values()]


def _place(xy: tuple[float, float]) -> tuple[str, str]:
    return f"{xy[0]:.4g}", f"{xy[1]:.4g}"


def _same_place(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return _place(a) == _place(b)


def _candidate_offsets() -> list[tuple[int, int, str]]:
    """Where a label may sit relative to its point, in points (x, y, horizontal alignment), nearest first."""
    near = [(8, 4, "left"), (8, -12, "left"), (-8, 4, "right"), (-8, -12, "right")]
    return near + [(8, sign * (4 + 11 * k), "left") for k in range(1, 12) for sign in (1, -1)]


def _annotate_apart(fig, ax, labels: list[tuple[tuple[float, float], str, bool]]) -> None:
    """Annotate each point at the nearest offset where its text overlaps no label placed before it and stays inside
    the plot (the chosen point first); a label moved away from its point gets a thin leader line."""
    from matplotlib.text import Text

    placed = []
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    for (x, y), text, bold in sorted(labels, key=lambda item: (not item[2], item[0][1], item[0][0])):
        style = {"textcoords": "offset points", "fontsize": 8, "fontweight": "bold" if bold else "normal",
                 "color": "#b01c1c" if bold else "#222222",
                 "bbox": {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}}
        for dx, dy, align in _candidate_offsets():
            note = ax.annotate(text, (x, y), xytext=(dx, dy), ha=align, **style)
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(other) for other in placed):
                break
            note.remove()
        else:  # nowhere free: the nearest place, overlapping
            note = ax.annotate(text, (x, y), xytext=(8, 4), **style)
            dy = 4
        if abs(dy) > 12:  # moved away from its point: a leader line says which point it names
            note.remove()
            note = ax.annotate(text, (x, y), xytext=(dx, dy), ha=align,
                               arrowprops={"arrowstyle": "-", "color": "#888888", "lw": 0.6}, **style)
        note.update_positions(renderer)
        placed.append(Text.get_window_extent(note, renderer))


def install_artifact(staged: Path, out: Path) -> None:
    """Move the files of a freshly saved artifact ``staged`` into ``out``, replacing the previous artifact files
    there and keeping ``out/tuning/``; ``staged`` is removed."""
    out.mkdir(parents=True, exist_ok=True)
    new = {p.name for p in staged.iterdir()}
    for entry in out.iterdir():
        if entry.is_file() and not entry.is_symlink() and entry.name not in new and entry.name != TUNING_DIR:
            entry.unlink()
    for name in sorted(new):
        os.replace(staged / name, out / name)
    shutil.rmtree(staged, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.tune-{os.getpid()}-{secrets.token_hex(4)}")


__all__ = ["install_artifact", "pareto_figure", "plot_pareto", "staging_dir", "write_trials_jsonl"]
