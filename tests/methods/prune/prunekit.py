"""What the prune tests share: tiny models of each family, a forward, small configs, zeroed heads and neurons."""

from __future__ import annotations

import torch

from conftest import make_tiny
from hfsqueeze.core.context import CompressionContext
from hfsqueeze.methods.prune import PruneConfig
from hfsqueeze.methods.prune.surgery import attention_shape, head_output_proj, is_conv1d

ATOL = 2e-5


def make_model(kind: str, **overrides):
    """The conftest tiny models plus config-built Qwen2 (GQA, q/k/v bias) and Gemma3 (sliding + full layers)."""
    import transformers as tf

    if kind == "qwen2":
        torch.manual_seed(0)
        cfg = tf.Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, **overrides)
        return tf.Qwen2ForCausalLM(cfg).eval()
    if kind == "gemma3":
        torch.manual_seed(0)
        cfg = tf.Gemma3TextConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  max_position_embeddings=512, **overrides)
        return tf.Gemma3ForCausalLM(cfg).eval()
    if kind == "roberta":
        torch.manual_seed(0)
        cfg = tf.RobertaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=520, **overrides)
        return tf.RobertaModel(cfg).eval()
    layers = overrides.pop("num_hidden_layers", None)
    if layers is None:
        return make_tiny(kind, **overrides)
    torch.manual_seed(0)
    if kind in ("llama", "llama_mha"):
        cfg = tf.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2 if kind == "llama" else 4, head_dim=16,
                             max_position_embeddings=512, tie_word_embeddings=True, **overrides)
        return tf.LlamaForCausalLM(cfg).eval()
    cfg = tf.BertConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=512, **overrides)
    return tf.BertModel(cfg).eval()


IDS = torch.randint(5, 400, (2, 24), generator=torch.Generator().manual_seed(1))


def run(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def ctx_for(tokenizer) -> CompressionContext:
    return CompressionContext(tokenizer=tokenizer)


def small(**kw) -> PruneConfig:
    kw.setdefault("calibration_tokens", 256)
    kw.setdefault("kl_tokens", 128)
    kw.setdefault("seq_len", 64)
    return PruneConfig(**kw)


def zero_heads(family, layer, heads):
    """Zero the output-projection columns of ``heads``: their output is exactly zero from then on."""
    proj = head_output_proj(family, layer)
    hd = attention_shape(family, layer)[2]
    with torch.no_grad():
        for h in heads:
            if is_conv1d(proj):
                proj.weight[h * hd:(h + 1) * hd, :] = 0
            else:
                proj.weight[:, h * hd:(h + 1) * hd] = 0
