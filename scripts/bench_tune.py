"""Benchmark `hfsqueeze tune` against the uniform stock recipes (issue 10's targets).

```bash
python scripts/bench_tune.py --output out/bench-tune            # SmolLM2 and Gemma-3-270M, about 1-2 h on 2 cores
python scripts/bench_tune.py --output out/bench-tune --only smollm2 --trials 20
```

Runs, each measured for real (one torch thread; the machine load is printed next to every latency number):

- SmolLM2-135M: the stock recipes (int8, nf4, nf4-dq, fp4, bf16, and int8/nf4 with a bf16 rest) on the held-out
  evaluation text; `tune` at <= the disk size of stock int8 (sensitivity pass + N trials, timed), then at <= stock
  nf4's size; five more size budgets re-solved from the cached sensitivity (one trial each, timed); a latency budget
  (prefill <= 0.6x) over pruning + recovery + 16-bit, lowest KL.
- Gemma-3-270M (when converted in the hfsqueeze cache): stock int8 / bf16, and `tune` at <= 0.45x of fp32 disk.

Tuned points (the chosen one and the feasible Pareto set) are re-measured on the evaluation text exactly like the
stock recipes, so every row of the final table is comparable. Everything is also written to ``OUTPUT/bench.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

import hfsqueeze
from hfsqueeze.models import gemma3_dir, load_model

STOCK = {
    "int8": [{"method": "quantize", "bits": 8}],
    "nf4": [{"method": "quantize", "bits": 4, "quant_type": "nf4"}],
    "nf4-dq": [{"method": "quantize", "bits": 4, "quant_type": "nf4", "double_quant": True}],
    "fp4": [{"method": "quantize", "bits": 4, "quant_type": "fp4"}],
    "bf16": [{"method": "quantize", "bits": 16, "dtype": "bf16"}],
    "int8 + bf16 rest": [{"method": "quantize", "bits": 16, "dtype": "bf16"}, {"method": "quantize", "bits": 8}],
    "nf4 + bf16 rest": [{"method": "quantize", "bits": 16, "dtype": "bf16"},
                        {"method": "quantize", "bits": 4, "quant_type": "nf4"}],
}
# Joint pruning + recovery + fp16 for a latency budget. On this CPU (one thread) fp16 runs about as fast as fp32 while
# bf16 and int8/4-bit run slower (a pruned point in bf16 measured 0.81x where fp16 would be under 0.6x), so only
# removing work gets below 0.6x: every point prunes, recovers (30 distillation steps from the original), casts to fp16.
LATENCY_SPACE = {"quantize": {"bits": [16], "dtype": ["fp16"]},
                 "prune": {"enabled": [True], "heads": {"low": 0.25, "high": 0.5, "step": 0.0625},
                           "ffn": {"low": 0.25, "high": 0.6, "step": 0.05}, "layers": {"low": 0.0, "high": 0.3,
                                                                                      "step": 0.05},
                           "importance": ["gradient", "activation"]},
                 "recover": {"enabled": [True], "training_args.max_steps": [30]}}
# A 262k vocabulary makes every token's log-probabilities 1 MiB: half the default evaluation tokens.
GEMMA_EVAL = {"max_tokens": 2048}
GEMMA_SPACE = {"quantize": {"bits": [8, 4, 16], "quant_type": ["nf4"], "rest_dtype": ["bf16", "fp16"],
                            "threshold": {"low": 0.0, "high": 8.0, "step": 0.5}, "keep": {"low": 0.0, "high": 1.0}}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


def measure(model, tok, stages, name: str, model_name: str, evaluation: dict | None = None) -> dict:
    """Compress a copy with ``stages`` and measure it on the held-out evaluation text (as `hfsqueeze compress`)."""
    start = time.time()
    copy_ = copy.deepcopy(model)
    report = hfsqueeze.compress(copy_, {"stages": stages, "evaluation": {"per_stage": False, **(evaluation or {})}},
                                tokenizer=tok)
    b, f = report.baseline, report.final
    row = {
        "model": model_name, "point": name, "disk_mib": f.disk_bytes / 2**20, "size": f.disk_bytes / b.disk_bytes,
        "ppl": f.perplexity, "ppl_delta_pct": 100 * (f.perplexity / b.perplexity - 1), "kl": f.kl_divergence,
        "top1": f.top1_agreement, "prefill": f.prefill_ms_per_token / b.prefill_ms_per_token,
        "decode": f.decode_ms_per_token / b.decode_ms_per_token, "load": round(os.getloadavg()[0], 1),
        "seconds": round(time.time() - start, 1), "baseline_ppl": b.perplexity, "baseline_disk": b.disk_bytes,
    }
    log(f"{model_name} {name}: {fmt_row(row)}")
    del copy_
    return row


def fmt_row(r: dict) -> str:
    return (f"{r['disk_mib']:.1f} MiB ({r['size']:.3f}x), ppl {r['ppl']:.3f} ({r['ppl_delta_pct']:+.2f}%), "
            f"KL {r['kl']:.4f}, prefill {r['prefill']:.2f}x, decode {r['decode']:.2f}x (load {r['load']})")


def tuned_rows(result, model, tok, model_name: str, label: str, budget_text: str, remeasure: int,
               evaluation: dict | None = None) -> list[dict]:
    """The chosen point (already re-measured on eval by tune) and up to ``remeasure`` other Pareto points."""
    rep = result.report
    b, f = rep.baseline, rep.final
    rows = [{
        "model": model_name, "point": f"tuned [{label}] {result.chosen['label']}", "budget": budget_text,
        "disk_mib": f.disk_bytes / 2**20, "size": f.disk_bytes / b.disk_bytes, "ppl": f.perplexity,
        "ppl_delta_pct": 100 * (f.perplexity / b.perplexity - 1), "kl": f.kl_divergence, "top1": f.top1_agreement,
        "prefill": f.prefill_ms_per_token / b.prefill_ms_per_token,
        "decode": f.decode_ms_per_token / b.decode_ms_per_token, "load": round(os.getloadavg()[0], 1),
        "chosen": True,
    }]
    log(f"{model_name} tuned [{label}] chosen {result.chosen['label']}: {fmt_row(rows[0])}")
    others = [p for p in result.pareto if p["number"] != result.chosen["number"]][:remeasure]
    for point in others:
        row = measure(model, tok, point["stages"], f"pareto [{label}] #{point['number']} {point['label']}",
                      model_name, evaluation)
        rows.append({**row, "budget": budget_text, "chosen": False})
    return rows


def run_tune(model, tok, out: Path, label: str, **kwargs) -> tuple[object, float]:
    start = time.time()
    log(f"tune [{label}]: {kwargs.get('budget')} minimize={kwargs.get('minimize', 'kl')} "
        f"space={kwargs.get('space', 'quantize')} trials={kwargs.get('trials')}")
    result = hfsqueeze.tune(model, tok, output=out, overwrite=True, progress=_progress, **kwargs)
    seconds = time.time() - start
    log(f"tune [{label}] done in {seconds / 60:.1f} min ({result.stopped}); chosen {result.chosen['label']}")
    return result, seconds


def _progress(info: dict) -> None:
    if info.get("phase") == "sensitivity":
        if info["done"] == info["total"]:
            log(f"  sensitivity {info['format']}: {info['total']} modules in {info['elapsed']:.0f}s")
        return
    from hfsqueeze.tune.study import progress_line

    log("  " + progress_line(info, _progress.budget))


def resolve_only(model, tok, fraction: float, out: Path) -> tuple[str, float]:
    """Re-solve the per-module choices for a new size budget from the cached sensitivities, nothing measured: what
    ModelOpt's auto_quantize does for a new effective_bits. Returns the best solved point's label and the seconds."""
    from hfsqueeze.tune import Budget, load_space
    from hfsqueeze.tune.study import plan_baselines
    from hfsqueeze.tune.trial import TrialContext, TuneSettings
    from hfsqueeze.tune.prepare import make_context

    start = time.time()
    spec = json.loads((out / "tuning" / "run.json").read_text())
    tctx = make_context(model, tok, spec, out / "tuning")  # sensitivities from the cache
    tctx = TrialContext(model, tok, tctx.calibration, tctx.blocks[:1], Budget.parse({"size": fraction}),
                        load_space("quantize"), TuneSettings(**spec["settings"]), tctx.sensitivity,
                        spec["original_bytes"], spec["original_params"])
    kind = plan_baselines(tctx, 1)[0][0]
    return kind, time.time() - start


def smollm2(args, out: Path, bench: dict) -> None:
    model, tok = load_model("builtin")
    name = "SmolLM2-135M"
    rows = bench.setdefault("rows", [])
    timings = bench.setdefault("timings", {})
    if "stock" in args.parts:
        rows += [measure(model, tok, v, f"stock {k}", name) for k, v in STOCK.items()]
    stock = {r["point"]: r for r in rows if r["model"] == name}
    int8_bytes = round(stock["stock int8"]["disk_mib"] * 2**20)
    nf4_bytes = round(stock["stock nf4"]["disk_mib"] * 2**20)

    if "int8" in args.parts:
        _progress.budget = hfsqueeze.tune.Budget.parse({"size": f"{int8_bytes}B"})
        res, secs = run_tune(model, tok, out / "smollm2-int8-size", "<= stock int8 size",
                             budget={"size": f"{int8_bytes}B"}, trials=args.trials)
        timings["smollm2: sensitivity + trials at <= int8 size"] = {"seconds": secs, "trials": len(res.trials),
                                                                    "sensitivity": res.report.tuning["sensitivity"]}
        rows += tuned_rows(res, model, tok, name, "<= int8 size", f"size<={int8_bytes / 2**20:.1f}MiB",
                           args.remeasure)
    if "nf4" in args.parts:
        _progress.budget = hfsqueeze.tune.Budget.parse({"size": f"{nf4_bytes}B"})
        res, secs = run_tune(model, tok, out / "smollm2-nf4-size", "<= stock nf4 size",
                             budget={"size": f"{nf4_bytes}B"}, trials=args.trials_small)
        timings["smollm2: trials at <= nf4 size (cached sensitivity)"] = {"seconds": secs, "trials": len(res.trials)}
        rows += tuned_rows(res, model, tok, name, "<= nf4 size", f"size<={nf4_bytes / 2**20:.1f}MiB",
                           args.remeasure)
    if "resolve" in args.parts:
        for fraction in (0.25, 0.30, 0.35, 0.40, 0.50):
            label, secs = resolve_only(model, tok, fraction, out / "smollm2-int8-size")
            timings[f"smollm2: re-solve size={fraction} from cached sensitivity (no measurement): {label}"] = {
                "seconds": secs}
            _progress.budget = hfsqueeze.tune.Budget.parse({"size": fraction})
            res, secs = run_tune(model, tok, out / f"smollm2-resolve-{fraction}", f"re-solve size={fraction}",
                                 budget={"size": fraction}, trials=1)
            timings[f"smollm2: re-solve size={fraction}, 1 trial + eval re-measure"] = {"seconds": secs}
            rows += tuned_rows(res, model, tok, name, f"re-solve size={fraction}", f"size<={fraction}", 0)
    if "latency" in args.parts:
        _progress.budget = hfsqueeze.tune.Budget.parse("prefill=0.6")
        res, secs = run_tune(model, tok, out / "smollm2-latency", "prefill<=0.6, lowest KL",
                             budget="prefill=0.6", space=LATENCY_SPACE, trials=args.trials_latency)
        timings["smollm2: latency budget, space prune + 16-bit"] = {"seconds": secs, "trials": len(res.trials)}
        rows += tuned_rows(res, model, tok, name, "prefill<=0.6", "prefill<=0.6x", args.remeasure)
    del model


def gemma(args, out: Path, bench: dict) -> None:
    path = gemma3_dir()  # converted once from the PyPI GGUF into the hfsqueeze cache
    model, tok = load_model(str(path), dtype=torch.float32)
    name = "Gemma-3-270M"
    rows = bench.setdefault("rows", [])
    for key in ("int8", "bf16", "int8 + bf16 rest"):
        rows.append(measure(model, tok, STOCK[key], f"stock {key}", name, GEMMA_EVAL))
    _progress.budget = hfsqueeze.tune.Budget.parse("size=0.45")
    res, secs = run_tune(model, tok, out / "gemma-045", "<= 0.45x fp32", budget="size=0.45", space=GEMMA_SPACE,
                         trials=args.trials_small, evaluation=GEMMA_EVAL)
    bench.setdefault("timings", {})["gemma: sensitivity + trials at <= 0.45x"] = {"seconds": secs,
                                                                                 "trials": len(res.trials)}
    rows += tuned_rows(res, model, tok, name, "<= 0.45x", "size<=0.45x", args.remeasure, GEMMA_EVAL)


def table(rows: list[dict]) -> str:
    head = ("| Model | Point | Budget | Disk (MiB) | Size | ppl (eval) | ppl change | KL (eval) | Top-1 | Prefill | "
            "Decode | load |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['point']} | {r.get('budget', '')} | {r['disk_mib']:.1f} | "
                     f"{r['size']:.3f}x | "
                     f"{r['ppl']:.3f} | {r['ppl_delta_pct']:+.2f}% | {r['kl']:.4f} | {r['top1']:.3f} | "
                     f"{r['prefill']:.2f}x | {r['decode']:.2f}x | {r['load']} |")
    return "\n".join(lines)


def _sensitivity_note(timing: dict) -> str:
    """How long the sensitivity pass took; a pass cached by an earlier run is not in this run's wall time."""
    parts = [f"{fmt} {entry['seconds'] / 60:.1f} min" + (" (cached by an earlier run, not in this time)"
                                                          if entry.get("cached") else "")
             for fmt, entry in timing.get("sensitivity", {}).items()]
    return f"; sensitivity pass: {', '.join(parts)}" if parts else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="out/bench-tune")
    parser.add_argument("--only", choices=["smollm2", "gemma"], default=None)
    parser.add_argument("--trials", type=int, default=20, help="trials of the main SmolLM2 run")
    parser.add_argument("--trials-small", type=int, default=12, help="trials of the other runs")
    parser.add_argument("--trials-latency", type=int, default=8, help="trials of the latency run (each recovers)")
    parser.add_argument("--remeasure", type=int, default=4, help="Pareto points re-measured on eval per run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="stock,int8,nf4,resolve,latency",
                        help="SmolLM2 parts to run (stock rows are read back from OUTPUT/bench.json when skipped)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HFSQUEEZE_DISABLE_PROGRESS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    args.parts = args.parts.split(",")
    previous = out / "bench.json"
    bench: dict = json.loads(previous.read_text()) if previous.is_file() and "stock" not in args.parts else {}
    bench.update({"threads": args.threads, "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        if args.only in (None, "smollm2"):
            smollm2(args, out, bench)
        if args.only in (None, "gemma"):
            gemma(args, out, bench)
    finally:
        (out / "bench.json").write_text(json.dumps(bench, indent=1, default=str) + "\n")
        print("\n" + table(bench.get("rows", [])))
        for key, value in bench.get("timings", {}).items():
            print(f"- {key}: {value['seconds'] / 60:.1f} min" + (f", {value['trials']} trials" if "trials" in value
                                                                 else "") + _sensitivity_note(value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
