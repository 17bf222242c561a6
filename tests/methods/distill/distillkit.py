"""What the distill tests share: a tiny Llama, small stage configs, a context, logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers as tf

from hfsqueeze.methods.distill import DistillConfig

SMALL_EVAL = {"max_tokens": 256, "seq_len": 128, "latency": False, "disk_size": False}
FAST = {"max_tokens": 12_000, "eval_tokens": 1024}


def tiny_llama(layers: int = 4, **overrides) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True, **overrides,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def stage(**kwargs: Any) -> DistillConfig:
    base = {"block_size": 64, "data": {"text": "builtin", **FAST},
            "training_args": {"max_steps": 6, "learning_rate": 2e-3, "per_device_train_batch_size": 4}}
    for key, value in kwargs.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return DistillConfig.from_dict(base)


IDS = torch.tensor([[5, 17, 33, 80, 120, 7, 9, 250]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for a test module that imports this fixture: tiny matmuls gain nothing from threads, and on a
    shared 2-core machine OpenMP spinning makes them ~4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
