"""Benchmark structured pruning on the real SmolLM2-135M-Instruct and all-MiniLM-L6-v2, on CPU.

For each model, every importance score is computed once on the unpruned model, then the model is pruned at each
ratio and scope from those scores (exactly what a one-step ``prune`` stage does) and measured:

- parameters, and the prefill latency ratio to the unpruned model next to the ratio of forward FLOPs left
  (linear layers plus attention scores, computed from the pruned shapes);
- SmolLM2: perplexity and KL divergence to the unpruned model on held-out text (``pydoc_data.topics``, eval split);
- MiniLM: the mean cosine between the pruned and the unpruned sentence embeddings (mean pooling).

Usage::

    python scripts/bench_prune.py                  # ~12 minutes with 2 idle cores (~7 with --threads 1 when busy)
    python scripts/bench_prune.py --quick          # fewer tokens and ratios
    python scripts/bench_prune.py --json out.json --scores-cache /tmp/prune-scores
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hfsqueeze.core.context import CompressionContext  # noqa: E402
from hfsqueeze.core.data import builtin_text, token_blocks  # noqa: E402
from hfsqueeze.methods.prune import PruneConfig, PruneWarning, apply_prune  # noqa: E402
from hfsqueeze.methods.prune.apply import calibration_blocks  # noqa: E402
from hfsqueeze.methods.prune.importance import (  # noqa: E402
    Scores,
    activation_scores,
    gradient_scores,
    head_units,
    kl_scores,
    magnitude_scores,
)
from hfsqueeze.methods.prune.surgery import (  # noqa: E402
    attention_shape,
    family_of,
    in_features,
    is_conv1d,
    layer_list,
    out_features,
)

IMPORTANCES = ["gradient", "activation", "magnitude", "kl"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def forward_flops(model, seq_len: int, causal: bool) -> float:
    """Forward FLOPs for one sequence: 2 x every Linear/Conv1D weight x tokens, plus QK^T and AV per head."""
    linear = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or is_conv1d(module):
            linear += in_features(module) * out_features(module)
    family = family_of(model.config)
    attention = 0.0
    pairs = seq_len * (seq_len + 1) / 2 if causal else seq_len * seq_len
    for layer in layer_list(family, model):
        n_q, _, head_dim = attention_shape(family, layer)
        attention += 2 * 2 * pairs * head_dim * n_q
    return 2.0 * linear * seq_len + attention


def latency_ratio(base, pruned, ids: torch.Tensor, repeats: int) -> float:
    """Prefill time of ``pruned`` over ``base``: timed alternately, fastest of each (the CPU is shared)."""
    kwargs = {"use_cache": False} if family_of(base.config) != "bert" else {}
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.no_grad():
        for model in (base, pruned):
            model(input_ids=ids, **kwargs)  # warm-up
        for _ in range(repeats):
            for key, model in enumerate((base, pruned)):
                start = time.perf_counter()
                model(input_ids=ids, **kwargs)
                times[key].append(time.perf_counter() - start)
    return min(times[1]) / min(times[0])


# ---- quality --------------------------------------------------------------------------------------------------------
class LMQuality:
    """Perplexity and KL to the unpruned model on fixed held-out blocks."""

    def __init__(self, model, tokenizer, tokens: int, seq_len: int = 512):
        self.blocks = token_blocks(tokenizer, [builtin_text("eval")], max_tokens=tokens, seq_len=seq_len)
        with torch.no_grad():
            self.reference = [model(input_ids=b[None]).logits[0].float().log_softmax(-1) for b in self.blocks]

    def __call__(self, model) -> dict[str, float]:
        nll, kl, n = 0.0, 0.0, 0
        with torch.no_grad():
            for block, ref in zip(self.blocks, self.reference):
                logp = model(input_ids=block[None]).logits[0].float().log_softmax(-1)
                nll += float(-logp[:-1].gather(1, block[1:, None]).sum())
                kl += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
                n += block.numel()
        return {"ppl": math.exp(nll / (n - len(self.blocks))), "kl": kl / n}


class EmbeddingQuality:
    """Mean cosine between sentence embeddings (mean pooling) of the pruned and the unpruned encoder."""

    def __init__(self, model, tokenizer, tokens: int, max_len: int = 128, batch: int = 32):
        paragraphs = [p.strip() for p in builtin_text("eval").split("\n\n") if len(p.strip()) > 40]
        self.batches, total = [], 0
        for start in range(0, len(paragraphs), batch):
            enc = tokenizer(paragraphs[start:start + batch], truncation=True, max_length=max_len, padding=True,
                            return_tensors="pt")
            self.batches.append(enc)
            total += int(enc["attention_mask"].sum())
            if total >= tokens:
                break
        self.tokens = total
        self.reference = self.embed(model)

    def embed(self, model) -> list[torch.Tensor]:
        out = []
        with torch.no_grad():
            for enc in self.batches:
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"][..., None].to(hidden.dtype)
                out.append((hidden * mask).sum(1) / mask.sum(1))
        return out

    def __call__(self, model) -> dict[str, float]:
        cos = [F.cosine_similarity(a, b, dim=-1) for a, b in zip(self.embed(model), self.reference)]
        return {"cosine": float(torch.cat(cos).mean())}


# ---- the sweep ------------------------------------------------------------------------------------------------------
def all_scores(family, model, ctx, calib_tokens: int, kl_tokens: int, causal: bool) -> dict[str, Scores]:
    config = PruneConfig(heads=0.1, seq_len=None)
    blocks = calibration_blocks(model, config, ctx, calib_tokens)
    kl_blocks = calibration_blocks(model, config, ctx, kl_tokens)
    units = [head_units(*attention_shape(family, layer)[:2], "groups") for layer in layer_list(family, model)]
    scores, seconds = {}, {}
    for name in IMPORTANCES:
        start = time.perf_counter()
        if name == "gradient":
            scores[name] = gradient_scores(family, model, blocks, units, layers=False)
        elif name == "activation":
            scores[name] = activation_scores(family, model, blocks, units, layers=False)
        elif name == "magnitude":
            scores[name] = magnitude_scores(family, model, units)
        else:
            kl, _ = kl_scores(family, model, kl_blocks, units, layers=False)
            scores[name] = Scores(heads=kl.heads, ffn=scores["gradient"].ffn)  # as the stage does
        seconds[name] = time.perf_counter() - start
        log(f"  {name} scores: {seconds[name]:.1f}s ({blocks.numel() if name != 'kl' else kl_blocks.numel()} "
            f"calibration tokens)")
    return scores


def sweep(name, model, tokenizer, quality, args, causal: bool) -> list[dict]:
    family = family_of(model.config)
    ctx = CompressionContext(tokenizer=tokenizer)
    cache = (args.scores_cache / f"{name}-{args.calibration_tokens}-{args.kl_tokens}.pt"
             if args.scores_cache else None)
    if cache is not None and cache.is_file():
        scores = torch.load(cache, weights_only=False)
        log(f"{name}: scores from {cache}")
    else:
        log(f"{name}: scoring")
        scores = all_scores(family, model, ctx, args.calibration_tokens, args.kl_tokens, causal)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(scores, cache)
    latency_ids = (torch.randint(1000, 20000, (1, args.prompt_tokens)) if causal
                   else torch.randint(1000, 20000, (args.encoder_batch, 128)))
    seq = latency_ids.shape[1]
    base_flops = forward_flops(model, seq, causal)
    base_params = sum(p.numel() for p in model.parameters())
    rows = [{"model": name, "target": "none", "scope": "", "importance": "", "params": base_params,
             "heads": sum(attention_shape(family, l)[0] for l in layer_list(family, model)),
             "flops_ratio": 1.0, "latency_ratio": 1.0, **quality(model)}]
    log(f"{name}: baseline {rows[0]}")
    grid = [("heads", f) for f in args.head_ratios] + [("ffn", f) for f in args.ffn_ratios]
    seen: dict[str, dict] = {}
    for what, fraction in grid:
        for scope in ("global", "layerwise"):
            for importance in IMPORTANCES:
                pruned = copy.deepcopy(model)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", PruneWarning)
                    details = apply_prune(pruned, PruneConfig(**{what: fraction}, scope=scope, importance=importance),
                                          ctx, scores=scores[importance])
                key = json.dumps([details["heads_removed_per_layer"], details["ffn_width_per_layer"], importance])
                if details["parameters_removed"] == 0:  # layerwise rounding removed nothing
                    measured = {k: rows[0][k] for k in rows[0] if k not in ("model", "target", "scope",
                                                                            "importance", "params", "heads")}
                elif key in seen:  # the same units removed (layerwise rounding): the same model
                    measured = seen[key]
                else:
                    measured = {
                        "flops_ratio": forward_flops(pruned, seq, causal) / base_flops,
                        "latency_ratio": latency_ratio(model, pruned, latency_ids, args.repeats),
                        **quality(pruned),
                    }
                    seen[key] = measured
                row = {"model": name, "target": f"{what} {fraction:.0%}", "scope": scope, "importance": importance,
                       "params": details["parameters_after"], "heads": details["heads_after"], **measured}
                rows.append(row)
                log(f"{name}: {row}")
                del pruned
    return rows


def table(rows: list[dict], causal: bool) -> str:
    quality = ["ppl", "KL (nats/token)"] if causal else ["embedding cosine"]
    head = ["target", "scope", "importance", "params (M)", "heads", "FLOPs left", "prefill latency", *quality]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        q = [f"{r['ppl']:.2f}", f"{r['kl']:.4f}"] if causal else [f"{r['cosine']:.4f}"]
        lines.append("| " + " | ".join([
            r["target"], r["scope"] or "-", r["importance"] or "-", f"{r['params'] / 1e6:.2f}", str(r["heads"]),
            f"{r['flops_ratio']:.3f}", f"{r['latency_ratio']:.3f}", *q,
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, ratios and repeats")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--only", choices=["smollm2", "minilm"], help="run one model only")
    parser.add_argument("--eval-tokens", type=int, help="held-out tokens for quality (default 2048; quick 1024)")
    parser.add_argument("--calibration-tokens", type=int,
                        help="calibration tokens for gradient/activation scores (default 4096; quick 2048)")
    parser.add_argument("--kl-tokens", type=int, help="calibration tokens for the kl score (default 512; quick 256)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 behaves better on a busy machine)")
    parser.add_argument("--scores-cache", type=Path, help="directory to keep the importance scores in, so a rerun "
                        "with the same token counts skips scoring")
    args = parser.parse_args()
    args.eval_tokens = args.eval_tokens or (1024 if args.quick else 2048)
    args.calibration_tokens = args.calibration_tokens or (2048 if args.quick else 4096)
    args.kl_tokens = args.kl_tokens or (256 if args.quick else 512)
    args.repeats = 2 if args.quick else 3
    args.prompt_tokens = 128
    args.encoder_batch = 16
    args.head_ratios = [0.25, 0.5] if args.quick else [0.1, 0.25, 0.4, 0.5]
    args.ffn_ratios = [0.25] if args.quick else [0.25, 0.5]
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.perf_counter()
    results, tables = [], []

    if args.only in (None, "smollm2"):
        from hfsqueeze.models import default_model_dir, load_model

        model, tok = load_model(default_model_dir())
        model.set_attn_implementation("sdpa")
        quality = LMQuality(model, tok, args.eval_tokens)
        rows = sweep("SmolLM2-135M", model, tok, quality, args, causal=True)
        results += rows
        tables.append(f"### SmolLM2-135M-Instruct ({quality.blocks.numel()} eval tokens, prefill of "
                      f"{args.prompt_tokens} tokens)\n\n" + table(rows, causal=True))
        del model

    if args.only in (None, "minilm"):
        from transformers import AutoModel, AutoTokenizer

        from hfsqueeze.models import minilm_dir

        path = minilm_dir()
        model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
        quality = EmbeddingQuality(model, tok, args.eval_tokens)
        rows = sweep("all-MiniLM-L6-v2", model, tok, quality, args, causal=False)
        results += rows
        tables.append(f"### all-MiniLM-L6-v2 ({quality.tokens} eval tokens, prefill of {args.encoder_batch} x 128 "
                      "tokens)\n\n" + table(rows, causal=False))

    print(f"\nPruning benchmark ({'quick' if args.quick else 'full'}; {torch.get_num_threads()} threads; "
          f"{args.calibration_tokens} calibration tokens, {args.kl_tokens} for kl; {args.repeats} latency repeats; "
          f"{time.perf_counter() - started:.0f}s)\n")
    print("FLOPs left and prefill latency are ratios to the unpruned model.\n")
    print("\n\n".join(tables))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
