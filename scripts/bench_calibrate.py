"""Benchmark: round-to-nearest vs calibrated bitsandbytes quantization, every model saved and reloaded stock.

    OMP_NUM_THREADS=2 python scripts/bench_calibrate.py [--model smollm2|gemma3|minilm] [--max-tokens 2048]
        [--only nf4,int8] [--methods rtn,gptq] [--set tokens=8192] [--peers quanto,hqq] [--json out.json]

For each format (nf4, nf4-dq, fp4, int8; every Linear but lm_head quantized, everything else in bf16, so a format's
rows have equal size) the model starts from a fresh copy of the fp32 weights, is quantized by the quantize stage
(round-to-nearest = bitsandbytes' own; calibrated = GPTQ onto bnb's grid and/or folded SmoothQuant scales, calibrated
on the stage's default text: ``builtin:generated`` and the built-in pydoc text, their *train* splits), saved with
``save_pretrained`` and reloaded with plain ``AutoModelForCausalLM.from_pretrained`` (bnb's exact 4-bit CPU kernel
pinned, as the card's code does). The reloaded model is scored against the fp32 model on the held-out built-in split
and on ``builtin:bible`` (never calibrated on): perplexity change, token KL(fp32 || quantized), top-1 agreement.
all-MiniLM-L6-v2 (``--model minilm``, an fp32 sentence encoder; no SmoothQuant: BERT's norms feed a residual) is
scored by the cosine of each 128-token block's mean-pooled embedding to the fp32 model's (give it ``--max-tokens
8192`` or so: one embedding per block).
Calibration wall time and the peak resident memory while quantizing (over the model's own size as it entered the
stage) are measured around the stage alone.

``--peers quanto,hqq`` adds optimum-quanto's qint4 and HQQ's 4-bit on the same Linears of the same bf16 model
(scored in memory, in their own formats; ``pip install optimum-quanto hqq``, not hfsqueeze dependencies).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HFSQUEEZE_DISABLE_PROGRESS", "1")

from hfsqueeze.compat.bnb import guard_bnb_cpu_repack, saveable  # noqa: E402
from hfsqueeze.core.context import CompressionContext  # noqa: E402
from hfsqueeze.core.data import load_texts, token_blocks  # noqa: E402
from hfsqueeze.core.memory import return_freed_memory  # noqa: E402
from hfsqueeze.methods.quantize import QuantizeConfig  # noqa: E402
from hfsqueeze.methods.quantize.stage import QuantizeStage  # noqa: E402
from hfsqueeze.core.quality import cosine, pooled_embeddings  # noqa: E402
from hfsqueeze.models import gemma3_dir, load_model, minilm_dir  # noqa: E402

FORMATS = {
    "nf4": {"bits": 4, "quant_type": "nf4"},
    "nf4-dq": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "fp4": {"bits": 4, "quant_type": "fp4"},
    "int8": {"bits": 8, "threshold": 6.0},
}
# (format, method label, extra stage keys); calibration text: the stage's default (generated + pydoc train splits,
# never evaluated on).
VARIANTS = [
    ("nf4", "rtn", {}), ("nf4", "gptq", {"calibration": "gptq"}),
    ("int8", "rtn", {}), ("int8", "gptq", {"calibration": "gptq"}), ("int8", "smooth", {"smooth": True}),
    ("int8", "gptq+smooth", {"calibration": "gptq", "smooth": True}),
    ("int8", "smooth auto", {"smooth": True, "alpha": "auto"}),
    ("int8", "gptq+smooth auto", {"calibration": "gptq", "smooth": True, "alpha": "auto"}),
    ("nf4-dq", "rtn", {}), ("nf4-dq", "gptq", {"calibration": "gptq"}),
    ("fp4", "rtn", {}), ("fp4", "gptq", {"calibration": "gptq"}),
    ("nf4", "gptq+smooth", {"calibration": "gptq", "smooth": True}),
]
TEXTS = {"held-out": "builtin", "bible": "builtin:bible"}
# An encoder (``--model minilm``) is scored on blocks of this many tokens, one embedding per block.
ENCODER_SEQ_LEN = 128


class PeakRSS:
    """Peak resident memory of this process while the context is open (sampled every 20 ms)."""

    def __enter__(self):
        self.start_rss = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _reference(reference, blocks, encoder: bool) -> list[torch.Tensor] | torch.Tensor:
    """The fp32 model's log-probabilities on each block, computed once (an encoder: its mean-pooled embeddings)."""
    if encoder:
        return pooled_embeddings(reference, blocks)
    with torch.no_grad():
        return [torch.log_softmax(reference(input_ids=blocks[i:i + 1]).logits.float()[0], -1)
                for i in range(blocks.shape[0])]


def _scores(model, ref_logprobs, blocks) -> dict[str, float]:
    """Perplexity of ``model``, KL(fp32 || model) per token and top-1 agreement on ``blocks`` (one at a time); an
    encoder: the cosine of its mean-pooled embedding of each block to the fp32 model's (mean and worst)."""
    if isinstance(ref_logprobs, torch.Tensor):
        cos = cosine(ref_logprobs, pooled_embeddings(model, blocks))
        return {"cos": float(cos.mean()), "cos_min": float(cos.min())}
    nll = kl = agree = n = 0.0
    with torch.no_grad():
        for i in range(blocks.shape[0]):
            ids, ref = blocks[i:i + 1], ref_logprobs[i]
            out = torch.log_softmax(model(input_ids=ids).logits.float()[0], -1)
            nll += float(-out[:-1].gather(1, ids[0, 1:, None]).sum())
            kl += float((ref.exp() * (ref - out)).sum())
            agree += float((ref.argmax(-1) == out.argmax(-1)).sum())
            n += ids.shape[1]
    tokens = blocks.numel() - blocks.shape[0]
    return {"ppl": math.exp(nll / tokens), "kl": kl / n, "top1": agree / n}


def _model_class(name: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if name == "minilm" else AutoModelForCausalLM


def _load(name: str):
    from transformers import AutoTokenizer

    if name == "smollm2":
        return load_model(None)
    if name == "minilm":
        return _model_class(name).from_pretrained(minilm_dir()).eval(), AutoTokenizer.from_pretrained(minilm_dir())
    path = gemma3_dir() if name == "gemma3" else name  # or any local model directory (a quick check of this script)
    return _model_class(name).from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _key_value(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _run_variant(args, fmt, extra, tok, reference, blocks, workdir: Path) -> dict:
    model, _ = _load(args.model)
    stage = QuantizeStage()
    stage.apply(model, QuantizeConfig(bits=16, dtype="bf16"), CompressionContext(tokenizer=tok))
    if extra:  # calibrated variants only (round-to-nearest reads no text)
        extra = {**extra, **dict(_key_value(kv) for kv in args.set)}
    config = QuantizeConfig(**FORMATS[fmt], **extra)
    size_before = _bytes(model)
    gc.collect()
    with PeakRSS() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        details = stage.apply(model, config, CompressionContext(tokenizer=tok, calibration="builtin"))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    out = workdir / f"{fmt}-{'-'.join(map(str, extra.values())) or 'rtn'}"
    with saveable(model):
        model.save_pretrained(out)
    disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    del model
    gc.collect()
    reloaded = guard_bnb_cpu_repack(_model_class(args.model).from_pretrained(out).eval())
    scores = {label: _scores(reloaded, reference[label], b) for label, b in blocks.items()}
    del reloaded
    calibration = details.get("calibration", {})
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_extra_bytes": peak.peak - peak.start_rss,
            "model_bytes": size_before,
            "disk_bytes": disk, "scores": scores, "kept_rtn": len(calibration.get("kept_rtn", [])),
            "kept_rtn_layers": len(calibration.get("kept_rtn_layers", [])),
            "tokens": calibration.get("tokens")}


# Peers at about the same bits per weight, where they install on this stack (`pip install optimum-quanto hqq`), each
# on the same Linears (all but lm_head) of the bf16 model, scored in memory (their own formats, not bnb checkpoints).
# llm-compressor 0.14 needs an older Transformers and GPTQModel a CUDA torch >= 2.14: not run here.
PEERS = {"quanto": "optimum-quanto qint4 (group 128, ~4.25 bits/weight)",
         "hqq": "HQQ 4-bit (group 64, ~4.5 bits/weight)"}


def _run_peer(args, peer: str, tok, reference, blocks) -> dict:
    from torch import nn

    model, _ = _load(args.model)
    QuantizeStage().apply(model, QuantizeConfig(bits=16, dtype="bf16"), CompressionContext(tokenizer=tok))
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    size_before = _bytes(model)
    gc.collect()
    with PeakRSS() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        if peer == "quanto":
            from optimum.quanto import freeze, qint4, quantize

            quantize(model, weights=qint4, exclude=["lm_head"])
            freeze(model)
        else:
            from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

            config = BaseQuantizeConfig(nbits=4, group_size=64)
            for name, module in targets:
                model.set_submodule(name, HQQLinear(module, quant_config=config, compute_dtype=torch.bfloat16,
                                                    device="cpu", del_orig=True))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    scores = {label: _scores(model.eval(), reference[label], b) for label, b in blocks.items()}
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_extra_bytes": peak.peak - peak.start_rss,
            "model_bytes": size_before, "disk_bytes": None, "scores": scores, "kept_rtn": "-",
            "kept_rtn_layers": "-"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3, minilm (an encoder: scored by the "
                        "cosine of mean-pooled embeddings) or a local causal-LM directory")
    parser.add_argument("--max-tokens", type=int, default=1024, help="evaluation tokens per text")
    parser.add_argument("--only", default=None, help="comma-separated formats to run (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated methods to run (rtn, gptq, smooth, "
                        "smooth auto...; default: all)")
    parser.add_argument("--peers", default="", help=f"comma-separated peers to run too: {', '.join(PEERS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a quantize-stage key for every calibrated variant (tokens=16384, damp=0.1), repeatable")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    if any(p not in PEERS for p in peers):
        parser.error(f"--peers: got {args.peers!r}; allowed: {', '.join(PEERS)}")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return_freed_memory()  # as `compress` does: freed activations go back to the system (see `core.memory`)
    t0 = time.time()
    reference, tok = _load(args.model)
    seq_len = ENCODER_SEQ_LEN if args.model == "minilm" else 512
    blocks = {label: token_blocks(tok, load_texts(src, split="eval"), max_tokens=args.max_tokens, seq_len=seq_len)
              for label, src in TEXTS.items()}
    fp32_disk = sum(p.numel() * p.element_size() for p in {id(p): p for p in reference.parameters()}.values())
    ref_logprobs = {label: _reference(reference, b, args.model == "minilm") for label, b in blocks.items()}
    base = {label: _scores(reference, ref_logprobs[label], b) for label, b in blocks.items()}
    del reference
    rows = []
    only = set(args.only.split(",")) if args.only else set(FORMATS)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, method, extra in VARIANTS:
            if fmt not in only or (args.methods and method not in args.methods.split(",")):
                continue
            row = {"format": fmt, "method": method, **_run_variant(args, fmt, extra, tok, ref_logprobs, blocks,
                                                                     Path(tmp))}
            rows.append(row)
            print(f"  {fmt} {method}: {row['seconds']:.0f}s ({time.time() - t0:.0f}s total) {row['scores']}",
                  file=sys.stderr, flush=True)
            if args.json:  # after every row: a long run stopped early keeps what it measured
                Path(args.json).write_text(json.dumps({"baseline": base, "rows": rows}, indent=2))
        for peer in peers:
            rows.append({"format": "4-bit", "method": PEERS[peer],
                         **_run_peer(args, peer, tok, ref_logprobs, blocks)})
            print(f"  {peer}: {rows[-1]['scores']}", file=sys.stderr, flush=True)
    print(_table(args, base, rows, blocks, fp32_disk))
    print(f"\ntotal {time.time() - t0:.0f}s")
    return 0


def _table(args, base, rows, blocks, fp32_disk) -> str:
    encoder = args.model == "minilm"
    what = ("cosine of mean-pooled embeddings to fp32's" if encoder else
            f"fp32 ppl held-out {base['held-out']['ppl']:.3f}, bible {base['bible']['ppl']:.3f}")
    lines = [f"\n{args.model}: {what}; {blocks['held-out'].numel()} / {blocks['bible'].numel()} tokens; "
             f"{torch.get_num_threads()} threads; every bnb row saved and reloaded with plain from_pretrained "
             "(peer rows: scored in memory, their own formats)\n"]
    metrics = ("cos mean", "cos min") if encoder else ("ppl", "KL", "top-1")
    head = ("format", "method", "disk x fp32", *[f"{label} {m}" for label in TEXTS for m in metrics], "calib s",
            "calib CPU s", "peak mem x model", "kept RTN modules / layers")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["format"], r["method"], f"{r['disk_bytes'] / fp32_disk:.3f}" if r["disk_bytes"] else "n/a"]
        for label in TEXTS:
            s = r["scores"][label]
            cells += ([f"{s['cos']:.5f}", f"{s['cos_min']:.5f}"] if encoder else
                      [f"{s['ppl'] / base[label]['ppl'] - 1:+.2%}", f"{s['kl']:.4f}", f"{s['top1']:.2%}"])
        peak = (r["model_bytes"] + max(r["peak_extra_bytes"], 0)) / r["model_bytes"]
        cells += [f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.0f}", f"{peak:.2f}",
                  f"{r['kept_rtn']} / {r['kept_rtn_layers']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
