"""Benchmark: `tune` at small size budgets, its chosen point built round-to-nearest and calibrated (issue 22).

    OMP_NUM_THREADS=2 python scripts/bench_tune_calibrated.py [--budgets 0.25,0.30] [--trials 20] [--json out.json]

For each budget, `hfsqueeze.tune` runs on SmolLM2-135M (or ``--model DIR``) with the default quantize space and the
default settings; the search sees only the built-in train split. The chosen point is then built twice by tune itself
(`hfsqueeze.tune.final`): bnb's round-to-nearest and GPTQ rounding onto the same grid, both measured on the built-in
held-out split and ``builtin:bible`` (never seen by the search or the calibration), and the build with the lower mean
KL is kept. The table gives both builds per text: perplexity change against the fp32 original and KL, with the
size, the search time and the calibrated build's time. The sensitivity cache (``$HFSQUEEZE_CACHE``) is shared, so the
second budget reuses the first one's scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HFSQUEEZE_DISABLE_PROGRESS", "1")

import hfsqueeze  # noqa: E402
from hfsqueeze.models import default_model_dir, load_model  # noqa: E402

TEXTS = ["builtin", "builtin:bible"]


def _changes(report, build: dict) -> dict[str, str]:
    """``text -> "+x.xx% / kl"`` of one build against the report's fp32 baseline."""
    base = report.baseline.texts or {}
    out = {}
    for label, metrics in (build.get("texts") or {}).items():
        ppl0 = (base.get(label) or {}).get("perplexity")
        ppl, kl = metrics.get("perplexity"), metrics.get("kl_divergence")
        change = f"{100 * (ppl / ppl0 - 1):+.2f}%" if ppl and ppl0 else "n/a"
        out[label] = f"{change} / {kl:.4f}" if kl is not None else change
    return out


def run(model_dir: str | None, budget: float, trials: int, workdir: Path) -> dict:
    model, tok = load_model(model_dir or default_model_dir())
    start = time.perf_counter()
    result = hfsqueeze.tune(model, tok, budget=f"size={budget}", trials=trials, output=str(workdir / f"t{budget}"),
                            eval_text=TEXTS, seed=0)
    wall = time.perf_counter() - start
    tuning = result.report.tuning
    calibrated = tuning.get("calibrated") or {}
    row = {"budget": budget, "chosen": result.chosen.get("label"), "size": result.report.final.disk_bytes
           / tuning["original"]["disk_bytes"], "wall_s": round(wall, 1), "record": calibrated, "builds": {}}
    for build in ("round_to_nearest", "calibrated"):
        metrics = (calibrated.get("final") or {}).get(build)
        if metrics is None and build == "round_to_nearest":
            metrics = {"texts": result.report.final.texts}
        row["builds"][build] = _changes(result.report, metrics) if metrics else None
    return row


def table(rows: list[dict]) -> str:
    lines = ["| budget | chosen point | size | build | " + " | ".join(f"{t}: ppl / KL" for t in TEXTS)
             + " | kept | tune wall s | calibrated build s |",
             "|---|---|---|---|" + "---|" * len(TEXTS) + "---|---|---|"]
    for r in rows:
        cal = r["record"]
        for build in ("round_to_nearest", "calibrated"):
            cells = r["builds"].get(build)
            if cells is None:
                continue
            kept = (build == "calibrated") == bool(cal.get("won"))
            lines.append(f"| {r['budget']} | {r['chosen']} | {r['size']:.3f}x | {build.replace('_', '-')} | "
                         + " | ".join(cells.get(t, "n/a") for t in TEXTS)
                         + f" | {'yes' if kept else ''} | {r['wall_s']:.0f} | {cal.get('seconds', '-')} |")
        if not cal.get("tried", True) or not cal:
            lines.append(f"| {r['budget']} | | | calibrated: not tried ({cal.get('why', 'no 4-bit stage')}) |"
                         + " |" * (len(TEXTS) + 3))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local model directory (default: the built-in SmolLM2)")
    parser.add_argument("--budgets", default="0.25,0.30", help="comma-separated size budgets (fractions of fp32)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tune-cal-") as tmp:
        for budget in (float(b) for b in args.budgets.split(",")):
            rows.append(run(args.model, budget, args.trials, Path(tmp)))
            print(json.dumps(rows[-1], default=str), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
