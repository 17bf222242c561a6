"""Recovery benchmark (issue 11): does recovery survive the save, and does it help on text it never trained on?

Every row compresses a fresh copy of the model with hfsqueeze, saves it with `save_compressed`, reloads it with
`load_compressed` (the parity gate) and scores the *reloaded* model against the original on two texts: the held-out
split of the built-in text (pydoc, the text recovery trains on) and ``builtin:bible`` (World English Bible excerpts,
never trained on). Causal LMs: perplexity and KL(original || model) per token; the sentence-embedding model: mean
cosine of mean-pooled embeddings.

    python scripts/bench_recover.py                        # every row (~1 h on a busy 2-core CPU)
    python scripts/bench_recover.py --rows nf4 nf4+recover # some rows

Targets: nf4+recover KL on bible <= 0.8x nf4's; int8+recover not worse than int8 on any text; prune+recover closes
>= 50% of the perplexity gap on bible; MiniLM 50% heads + recover: cosine >= 0.95 on bible. The ``*-plain`` rows are
the recipes' pruning without ``reconstruct`` (the plain cut), the ``prune`` rows with it, both without training.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HFSQUEEZE_DISABLE_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROWS = ["nf4", "nf4+recover", "int8", "int8+recover", "prune-plain", "prune", "prune+recover", "minilm-prune-plain",
        "minilm-prune", "minilm-prune+recover"]
TEXTS = {"pydoc (in-domain)": "builtin", "bible (out-of-domain)": "builtin:bible"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS)
    p.add_argument("--eval-tokens", type=int, default=2048, help="tokens scored per text")
    p.add_argument("--steps", type=int, default=None, help="override the recipes' recovery steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_out/recover")
    return p.parse_args()


def recipes(steps: int | None) -> dict[str, dict]:
    from hfsqueeze.recipe import Recipe

    def load(name: str) -> dict:
        data = Recipe.load(name).to_dict()
        if steps is not None:
            for stage in data["stages"]:
                if stage["method"] == "distill":
                    stage["training_args"]["max_steps"] = steps
            if isinstance(data.get("recover"), dict):
                data["recover"].setdefault("training_args", {})["max_steps"] = steps
        # Keep the recipe's evaluation texts: the distill stage scores them, and its guard acts on them.
        data["evaluation"] = {**data.get("evaluation", {}), "latency": False, "disk_size": False}
        return data

    def without_recovery(data: dict) -> dict:
        # The same pruning as the recovery recipe (same calibration text), with no recovery stage: the "before" row.
        data = copy.deepcopy(data)
        data.pop("recover", None)
        data["stages"] = [{k: v for k, v in stage.items() if k != "recover"} for stage in data["stages"]
                          if stage["method"] != "distill"]
        return data

    def plain_cut(data: dict) -> dict:
        # The same pruning without the least-squares reconstruction: what training-free compensation adds.
        data = without_recovery(data)
        data["stages"] = [{**stage, "reconstruct": False} if stage["method"] == "prune" else stage
                          for stage in data["stages"]]
        return data

    recover_int8 = load("distill-int8")
    return {
        "nf4": {"stages": [{"method": "quantize", "bits": 4, "quant_type": "nf4", "double_quant": True}]},
        "nf4+recover": load("distill-nf4-qlora"),
        "int8": {"stages": [{"method": "quantize", "bits": 8}]},
        "int8+recover": recover_int8,
        "prune-plain": plain_cut(load("distill-prune-recover")),
        "prune": without_recovery(load("distill-prune-recover")),
        "prune+recover": load("distill-prune-recover"),
        "minilm-prune-plain": plain_cut(load("prune-recover-minilm")),
        "minilm-prune": without_recovery(load("prune-recover-minilm")),
        "minilm-prune+recover": load("prune-recover-minilm"),
    }


def score_lm(model, refs) -> dict:
    import torch
    import torch.nn.functional as F

    out = {}
    with torch.no_grad():
        for name, (blocks, ref) in refs.items():
            nll = count = kl = 0.0
            for block, r in zip(blocks, ref):
                r = r.float()
                lp = F.log_softmax(model(input_ids=block.unsqueeze(0)).logits[0].float(), -1)
                nll -= lp[:-1].gather(-1, block[1:, None]).sum().item()
                count += len(block) - 1
                kl += (r.exp() * (r - lp)).sum().item()
            out[name] = {"ppl": math.exp(nll / count), "kl": kl / blocks.numel()}
    return out


def score_encoder(model, refs) -> dict:
    import torch
    import torch.nn.functional as F

    out = {}
    with torch.no_grad():
        for name, (ids, mask, ref) in refs.items():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out[name] = {"cosine": F.cosine_similarity(pooled, ref, dim=-1).mean().item()}
    return out


def references(model, tok, args, encoder: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from hfsqueeze.core.data import load_texts, token_blocks

    refs = {}
    with torch.no_grad():
        for label, source in TEXTS.items():
            texts = load_texts(source, split="eval")
            if encoder:
                paragraphs = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 20]
                chunks = [" ".join(p.split()) for p in paragraphs][:96]
                enc = tok(chunks, truncation=True, max_length=128, padding=True, return_tensors="pt")
                h = model(**enc).last_hidden_state.float()
                m = enc["attention_mask"]
                refs[label] = (enc["input_ids"], m, (h * m[..., None]).sum(1) / m.sum(1, keepdim=True))
            else:
                blocks = token_blocks(tok, texts, max_tokens=args.eval_tokens, seq_len=256)
                # bf16 halves the memory of the reference (KL changes in the 4th digit at most).
                refs[label] = (blocks, [F.log_softmax(model(input_ids=b.unsqueeze(0)).logits[0].float(), -1)
                                        .to(torch.bfloat16) for b in blocks])
    return refs


def run_row(row: str, recipe: dict, base, tok, refs, out: Path, encoder: bool) -> dict:
    import hfsqueeze

    model = copy.deepcopy(base)
    started = time.perf_counter()
    report = hfsqueeze.compress(model, recipe, tokenizer=tok, measure_quality=False)
    compress_s = time.perf_counter() - started
    target = out / row.replace("+", "_")
    hfsqueeze.save_compressed(model, target, tokenizer=tok, report=report, overwrite=True)
    del model
    reloaded = hfsqueeze.load_compressed(target)  # runs the parity check
    scores = (score_encoder if encoder else score_lm)(reloaded, refs)
    distill = next((s.details for s in report.stages if s.method == "distill"), {})
    return {"row": row, "compress_s": round(compress_s, 1), "wall_s": round(time.perf_counter() - started, 1),
            "scores": scores, "route": distill.get("route"), "kept": distill.get("kept"),
            "train_tokens_per_second": distill.get("train_tokens_per_second"), "steps": distill.get("steps")}


def table(results: list[dict], base_scores: dict) -> str:
    lines = ["| row | " + " | ".join(TEXTS) + " | compress s | row wall s | kept | train tok/s |",
             "|---|" + "---|" * (len(TEXTS) + 4)]
    for r in results:
        cells = []
        for label in TEXTS:
            s = r["scores"][label]
            if "cosine" in s:
                cells.append(f"cos {s['cosine']:.4f}")
            else:
                base = base_scores.get(label, {}).get("ppl")
                delta = f" ({(s['ppl'] / base - 1) * 100:+.1f}%)" if base else ""
                cells.append(f"ppl {s['ppl']:.2f}{delta} / KL {s['kl']:.4f}")
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {r['compress_s']} | {r['wall_s']} | "
                     f"{r.get('kept') or ''} | {r.get('train_tokens_per_second') or ''} |")
    return "\n".join(lines)


def gap_lines(results: list[dict], base_scores: dict) -> list[str]:
    """Share of the perplexity gap the recovered row closes, against each pruned row without training."""
    rows = {r["row"]: r["scores"] for r in results}
    lines = []
    for start in ("prune", "prune-plain"):
        if "prune+recover" not in rows or start not in rows:
            continue
        for label in TEXTS:
            pruned, done, orig = (rows[start][label]["ppl"], rows["prune+recover"][label]["ppl"],
                                  base_scores[label]["ppl"])
            lines.append(f"prune+recover closes {(pruned - done) / (pruned - orig):.0%} of the {label} perplexity "
                         f"gap of `{start}` ({pruned:.2f} -> {done:.2f}; original {orig:.2f})")
    return lines


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from hfsqueeze.artifact.load import load_model
    from hfsqueeze.builtin.models import minilm_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_recipes = recipes(args.steps)
    results, base_scores = [], {}
    groups = [("builtin", [r for r in args.rows if not r.startswith("minilm")], False),
              (None, [r for r in args.rows if r.startswith("minilm")], True)]
    for source, rows, encoder in groups:
        if not rows:
            continue
        base, tok = load_model(source if source else minilm_dir())
        refs = references(base, tok, args, encoder)
        if not encoder:
            base_scores = score_lm(base, refs)
            log(f"original: {json.dumps(base_scores)}")
        for row in rows:
            log(f"{row} ...")
            result = run_row(row, all_recipes[row], base, tok, refs, out, encoder)
            log(json.dumps(result))
            results.append(result)
            (out / "results.json").write_text(json.dumps({"original": base_scores, "rows": results}, indent=2))
    print(table(results, base_scores))
    print("\n".join(gap_lines(results, base_scores)))


if __name__ == "__main__":
    main()
