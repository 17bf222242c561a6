"""Benchmark: every quantization format on the real SmolLM2-135M-Instruct, side by side in one run.

    python scripts/bench_quantize.py [--max-tokens 4096] [--repeats 5] [--json out.json]

One fp32 reference (outputs on the held-out built-in text) is recorded once; each format then starts from a fresh
copy of the fp32 weights, is quantized in place, and is measured against that reference with the same prompt,
threads and repeats. Ratios are relative to fp32 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

os.environ.setdefault("HFSQUEEZE_DISABLE_PROGRESS", "1")

from hfsqueeze.evaluation.measure import measure, measure_baseline  # noqa: E402
from hfsqueeze.methods.quantize import QuantizeConfig, apply_quantize  # noqa: E402
from hfsqueeze.models import load_model  # noqa: E402
from hfsqueeze.recipe import EvaluationConfig  # noqa: E402

FORMATS = [
    ("fp32", None),
    ("bf16", {"bits": 16, "dtype": "bf16"}),
    ("fp16", {"bits": 16, "dtype": "fp16"}),
    ("int8", {"bits": 8}),
    ("nf4", {"bits": 4, "quant_type": "nf4"}),
    ("nf4-dq", {"bits": 4, "quant_type": "nf4", "double_quant": True}),
    ("fp4", {"bits": 4, "quant_type": "fp4"}),
]


def int8_analytic_minimum(model_fp32) -> int:
    """Bytes of an ideal int8 checkpoint of what the stage quantizes: 1 byte per quantized weight plus one fp32
    scale per output row, and every other tensor at its stored width (the tied embedding once)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    cfg = QuantizeConfig(bits=8)
    total, seen = 0, set()
    for name, module in model_fp32.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            quantized = (type(module) is torch.nn.Linear and pname == "weight"
                         and should_convert_module(name, cfg.skip_modules))
            total += p.numel() + 4 * p.shape[0] if quantized else p.numel() * p.element_size()
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    evaluation = EvaluationConfig(max_tokens=args.max_tokens, seq_len=512, repeats=args.repeats)

    t0 = time.time()
    base, tok = load_model(None)
    minimum = int8_analytic_minimum(base)
    _, reference = measure_baseline(base, tok, evaluation)
    del base
    rows = []
    for label, stage in FORMATS:
        model, _ = load_model(None)
        if stage is not None:
            apply_quantize(model, QuantizeConfig(**stage))
        # fp32 is measured again like every other row (same code path, same moment of the run).
        m = measure(model, tok, evaluation, reference)
        rows.append({"format": label, **m.to_dict()})
        del model
        print(f"  measured {label} ({time.time() - t0:.0f}s)", file=sys.stderr)

    ref = rows[0]
    print(f"\nSmolLM2-135M-Instruct, {reference.inputs.numel()} held-out tokens, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} latency runs\n")
    head = ("format", "disk MiB", "disk x", "mem MiB", "ppl", "ppl delta", "KL", "top-1", "prefill x", "decode x")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join([
            r["format"], f"{r['disk_bytes'] / 2**20:.1f}", f"{r['disk_bytes'] / ref['disk_bytes']:.3f}",
            f"{r['footprint_bytes'] / 2**20:.1f}", f"{r['perplexity']:.3f}",
            f"{(r['perplexity'] / ref['perplexity'] - 1):+.2%}", f"{r['kl_divergence']:.4f}",
            f"{r['top1_agreement']:.2%}", f"{r['prefill_ms_per_token'] / ref['prefill_ms_per_token']:.2f}",
            f"{r['decode_ms_per_token'] / ref['decode_ms_per_token']:.2f}",
        ]) + " |")
    int8 = next(r for r in rows if r["format"] == "int8")
    print(f"\nint8 on disk {int8['disk_bytes']:,} B vs analytic minimum {minimum:,} B "
          f"(+{int8['disk_bytes'] / minimum - 1:.2%}; the gap is safetensors headers and bnb's per-tensor format tag)")
    print(f"fp32 absolute: prefill {ref['prefill_ms_per_token']:.3f} ms/token, decode "
          f"{ref['decode_ms_per_token']:.2f} ms/token; total {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "int8_analytic_minimum": minimum}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
