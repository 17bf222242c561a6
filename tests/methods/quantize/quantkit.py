"""What the quantize tests share: a tiny Gemma-3 (sliding and full attention layers)."""

from __future__ import annotations

import torch


def tiny_gemma3():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=512)
    return tf.Gemma3ForCausalLM(cfg).eval()
