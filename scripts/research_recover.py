"""Research behind issue 11: what makes nf4/int8 + recovery worse than no recovery on out-of-domain text?

Each experiment trains with a plain loop (no Trainer, so only the question differs) on SmolLM2-135M-Instruct and
scores KL to the original and perplexity on held-out pydoc text and on World English Bible prose, then appends one
JSON line to /tmp/rec_research.jsonl:

    python scripts/research_recover.py lora --steps 20 --seq 128 --eval_tokens 1024            # nf4, alpha 1.0
    python scripts/research_recover.py lora --alpha 0.5 --steps 20 --seq 128 --eval_tokens 1024
    python scripts/research_recover.py lora --bits 8 --base_eval --steps 20 --seq 128 --eval_tokens 1024
    python scripts/research_recover.py qat --steps 20 --seq 128 --eval_tokens 1024             # fp32 + nf4 simulated
    python scripts/research_recover.py prune --lr 3e-4 --steps 30 --seq 128 --eval_tokens 1024

``lora`` scores the quantized model, the adapter live, the adapter saved and reloaded with Transformers'
``from_pretrained`` (adapter files beside the base), and the adapter merged, saved and reloaded. The results are in
recipes/README.md ("Why recovery is pure distillation"). Run with ``nice`` and ``OMP_NUM_THREADS=1`` on a shared CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import hfsqueeze
from hfsqueeze.data import builtin_text, token_blocks
from hfsqueeze.methods.distill import losses
from hfsqueeze.methods.quantize import guard_bnb_cpu_repack
from hfsqueeze.models import load_model

OUT = Path("/tmp/rec_research.jsonl")
BASE_EVAL = False


def ood_text() -> str:
    # A slice from the middle of the narrative books and one from the letters (not the builtin:bible selection).
    from hfsqueeze.builtin.texts import _source

    s = _source()
    i = s.index('"""')
    t = s[i + 3: s.index('"""', i + 3)].replace("`", "'")
    return t[int(len(t) * 0.22): int(len(t) * 0.22) + 12000] + "\n\n" + t[int(len(t) * 0.93): int(len(t) * 0.93) + 12000]


@torch.no_grad()
def logprobs(model, blocks):
    model.eval()
    return [F.log_softmax(model(input_ids=b.unsqueeze(0)).logits[0].float(), -1) for b in blocks]


@torch.no_grad()
def quality(model, blocks, ref):
    model.eval()
    nll = cnt = kl = 0.0
    for b, r in zip(blocks, ref):
        lp = F.log_softmax(model(input_ids=b.unsqueeze(0)).logits[0].float(), -1)
        nll += -lp[:-1].gather(-1, b[1:, None]).sum().item()
        cnt += len(b) - 1
        kl += (r.exp() * (r - lp)).sum().item()
    return {"ppl": round(math.exp(nll / cnt), 3), "kl": round(kl / blocks.numel(), 4)}


def evaluate(model, evals):
    guard_bnb_cpu_repack(model)
    return {name: quality(model, blocks, ref) for name, (blocks, ref) in evals.items()}


def train(model, teacher, data, *, steps, alpha, lr, batch, temperature=2.0, autocast=False, params=None,
          pre_forward=None):
    params = [p for p in (params or model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, int(0.1 * steps))) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    if BASE_EVAL:
        import bitsandbytes as bnb

        for mod in model.modules():
            if isinstance(mod, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
                mod.eval()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=g)
    t0, losses_seen = time.perf_counter(), []
    for step in range(steps):
        idx = order[(torch.arange(batch) + step * batch) % len(data)]
        ids = data[idx]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            t_logits = teacher(input_ids=ids).logits.float()
        if pre_forward is not None:
            pre_forward()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            s_logits = model(input_ids=ids).logits.float()
        kd = losses.kd_loss(s_logits, t_logits, temperature)
        loss = kd if alpha >= 1 else alpha * kd + (1 - alpha) * losses.causal_lm_loss(s_logits, ids)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses_seen.append(round(float(loss), 4))
        if step % 10 == 0:
            print(f"step {step} loss {float(loss):.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    secs = time.perf_counter() - t0
    return {"train_s": round(secs, 1), "tok_s": round(steps * batch * data.shape[1] / secs, 1),
            "loss_first": losses_seen[0], "loss_last": losses_seen[-1]}


def save_reload(model, tok, **kw):
    from transformers import AutoModelForCausalLM

    from hfsqueeze.methods.quantize.apply import saveable

    d = tempfile.mkdtemp(prefix="rec-")
    guard_bnb_cpu_repack(model)
    with saveable(model):
        model.save_pretrained(d)
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(d, device_map="cpu", **kw)
    return m, d, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("exp")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval_tokens", type=int, default=2048)
    ap.add_argument("--autocast", action="store_true")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--base_eval", action="store_true")
    a = ap.parse_args()
    global BASE_EVAL
    BASE_EVAL = a.base_eval
    torch.manual_seed(0)
    started = time.perf_counter()
    teacher, tok = load_model("builtin")
    teacher.requires_grad_(False)
    evals = {}
    for name, text in (("pydoc_heldout", builtin_text("eval")), ("web_bible", ood_text())):
        blocks = token_blocks(tok, [text], max_tokens=a.eval_tokens, seq_len=a.seq)
        evals[name] = (blocks, logprobs(teacher, blocks))
    data = token_blocks(tok, [builtin_text("train")], max_tokens=a.steps * a.batch * a.seq, seq_len=a.seq)
    rec = {"exp": a.exp, **vars(a)}
    qstage = {"method": "quantize", "bits": 4, "quant_type": "nf4", "double_quant": True} if a.bits == 4 else \
        {"method": "quantize", "bits": 8}
    result = getattr(__import__(__name__), f"exp_{a.exp}")(a, teacher, tok, evals, data, qstage)
    rec.update(result)
    rec["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(rec))
    with OUT.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")


def quantized(teacher, qstage):
    m = copy.deepcopy(teacher)
    hfsqueeze.compress(m, {"stages": [qstage]}, measure_quality=False)
    return m


def exp_lora(a, teacher, tok, evals, data, qstage):
    """nf4/int8 + LoRA: quality before, adapter live, merged live, merged saved+reloaded, adapter saved+reloaded."""
    import peft

    from hfsqueeze.methods.distill.recover import merge_lora

    out = {}
    m = quantized(teacher, qstage)
    out["quantized"] = evaluate(m, evals)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    out["train"] = train(pm, teacher, data, steps=a.steps, alpha=a.alpha, lr=a.lr, batch=a.batch,
                         autocast=a.autocast)
    out["adapter_live"] = evaluate(pm, evals)
    # Adapter route: base + adapter files in one dir, loaded by Transformers' own from_pretrained.
    d = tempfile.mkdtemp(prefix="rec-adapter-")
    guard_bnb_cpu_repack(m)
    from hfsqueeze.methods.quantize.apply import saveable

    base = pm.get_base_model()
    with saveable(base):
        pm.save_pretrained(d)  # adapter_config.json + adapter_model.safetensors
        # base weights without the LoRA modules: unload a copy
    from transformers import AutoModelForCausalLM

    merged_copy_dir = tempfile.mkdtemp(prefix="rec-base-")
    pm2 = copy.deepcopy(pm)
    plain = pm2.unload()
    with saveable(plain):
        plain.save_pretrained(merged_copy_dir)
    for f in Path(merged_copy_dir).iterdir():
        os.replace(f, Path(d) / f.name)
    cfg = json.loads((Path(d) / "adapter_config.json").read_text())
    out["adapter_config_base"] = cfg.get("base_model_name_or_path")
    t = time.perf_counter()
    re_adapter = AutoModelForCausalLM.from_pretrained(d, device_map="cpu")
    out["adapter_reload_s"] = round(time.perf_counter() - t, 2)
    out["adapter_reload_has_lora"] = any("lora_A" in n for n, _ in re_adapter.named_parameters())
    out["adapter_reloaded"] = evaluate(re_adapter, evals)
    del re_adapter
    merged = merge_lora(pm)
    out["merged_live"] = evaluate(merged, evals)
    re, _, _ = save_reload(merged, tok)
    out["merged_reloaded"] = evaluate(re, evals)
    return out


def _nf4_fake(w, blocksize=64, double_quant=True):
    import bitsandbytes.functional as bf

    q, st = bf.quantize_4bit(w.detach().float().contiguous(), blocksize=blocksize, quant_type="nf4",
                             compress_statistics=double_quant)
    return bf.dequantize_4bit(q, st).to(w.dtype)


def exp_qat(a, teacher, tok, evals, data, qstage):
    """Recover in full precision with nf4 simulated (LoRA on fp32, merged weight fake-quantized with STE), then merge
    in fp32 and quantize with bnb: the artifact is exactly what was trained."""
    import peft

    out = {}
    m = copy.deepcopy(teacher)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                                exclude_modules=["lm_head"]))
    layers = [mod for mod in pm.modules() if isinstance(mod, peft.tuners.lora.Linear)]

    # Replace each LoRA layer's forward: x @ fq(W0 + s*B@A)^T (STE through the rounding).
    def fq_forward(self, x, *args, **kwargs):
        w0 = self.base_layer.weight
        delta = (self.lora_B["default"].weight @ self.lora_A["default"].weight) * self.scaling["default"]
        w = w0 + delta
        wq = w + (_nf4_fake(w) - w).detach()
        return F.linear(x, wq.to(x.dtype), self.base_layer.bias)

    for layer in layers:
        layer.forward = fq_forward.__get__(layer)
    # Before training: fake-quant == nf4 quantization of the original.
    out["fake_quant_before"] = evaluate(pm, {k: v for k, v in evals.items()})
    out["train"] = train(pm, teacher, data, steps=a.steps, alpha=a.alpha, lr=a.lr, batch=a.batch,
                         autocast=a.autocast)
    out["fake_quant_after"] = evaluate(pm, evals)
    for layer in layers:
        del layer.forward
    merged = pm.merge_and_unload()
    hfsqueeze.compress(merged, {"stages": [qstage]}, measure_quality=False)
    out["quantized_live"] = evaluate(merged, evals)
    re, _, _ = save_reload(merged, tok)
    out["quantized_reloaded"] = evaluate(re, evals)
    return out



def exp_prune(a, teacher, tok, evals, data, qstage):
    """25% heads + 25% FFN pruned (gradient importance), then full fine-tuning by KD (embeddings frozen)."""
    out = {"original": evaluate(teacher, evals)}
    m = copy.deepcopy(teacher)
    hfsqueeze.compress(m, {"stages": [{"method": "prune", "heads": 0.25, "ffn": 0.25}]}, tokenizer=tok,
                       measure_quality=False)
    out["pruned"] = evaluate(m, evals)
    m.requires_grad_(True)
    m.get_input_embeddings().requires_grad_(False)
    out["train"] = train(m, teacher, data, steps=a.steps, alpha=a.alpha, lr=a.lr, batch=a.batch,
                         autocast=a.autocast)
    out["recovered"] = evaluate(m, evals)
    for name in evals:
        o, p, r = (out[k][name]["ppl"] for k in ("original", "pruned", "recovered"))
        out[f"gap_closed_{name}"] = round((p - r) / (p - o), 3)
    return out



if __name__ == "__main__":
    main()
