"""What the tests of `hfsqueeze.tune` share: tiny models, small settings, ``run_tune``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hfsqueeze

IDS = torch.randint(5, 400, (1, 24), generator=torch.Generator().manual_seed(3))
# Small enough that a trial takes about a second on one core.
SETTINGS = {"calibration_tokens": 256, "seq_len": 128, "sensitivity_tokens": 128, "prompt_tokens": 16,
            "decode_tokens": 2, "latency_rounds": 1}


def tiny_llama(layers: int = 2):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


# The final re-measurement on the held-out text, small too.
EVALUATION = {"max_tokens": 256, "seq_len": 128, "prompt_tokens": 16, "decode_tokens": 4, "repeats": 1}


def run_tune(model, tok, out, **kwargs):
    kwargs.setdefault("budget", "size=0.5")
    kwargs.setdefault("trials", 4)
    return hfsqueeze.tune(model, tok, output=out, settings=SETTINGS, evaluation=EVALUATION, **kwargs)


def _completed(out: Path) -> list[dict]:
    path = out / "tuning" / "trials.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"state": "COMPLETE"' in line]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test of a module that imports this fixture gets its own sensitivity cache (``$HFSQUEEZE_CACHE/sensitivity``)."""
    monkeypatch.setenv("HFSQUEEZE_CACHE", str(tmp_path / "cache"))
