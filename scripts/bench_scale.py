"""Benchmark: peak memory and wall time of hfsqueeze's commands on random Llamas of growing size, against stock.

    python scripts/bench_scale.py [--sizes 50M,200M,800M] [--rows stock,int8,prune,distill,tune] [--json out.json]

Each size is a random Llama (49,152-token vocabulary, the SmolLM2 tokenizer, tied embeddings) built from a config
and saved once as fp32 safetensors to a temporary directory. Every row runs in its own subprocess (one torch
thread): the child imports everything first (torch, Transformers, bitsandbytes, peft, the Trainer, hfsqueeze),
records its RSS, runs one command, and reports its peak RSS (``VmHWM``) minus that post-import RSS, divided by the
model's fp32 size, and the command's wall time. Transformers memory-maps safetensors, so mapped weight pages count as
they are touched, exactly as they would for a user.

Rows: stock ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True))``; ``hfsqueeze compress``
with ``--recipe int8``, ``prune-ffn`` (magnitude importance), ``distill-int8`` (2 training steps, LoRA on the int8
base: activation checkpointing is on by default there; again with it off, which saves a second forward per step and
holds the activations); ``tune`` with 5 trials on
the quantize space (Python API, small settings). The evaluation is shrunk for every hfsqueeze row with
``--set`` (see `EVAL_SETTINGS`), which the table caption states.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# size label -> (hidden, intermediate, layers, heads)
SIZES = {
    "50M": (512, 1536, 8, 8),
    "200M": (1024, 2816, 12, 16),
    "800M": (1536, 4096, 26, 24),
}
VOCAB = 49152
EVAL_SETTINGS = {"evaluation.max_tokens": 512, "evaluation.seq_len": 256, "evaluation.latency": "false"}
ROWS = {
    "stock": "stock from_pretrained(load_in_8bit=True)",
    "int8": "compress --recipe int8",
    "prune": "compress --recipe prune-ffn (magnitude)",
    "distill": "compress --recipe distill-int8 (2 steps)",
    "distill-nockpt": "the same, activation_checkpointing off",
    "tune": "tune (5 trials, quantize space)",
}
DEFAULT_ROWS = {"50M": list(ROWS), "200M": list(ROWS), "800M": list(ROWS)}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _sets(extra: dict[str, object] | None = None) -> list[str]:
    out = []
    for key, value in {**EVAL_SETTINGS, **(extra or {})}.items():
        out += ["--set", f"{key}={value}"]
    return out


def _child(row: str, model_dir: str) -> None:
    """Run one row in this (fresh) process and print its measurements as one JSON line."""
    import torch

    torch.set_num_threads(1)
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers
    from transformers import Trainer  # noqa: F401

    import hfsqueeze.api  # noqa: F401
    import hfsqueeze.cli as cli
    import hfsqueeze.tune  # noqa: F401

    transformers.logging.set_verbosity_error()
    base_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    if row == "stock":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
        del model
        rc = 0
    elif row == "tune":
        from hfsqueeze.models import load_model

        model, tok = load_model(model_dir)
        with tempfile.TemporaryDirectory(prefix="bench-scale-tune-") as out:
            # An empty cache: every run pays for the sensitivity pass (the random model is the same in every run).
            os.environ["HFSQUEEZE_CACHE"] = str(Path(out, "cache"))
            hfsqueeze.tune.tune(
                model, tok, budget="size=0.45", trials=5, output=str(Path(out, "t")), seed=0,
                evaluation={"max_tokens": 512, "seq_len": 256, "latency": False},
                settings={"calibration_tokens": 512, "seq_len": 256, "sensitivity_tokens": 128, "latency": False},
                model_path=model_dir,
            )
        rc = 0
    else:
        recipe, extra = {"int8": ("int8", None), "prune": ("prune-ffn", {"prune.importance": "magnitude"}),
                         "distill": ("distill-int8", {"distill.training_args.max_steps": 2,
                                                      "evaluation.text": "builtin"}),
                         "distill-nockpt": ("distill-int8", {"distill.training_args.max_steps": 2,
                                                             "distill.training_args.activation_checkpointing": "false",
                                                           "evaluation.text": "builtin"})}[row]
        rc = cli.main(["compress", "--model", model_dir, "--recipe", recipe, *_sets(extra)])
    wall = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
    print("BENCH " + json.dumps({"row": row, "rc": rc, "wall_s": wall, "base_mib": base_kib / 1024,
                                 "peak_mib": peak_kib / 1024, "extra_mib": (peak_kib - base_kib) / 1024}), flush=True)


def build_model(size: str, root: Path) -> tuple[Path, int]:
    """Save a random Llama of ``size`` (fp32 safetensors) with the SmolLM2 tokenizer; return its dir and bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hfsqueeze.models import default_model_dir

    hidden, inter, layers, heads = SIZES[size]
    path = root / size
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(path)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return path, nbytes


def run_row(row: str, model_dir: Path, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HFSQUEEZE_DISABLE_PROGRESS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", row, "--model-dir", str(model_dir)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"row": row, "rc": proc.returncode, "error": " | ".join(tail)}


def table(results: dict[str, dict[str, dict]], sizes: list[str], rows: list[str]) -> str:
    lines = ["| command | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    for row in rows:
        cells = []
        for size in sizes:
            r = results.get(size, {}).get(row)
            if r is None:
                cells.append("-")
            elif "error" in r or r.get("rc"):
                cells.append("failed")
            else:
                cells.append(f"{r['multiple']:.2f}x, {r['wall_s']:.0f}s")
        lines.append(f"| {ROWS[row]} | " + " | ".join(cells) + " |")
    caption = ("Peak RSS minus the child's RSS after imports, over the fp32 model size; wall time of the command "
               "(1 torch thread). hfsqueeze rows evaluate with " + ", ".join(f"{k}={v}" for k, v in
                                                                           EVAL_SETTINGS.items())
               + " (distill-int8 on `builtin` only); tune: 5 trials, calibration_tokens 512, sensitivity_tokens 128.")
    return "\n".join(lines) + "\n\n" + caption


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50M,200M", help="comma-separated: " + ", ".join(SIZES))
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: a per-size set): "
                        + ", ".join(ROWS))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.model_dir)
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; allowed: {', '.join(SIZES)}")
    wanted = [r.strip() for r in args.rows.split(",")] if args.rows else None
    if wanted and any(r not in ROWS for r in wanted):
        parser.error(f"--rows: got {wanted}; allowed: {', '.join(ROWS)}")
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for size in sizes:
            model_dir, nbytes = build_model(size, Path(tmp))
            results[size] = {}
            for row in wanted or DEFAULT_ROWS[size]:
                r = run_row(row, model_dir, args.timeout)
                if "extra_mib" in r:
                    r["multiple"] = r["extra_mib"] * 2**20 / nbytes
                r["fp32_mib"] = nbytes / 2**20
                results[size][row] = r
                print(f"{size} {row}: {json.dumps(r)}", file=sys.stderr, flush=True)
            import shutil

            shutil.rmtree(model_dir)
    rows = [r for r in ROWS if any(r in results[s] for s in sizes)]
    print(table(results, sizes, rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
