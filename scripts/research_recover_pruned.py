"""Research behind issue 11, round 2: why recovery of pruned models fails on out-of-domain text, and what fixes it.

Plain training loops (no Trainer) on pruned all-MiniLM-L6-v2 (50% heads) and SmolLM2-135M-Instruct (25% heads + 25%
FFN), scored against the original on held-out pydoc and on ``builtin:bible`` (never trained on). One JSON line per
run is appended to /tmp/rec_pruned.jsonl. The results are in recipes/README.md ("Recovering pruned models").

    python scripts/research_recover_pruned.py minilm --data blocks --loss pooled        # the old recipe
    python scripts/research_recover_pruned.py minilm --data gen --loss token,layerscos --steps 150 --lr 2e-4
    python scripts/research_recover_pruned.py smollm2 --data gen --steps 80 --lr 6e-4 [--calib builtin:generated]

``--data``: ``blocks`` (pydoc packed into 128-token blocks), ``paras`` (pydoc paragraphs), ``gen`` (all of
``builtin:generated``), ``pydoc`` (SmolLM2: packed pydoc). ``--loss`` (MiniLM, comma list): ``pooled`` (1 - cosine of
mean-pooled embeddings), ``token`` (1 - cosine per token of the last hidden state), ``layers`` / ``layerscos``
(per-layer hidden-state MSE / 1 - cosine). Run with ``nice`` and ``OMP_NUM_THREADS=1`` on a shared CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hfsqueeze
from hfsqueeze.artifact.load import load_model
from hfsqueeze.core.data import builtin_text, load_texts, token_blocks
from hfsqueeze.builtin.models import minilm_dir
from hfsqueeze.builtin.texts import GENERATED_FILE
from hfsqueeze.methods.distill import losses

OUT = Path("/tmp/rec_pruned.jsonl")


def generated_all() -> list[str]:
    return [json.loads(line)["text"] for line in GENERATED_FILE.read_text().splitlines() if line.strip()]


def paragraphs(texts: list[str]) -> list[str]:
    return [" ".join(p.split()) for t in texts for p in t.split("\n\n") if len(p.strip()) > 20]


def schedule(opt, steps: int):
    warm = max(1, int(0.1 * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))


def prune_spec(heads: float, ffn: float, calib: str | None) -> dict:
    stage = {"method": "prune", "heads": heads, **({"ffn": ffn} if ffn else {})}
    return {"stages": [{**stage, **({"calibration": calib} if calib else {})}]}


def minilm(a) -> dict:
    base, tok = load_model(minilm_dir())
    base.eval()
    evals = {}
    for name, src in (("pydoc", "builtin"), ("bible", "builtin:bible")):
        enc = tok(paragraphs(load_texts(src, split="eval"))[:96], truncation=True, max_length=128, padding=True,
                  return_tensors="pt")
        with torch.no_grad():
            h = base(**enc).last_hidden_state
        m = enc["attention_mask"][..., None]
        evals[name] = (enc, (h * m).sum(1) / m.sum(1))

    def score(model):
        model.eval()
        out = {}
        with torch.no_grad():
            for name, (enc, ref) in evals.items():
                h, m = model(**enc).last_hidden_state, enc["attention_mask"][..., None]
                out[name] = round(F.cosine_similarity((h * m).sum(1) / m.sum(1), ref, -1).mean().item(), 4)
        return out

    model = copy.deepcopy(base)
    hfsqueeze.compress(model, prune_spec(0.5, 0, a.calib), tokenizer=tok, measure_quality=False)
    rec = {"pruned": score(model)}
    train = builtin_text("train")
    if a.data == "blocks":
        examples = [r.tolist() for r in token_blocks(tok, [train], max_tokens=200_000, seq_len=128)]
    else:
        examples = [tok(p, truncation=True, max_length=128)["input_ids"]
                    for p in paragraphs(generated_all() if a.data == "gen" else [train])]
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    model.train().requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    sched, kinds, started = schedule(opt, a.steps), a.loss.split(","), time.perf_counter()
    for step in range(a.steps):
        batch = [examples[order[(step * a.batch + i) % len(order)]] for i in range(a.batch)]
        ids = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
        m = torch.zeros_like(ids)
        for i, b in enumerate(batch):
            ids[i, : len(b)], m[i, : len(b)] = torch.tensor(b), 1
        with torch.no_grad():
            t = base(input_ids=ids, attention_mask=m, output_hidden_states=True)
        s = model(input_ids=ids, attention_mask=m, output_hidden_states=True)
        loss = 0.0
        if "pooled" in kinds:
            loss = loss + losses.embedding_loss(s.last_hidden_state, t.last_hidden_state, m)
        if "token" in kinds:
            loss = loss + losses.hidden_state_loss([s.last_hidden_state], [t.last_hidden_state], mask=m,
                                                   kind="cosine")
        for kind, name in (("layers", "mse"), ("layerscos", "cosine")):
            if kind in kinds:
                loss = loss + losses.hidden_state_loss(s.hidden_states[1:], t.hidden_states[1:], mask=m, kind=name)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    rec["train_s"] = round(time.perf_counter() - started, 1)
    rec["recovered"] = score(model)
    return rec


def smollm2(a) -> dict:
    teacher, tok = load_model("builtin")
    teacher.eval().requires_grad_(False)
    model = copy.deepcopy(teacher)
    hfsqueeze.compress(model, prune_spec(0.25, 0.25, a.calib), tokenizer=tok, measure_quality=False)
    with tempfile.TemporaryDirectory() as tmp:  # score what a user gets: the saved and reloaded model
        hfsqueeze.save_compressed(model, tmp, tokenizer=tok, overwrite=True)
        model = hfsqueeze.load_compressed(tmp)
    evals = {}
    with torch.no_grad():
        for name, src in (("pydoc", "builtin"), ("bible", "builtin:bible")):
            blocks = token_blocks(tok, load_texts(src, split="eval"), max_tokens=2048, seq_len=256)
            evals[name] = (blocks, [F.log_softmax(teacher(input_ids=b[None]).logits[0].float(), -1) for b in blocks])

    def score(m):
        m.eval()
        out = {}
        with torch.no_grad():
            for name, (blocks, ref) in evals.items():
                nll = kl = 0.0
                for b, r in zip(blocks, ref):
                    lp = F.log_softmax(m(input_ids=b[None]).logits[0].float(), -1)
                    nll -= lp[:-1].gather(-1, b[1:, None]).sum().item()
                    kl += (r.exp() * (r - lp)).sum().item()
                out[name] = {"ppl": round(math.exp(nll / (blocks.numel() - len(blocks))), 2),
                             "kl": round(kl / blocks.numel(), 4)}
        return out

    rec = {"original": score(teacher), "pruned": score(model)}
    need = a.steps * a.batch * a.seq
    texts = [builtin_text("train")] if a.data == "pydoc" else generated_all()
    data = token_blocks(tok, texts, max_tokens=need, seq_len=a.seq)
    model.train().requires_grad_(True)
    model.get_input_embeddings().requires_grad_(False)
    model.get_output_embeddings().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    sched, started = schedule(opt, a.steps), time.perf_counter()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    for step in range(a.steps):
        ids = data[order[(torch.arange(a.batch) + step * a.batch) % len(data)]]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        loss = losses.kd_loss(model(input_ids=ids).logits, t_logits, 2.0)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    rec["train_s"] = round(time.perf_counter() - started, 1)
    rec["recovered"] = score(model)
    for k in evals:
        o, p, r = (rec[key][k]["ppl"] for key in ("original", "pruned", "recovered"))
        rec[f"gap_closed_{k}"] = round((p - r) / (p - o), 3)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["minilm", "smollm2"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=None, help="default 16 (MiniLM), 4 (SmolLM2)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--data", default="gen", choices=["blocks", "paras", "gen", "pydoc"])
    ap.add_argument("--loss", default="pooled")
    ap.add_argument("--calib", default=None, help="prune calibration text (default: the built-in pydoc text)")
    a = ap.parse_args()
    a.batch = a.batch or (16 if a.model == "minilm" else 4)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = time.perf_counter()
    rec = {**vars(a), **(minilm(a) if a.model == "minilm" else smollm2(a))}
    rec["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(rec))
    with OUT.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
