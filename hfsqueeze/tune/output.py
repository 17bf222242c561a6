"""What `hfsqueeze.tune` leaves behind: ``trials.jsonl``, ``pareto.png`` and the tuned artifact itself (a normal
`hfsqueeze.save_compressed` directory holding ``tuning/``; the card renders the report's ``tuning`` section)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from ..artifact.files import TUNING_DIR  # one name: the Hub push leaves this folder out unless asked

PARETO_PNG = "pareto.png"
def write_trials_jsonl(tuning_dir: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite ``trials.jsonl`` from the study (the authoritative copy; workers also append as they go)."""
    path = Path(tuning_dir) / "trials.jsonl"
    tmp = path.with_name(f".trials.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    os.replace(tmp, path)


def plot_pareto(path: Path, records: list[dict[str, Any]], pareto: list[int], chosen: int | None,
                objectives: list[str], limits: dict[str, float]) -> Path | None:
    """Scatter every measured trial (second objective on x, first on y), the feasible Pareto front and the chosen
    point; uniform stock recipes are labelled. Returns the path, or ``None`` without matplotlib or points."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    done = [r for r in records if r.get("metrics") and r["state"] == "COMPLETE" and not r.get("skipped")
            and r.get("duplicate_of") is None]
    if not done:
        return None
    y_key, x_key = objectives[0], objectives[1]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)

    def xy(rows):
        return [r["metrics"][x_key] for r in rows], [max(r["metrics"][y_key], 1e-9) for r in rows]

    ax.scatter(*xy([r for r in done if not r["feasible"]]), s=14, c="#bbbbbb", label="outside the budget")
    ax.scatter(*xy([r for r in done if r["feasible"]]), s=18, c="#6a9fd8", label="within the budget")
    front = sorted((r for r in done if r["number"] in pareto), key=lambda r: r["metrics"][x_key])
    if front:
        ax.plot(*xy(front), "-o", c="#1f4e9a", ms=5, label="Pareto front (feasible)")
    for r in done:
        if str(r.get("kind", "")).startswith("uniform:"):
            x, y = r["metrics"][x_key], max(r["metrics"][y_key], 1e-9)
            ax.scatter([x], [y], marker="s", s=26, facecolors="none", edgecolors="#444444")
            ax.annotate(r["kind"].split(":", 1)[1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    pick = next((r for r in done if r["number"] == chosen), None)
    if pick is not None:
        ax.scatter(*xy([pick]), marker="*", s=160, c="#d62728", zorder=5, label="chosen")
    for key, limit in limits.items():
        if key == x_key:
            ax.axvline(limit, ls="--", c="#d62728", lw=0.8)
        elif key == y_key:
            ax.axhline(limit, ls="--", c="#d62728", lw=0.8)
    if y_key == "kl":
        ax.set_yscale("log")
    ax.set_xlabel({"size": "disk size (x original)", "kl": "KL to original (calibration)"}.get(x_key, f"{x_key} (x)"))
    ax.set_ylabel({"kl": "KL to original (calibration, nats/token)", "size": "disk size (x original)"}.get(
        y_key, f"{y_key} (x original)"))
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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


__all__ = ["install_artifact", "plot_pareto", "staging_dir", "write_trials_jsonl"]
