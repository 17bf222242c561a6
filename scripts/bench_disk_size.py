"""Benchmark: measuring weights on disk by writing them (before) against computing their size (after), in one run.

    python scripts/bench_disk_size.py [--size 200M] [--formats fp32,bf16,int8,nf4] [--repeats 3] [--json out.json]

A random Llama built from a config (the sizes of ``scripts/bench_scale.py``: 49,152-token vocabulary, tied
embeddings) is cast or quantized to each format in turn; for each, ``disk_bytes`` as it was (``save_pretrained`` into
a temporary directory, summing the ``*.safetensors`` sizes, kept below as `_disk_bytes_by_writing`) and as it is
(`hfsqueeze.evaluation.measure.disk_bytes`, which computes the sizes) run alternately ``--repeats`` times. Reported:
the median wall time of each, the peak size of the temporary directories (under a private root, polled every 2 ms
while the call runs), the bytes the process wrote (``wchar`` of ``/proc/self/io``) and whether both give the same
number (they must). Writing lands in the page cache first, so the "before" times depend on the disk and its load.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HFSQUEEZE_DISABLE_PROGRESS", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hfsqueeze.compat.bnb import saveable  # noqa: E402
from hfsqueeze.core.stage import save_weights  # noqa: E402
from hfsqueeze.evaluation.measure import disk_bytes  # noqa: E402
from hfsqueeze.methods.quantize import QuantizeConfig, apply_quantize  # noqa: E402
from hfsqueeze.registry import stages  # noqa: E402

# size label -> (hidden, intermediate, layers, heads), as in scripts/bench_scale.py
SIZES = {"50M": (512, 1536, 8, 8), "200M": (1024, 2816, 12, 16), "800M": (1536, 4096, 26, 24)}
VOCAB = 49152
FORMATS = {"fp32": None, "bf16": {"bits": 16, "dtype": "bf16"}, "int8": {"bits": 8}, "nf4": {"bits": 4}}
PREFIX = "hfsqueeze-size-"


def _disk_bytes_by_writing(model) -> int:
    """``disk_bytes`` before this change: write the weights to a temporary directory and sum the files."""
    with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp, saveable(model):
        save_weights(model, tmp, stages())
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("wchar not in /proc/self/io")


def _temp_usage() -> int:
    total = 0
    for d in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        for f in d.rglob("*"):
            try:
                total += f.stat().st_size if f.is_file() else 0
            except FileNotFoundError:  # the directory is being removed
                pass
    return total


def timed(fn, model) -> dict:
    """Run ``fn(model)``; its result, wall time, peak temporary-directory bytes and bytes written."""
    peak, done = [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _temp_usage())
            time.sleep(0.002)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    written = _wchar()
    start = time.perf_counter()
    try:
        value = fn(model)
    finally:
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
    return {"bytes": value, "wall_s": wall, "peak_temp": peak[0], "written": _wchar() - written}


def build(size: str) -> LlamaForCausalLM:
    hidden, inter, layers, heads = SIZES[size]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="200M", choices=list(SIZES))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    # A private temporary root: other processes' hfsqueeze-size-* directories must not count.
    tempfile.tempdir = tempfile.mkdtemp(prefix="bench-disk-size-")
    fp32 = build(args.size)
    params = sum(p.numel() for p in fp32.parameters())
    print(f"random Llama {args.size}: {params / 1e6:.0f}M parameters, {torch.get_num_threads()} torch threads, "
          f"temporary directory {tempfile.gettempdir()}\n")
    print("| format | weights on disk | before: time | before: peak temp | before: written | after: time "
          "| after: peak temp | after: written | same bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.formats.split(","):
        model = fp32 if FORMATS[name] is None else copy.deepcopy(fp32)
        if FORMATS[name] is not None:
            apply_quantize(model, QuantizeConfig(**FORMATS[name]))
        runs = {"before": [], "after": []}
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            runs["before"].append(timed(_disk_bytes_by_writing, model))
            runs["after"].append(timed(lambda m: disk_bytes(m, stages()), model))
        row = {"format": name, "size": args.size, "parameters": params}
        for key, rs in runs.items():
            row[key] = {"bytes": rs[0]["bytes"], "wall_s": statistics.median(r["wall_s"] for r in rs),
                        "peak_temp": max(r["peak_temp"] for r in rs), "written": max(r["written"] for r in rs)}
        row["same"] = all(r["bytes"] == row["before"]["bytes"] for rs in runs.values() for r in rs)
        rows.append(row)
        b, a = row["before"], row["after"]
        print(f"| {name} | {b['bytes'] / 2**20:,.1f} MiB | {b['wall_s']:.2f} s | {b['peak_temp'] / 2**20:,.1f} MiB "
              f"| {b['written'] / 2**20:,.1f} MiB | {a['wall_s']:.2f} s | {a['peak_temp'] / 2**10:,.1f} KiB "
              f"| {a['written'] / 2**10:,.1f} KiB | {'yes' if row['same'] else 'NO'} |", flush=True)
        if model is not fp32:
            del model
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    os.rmdir(tempfile.tempdir)


if __name__ == "__main__":
    main()
