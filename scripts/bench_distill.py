"""Distillation benchmark on the real SmolLM2-135M-Instruct (CPU, fixed step budgets).

(a) prune 25% of attention heads and 25% of FFN neurons, then recover with ``recover:`` (KD from the original):
    perplexity of base / pruned / recovered on the held-out split and the fraction of the gap closed.
(b) a half-depth student (every other layer, DistilBERT-style) trained with KD from the full model vs the same
    student trained on the hard loss only, with the same steps and data.

    python scripts/bench_distill.py                     # defaults sized for ~20 minutes on a busy 2-core CPU
    python scripts/bench_distill.py --recover-steps 200 --student-steps 200 --batch 4   # a longer run

Perplexities use the distill stage's own held-out blocks (the built-in text's eval split, never trained on), the same
blocks for every model in a part, so the numbers compare directly.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HFSQUEEZE_DISABLE_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recover-steps", type=int, default=40, help="(a) recovery steps")
    p.add_argument("--student-steps", type=int, default=60, help="(b) steps for each student run")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--block", type=int, default=256, help="tokens per sequence")
    p.add_argument("--recover-lr", type=float, default=3e-4)
    p.add_argument("--student-lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; on a shared 2-core machine 1 thread trained SmolLM2 ~4x faster than 2")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored in (a)")
    p.add_argument("--student-eval-tokens", type=int, default=1024, help="held-out tokens scored in (b)")
    p.add_argument("--calibration-tokens", type=int, default=1024, help="prune scoring tokens")
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 (bf16 autocast is ~2x faster on AMX CPUs)")
    p.add_argument("--skip", choices=["a", "b"], default=None, help="run only one part")
    p.add_argument("--out", default="bench_out/distill", help="results.json and loss curves go here")
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def training_args(steps: int, args: argparse.Namespace, lr: float) -> dict:
    return {"max_steps": steps, "per_device_train_batch_size": args.batch, "learning_rate": lr,
            "warmup_steps": 0.1, "lr_scheduler_type": "cosine", "bf16": not args.no_bf16,
            "logging_steps": 1, "seed": 0, "save_strategy": "no"}


def part_a(args: argparse.Namespace, out: Path) -> dict:
    import hfsqueeze
    from hfsqueeze.models import default_model_dir, load_model

    model, tok = load_model(default_model_dir())
    recipe = {
        "name": "bench-prune-recover",
        "evaluation": {"max_tokens": 512, "seq_len": 256, "latency": False, "disk_size": False},
        "recover": {
            "teacher": "original", "alpha": 0.5, "temperature": 2.0, "block_size": args.block,
            "freeze_embeddings": True, "output_dir": str(out / "a_recover"), "resume": False,
            "data": {"text": "builtin", "eval_tokens": args.eval_tokens},
            "training_args": training_args(args.recover_steps, args, args.recover_lr),
        },
        "stages": [{"method": "prune", "heads": 0.25, "ffn": 0.25, "calibration_tokens": args.calibration_tokens}],
    }
    log(f"(a) prune 25% heads + 25% FFN, recover {args.recover_steps} steps x {args.batch} x {args.block} tokens")
    started = time.perf_counter()
    report = hfsqueeze.compress(model, recipe, tokenizer=tok, measure_quality=False)
    prune, distill = report.stages[0], report.stages[1]
    d = distill.details
    result = {
        "base_ppl": d["teacher_perplexity"], "pruned_ppl": d["perplexity_before"],
        "recovered_ppl": d["perplexity_after"],
        "gap_closed": d["gap_closed"], "params_base": report.baseline.parameters,
        "params_pruned": prune.metrics.parameters if prune.metrics else None, "steps": d["steps"],
        "tokens_seen": d["tokens_seen"], "train_seconds": d["train_seconds"], "prune_seconds": prune.seconds,
        "total_seconds": round(time.perf_counter() - started, 1), "loss_curve_png": (d["artifacts"] or [None])[0],
    }
    log(f"(a) done: {json.dumps(result)}")
    del model, report
    gc.collect()
    return result


def part_b(args: argparse.Namespace, out: Path) -> dict:
    from hfsqueeze.core.context import CompressionContext
    from hfsqueeze.core.hf import frozen_copy
    from hfsqueeze.methods.distill import DistillConfig
    from hfsqueeze.methods.distill.apply import apply_distill
    from hfsqueeze.models import default_model_dir, load_model

    teacher, tok = load_model(default_model_dir())
    teacher = frozen_copy(teacher)
    results = {}
    for name, alpha in (("kd", 0.5), ("hard", 0.0)):
        student, _ = load_model(default_model_dir())
        ctx = CompressionContext(tokenizer=tok, original=teacher, stage_index=1)
        cfg = DistillConfig.from_dict({
            "teacher": "original", "student": {"keep": 0.5}, "alpha": alpha, "temperature": 2.0,
            "block_size": args.block, "freeze_embeddings": True, "output_dir": str(out / f"b_{name}"),
            "resume": False, "data": {"text": "builtin", "eval_tokens": args.student_eval_tokens},
            "training_args": training_args(args.student_steps, args, args.student_lr),
        })
        log(f"(b) half-depth student, {name} loss (alpha={alpha}), {args.student_steps} steps")
        started = time.perf_counter()
        d = apply_distill(student, cfg, ctx)
        results[name] = {
            "teacher_ppl": d["teacher_perplexity"], "init_ppl": d["perplexity_before"], "ppl": d["perplexity_after"],
            "layers": d["student"]["source_layers"], "params": d["student"]["parameters_after"],
            "params_teacher": d["student"]["parameters_before"], "steps": d["steps"], "tokens_seen": d["tokens_seen"],
            "train_seconds": d["train_seconds"], "total_seconds": round(time.perf_counter() - started, 1),
            "loss_curve_png": (d["artifacts"] or [None])[0],
        }
        log(f"(b) {name} done: {json.dumps(results[name])}")
        del student
        gc.collect()
    return results


def tables(res: dict) -> str:
    lines = []
    a = res.get("a")
    if a:
        lines += [
            "(a) SmolLM2-135M: prune 25% heads + 25% FFN, then recover (KD from the original, "
            f"{a['steps']} steps, {a['tokens_seen']} tokens, {a['train_seconds']:.0f} s training)",
            "",
            "| model | params | held-out ppl |",
            "|---|---|---|",
            f"| base | {a['params_base'] / 1e6:.1f}M | {a['base_ppl']:.2f} |",
            f"| pruned | {(a['params_pruned'] or 0) / 1e6:.1f}M | {a['pruned_ppl']:.2f} |",
            f"| recovered | {(a['params_pruned'] or 0) / 1e6:.1f}M | {a['recovered_ppl']:.2f} |",
            "",
            f"gap closed: {a['gap_closed'] * 100:.1f}%" if a["gap_closed"] is not None else "gap closed: n/a",
            "",
        ]
    b = res.get("b")
    if b:
        kd, hard = b["kd"], b["hard"]
        lines += [
            f"(b) half-depth student ({len(kd['layers'])} of 30 layers, {kd['params'] / 1e6:.1f}M params vs "
            f"{kd['params_teacher'] / 1e6:.1f}M), {kd['steps']} steps each, {kd['tokens_seen']} tokens",
            "",
            "| model | held-out ppl | train s |",
            "|---|---|---|",
            f"| teacher (full depth) | {kd['teacher_ppl']:.2f} | - |",
            f"| student at init | {kd['init_ppl']:.2f} | - |",
            f"| student, hard loss only | {hard['ppl']:.2f} | {hard['train_seconds']:.0f} |",
            f"| student, KD (alpha 0.5, T 2) | {kd['ppl']:.2f} | {kd['train_seconds']:.0f} |",
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    started = time.perf_counter()
    res: dict = {"args": vars(args)}
    if args.skip != "a":
        res["a"] = part_a(args, out)
        (out / "results.json").write_text(json.dumps(res, indent=2))
    if args.skip != "b":
        res["b"] = part_b(args, out)
    res["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print()
    print(tables(res))
    print(f"total wall time {res['total_seconds'] / 60:.1f} min; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
