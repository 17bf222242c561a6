"""End-to-end GPU check: each method's recipe on a real model on CUDA, against the same recipe on this machine's CPU.

Run by ``scripts/gpu_check.sh`` (which installs carried wheels, checks packages and runs ``pytest -m gpu`` first).
Every run is a fresh process through the real command line (``hfsqueeze compress --device ... --output ...``), so the
peak GPU memory (``torch.cuda.max_memory_allocated``) is that run's alone; the artifact saved on the GPU is then
reloaded on the CPU and checked against the outputs recorded at save time (parity across devices). The CPU runs
use the same recipe, texts and token counts, so perplexity and KL compare like with like.

Writes ``gpu_check.md`` (the table), ``gpu_check.json`` and ``runs.log`` (every run's output, one after the other)
into ``--out``: few files, since a GPU machine hands back at most eight; the artifacts stay in a temporary folder.

    python scripts/gpu_check.py --out /tmp/gpu-check            # SmolLM2 (--model builtin) on cuda vs cpu
    python scripts/gpu_check.py --device cpu --model DIR --out X  # the same machinery on the CPU alone (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Small evaluation settings, the same for every run: the point is device parity and cost, not a precise ppl.
EVAL = {"text": "builtin", "max_tokens": 1024, "seq_len": 256, "prompt_tokens": 32, "decode_tokens": 16,
        "repeats": 3, "per_stage": False}
# One recipe per method, built-in recipes with small settings (names as `hfsqueeze recipes` lists them).
RECIPES = {
    "int8": [],
    "nf4": [],
    "prune-ffn": ["stages.1.calibration_tokens=2048", "stages.1.seq_len=256"],
    "distill-int8": ["stages.2.training_args.max_steps=4", "stages.2.data.eval_tokens=512", "stages.2.block_size=128"],
}


def _sets(recipe: str, latency: bool) -> list[str]:
    pairs = [f"evaluation.{k}={v}" for k, v in EVAL.items()] + RECIPES[recipe]
    pairs.append(f"evaluation.latency={str(latency).lower()}")
    return [x for pair in pairs for x in ("--set", pair)]


def run_one(args: argparse.Namespace) -> int:
    """In a fresh process: compress through the CLI, record time and peak GPU memory, reload on the CPU."""
    import torch

    from hfsqueeze.artifact.parity import check_saved_parity
    from hfsqueeze.cli import main

    cuda = args.device.startswith("cuda") or args.device == "auto"
    out = Path(args.artifact)
    argv = ["compress", "--model", args.model, "--recipe", args.recipe, "--device", args.device,
            "--output", str(out), "--overwrite", *_sets(args.recipe, latency=cuda or args.cpu_latency)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - start
    result = {"recipe": args.recipe, "device": args.device, "rc": rc, "seconds": round(seconds, 1)}
    if rc == 0:
        report = json.loads((out / "report.json").read_text())
        base, final = report["baseline"], report["final"]
        result.update({"model_bytes": base["footprint_bytes"], "final_bytes": final["footprint_bytes"],
                       "ppl_original": base.get("perplexity"), "ppl": final.get("perplexity"),
                       "kl": final.get("kl_divergence"), "top1": final.get("top1_agreement"),
                       "prefill_ms": final.get("prefill_ms_per_token"), "decode_ms": final.get("decode_ms_per_token"),
                       "environment_device": report["environment"].get("device")})
        if cuda:
            result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
            import hfsqueeze

            cpu = hfsqueeze.load_compressed(out, check_parity=False)  # saved on the GPU, reloaded on the CPU
            parity = check_saved_parity(cpu, out)
            result["parity_cpu_reload"] = {k: parity.get(k) for k in ("max_abs_diff", "tolerance", "top1_agreement",
                                                                       "tolerance_reason")}
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    return rc


def _spawn(recipe: str, device: str, model: str, out: Path, timeout: float, threads: int | None,
           cpu_latency: bool) -> dict:
    tag = f"{recipe}-{device.replace(':', '')}"
    result_file, log_file = out / f"{tag}.json", out / f"{tag}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--recipe", recipe, "--device", device,
           "--model", model, "--artifact", str(out / "artifacts" / tag), "--result", str(result_file)]
    cmd += ["--cpu-latency"] if cpu_latency else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    tail = log_file.read_text().strip().splitlines()[-1:] if log_file.is_file() else []
    return {"recipe": recipe, "device": device, "rc": rc, "seconds": round(time.perf_counter() - start, 1),
            "error": tail[0] if tail else "no output"}


def _mib(n) -> str:
    return f"{n / 2**20:.0f}" if isinstance(n, (int, float)) else "-"


def _num(x, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def table(rows: list[tuple[dict, dict | None]], device: str) -> str:
    """One line per recipe: the accelerator run, and the CPU run's numbers beside it."""
    head = (f"| recipe | rc | {device} s | peak GPU MiB | model MiB | peak / model | ppl orig | ppl | ppl cpu | "
            "KL | KL cpu | prefill ms/tok | decode ms/tok | cpu s | CPU reload parity (max diff / allowed) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for gpu, cpu in rows:
        cpu = cpu or {}
        peak, size = gpu.get("peak_gpu_bytes"), gpu.get("model_bytes")
        parity = gpu.get("parity_cpu_reload") or {}
        lines.append(" | ".join([
            f"| {gpu['recipe']}", str(gpu.get("rc")), _num(gpu.get("seconds"), ".1f"), _mib(peak), _mib(size),
            _num(peak / size if peak and size else None, ".2f") + ("x" if peak and size else ""),
            _num(gpu.get("ppl_original"), ".3f"), _num(gpu.get("ppl"), ".3f"), _num(cpu.get("ppl"), ".3f"),
            _num(gpu.get("kl"), ".4f"), _num(cpu.get("kl"), ".4f"), _num(gpu.get("prefill_ms"), ".3f"),
            _num(gpu.get("decode_ms"), ".2f"), _num(cpu.get("seconds"), ".1f"),
            (f"{_num(parity.get('max_abs_diff'), '.3g')} / {_num(parity.get('tolerance'), '.3g')}" if parity
             else gpu.get("error", "-")) + " |",
        ]))
    return "\n".join(lines)


def check(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hfsqueeze-gpu-check-"))
    (work / "artifacts").mkdir()
    try:
        return _check(args, out, work)
    finally:
        logs = sorted(work.glob("*.log"), key=lambda f: f.stat().st_mtime)
        with open(out / "runs.log", "w") as fh:
            for log in logs:
                fh.write(f"===== {log.stem} =====\n{log.read_text()}\n")
        shutil.rmtree(work, ignore_errors=True)  # the artifacts' weights stay behind


def _check(args: argparse.Namespace, out: Path, work: Path) -> int:
    recipes = args.recipes.split(",")
    cpu_results: dict[str, dict] = {}

    def cpu_side() -> None:  # the CPU reference runs, one at a time, beside the GPU runs
        for recipe in recipes:
            cpu_results[recipe] = _spawn(recipe, "cpu", args.model, work, args.timeout, args.cpu_threads, False)

    worker = threading.Thread(target=cpu_side) if args.device != "cpu" else None
    if worker is not None:
        worker.start()
    rows = [_spawn(recipe, args.device, args.model, work, args.timeout, None, args.device == "cpu")
            for recipe in recipes]
    if worker is not None:
        worker.join()
    text = table([(r, cpu_results.get(r["recipe"])) for r in rows], args.device)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"device": rows, "cpu": cpu_results, "eval": EVAL},
                                                   indent=1) + "\n")
    print(text)
    return 0 if all(r.get("rc") == 0 for r in rows + list(cpu_results.values())) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--device", default="cuda", help="the accelerator side (cuda, cuda:N, auto; cpu: smoke test)")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--timeout", type=float, default=240, help="seconds per run")
    parser.add_argument("--cpu-threads", type=int, default=None, help="OMP threads of the CPU reference runs")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-latency", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return run_one(args) if args.one else check(args)


if __name__ == "__main__":
    sys.exit(main())
