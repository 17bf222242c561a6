"""The prune stage's config and errors: a round trip; bad configs, unsupported or quantized models and bad layer
requests, each refused in one clear line."""

from __future__ import annotations

import pytest

from conftest import make_tiny
from hfsqueeze.core.errors import RecipeError, UnsupportedModelError
from hfsqueeze.methods.prune import PruneConfig, apply_prune
from prunekit import ctx_for, small


# ---- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,match", [
    ({"heads": 1.5}, r"key 'heads': got 1.5; a fraction must be in \[0, 1\)"),
    ({"ffn": -3}, r"key 'ffn': got -3; a count must be >= 0"),
    ({}, "nothing to prune"),
    ({"heads": 0.2, "scope": "local"}, r"key 'scope': got 'local'; allowed: 'global' \| 'layerwise'"),
    ({"heads": 0.2, "importance": "taylor"}, "allowed: 'gradient' | 'activation' | 'magnitude' | 'kl'"),
    ({"heads": 0.2, "min_heads_per_layer": 0}, "min_heads_per_layer"),
    ({"heads": 0.2, "steps": 0}, "steps"),
    ({"heads": 0.2, "head": 1},
     r"unknown key 'head' \(did you mean 'heads'\?\); allowed keys: calibration, calibration_tokens"),
])
def test_bad_config_is_one_clear_line(data, match):
    with pytest.raises(RecipeError, match=match) as info:
        PruneConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_config_round_trip():
    config = PruneConfig(heads=0.25, ffn=100, layers=1, scope="layerwise", importance="kl", gqa_mode="slots",
                         protect_layers=[0, -1], steps=2, normalize=True)
    data = config.to_dict()
    assert data["method"] == "prune" and data["ffn"] == 100 and isinstance(data["ffn"], int)
    data.pop("method")
    assert PruneConfig.from_dict(data) == config


def test_unsupported_model_names_the_supported_types():
    import transformers as tf

    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                           num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(UnsupportedModelError, match=r"model type 'opt' \(OPTForCausalLM\) is not supported; "
                       r"supported model types: llama, mistral, qwen2, qwen3, gemma, gemma3_text, gpt2, bert"):
        apply_prune(model, small(heads=0.25, importance="magnitude"), ctx_for(None))


def test_bad_layer_requests(tiny_tokenizer):
    with pytest.raises(RecipeError, match="layer 5 does not exist; the model has 2 layers"):
        apply_prune(make_tiny("llama"), small(heads=0.5, protect_layers=[5]), ctx_for(tiny_tokenizer))
    with pytest.raises(RecipeError, match="key 'layers': got 2 .* but only 1 of 2 layers can go"):
        apply_prune(make_tiny("llama"), small(layers=2, importance="magnitude"), ctx_for(tiny_tokenizer))
    with pytest.raises(RecipeError, match="needs a tokenizer"):
        apply_prune(make_tiny("llama"), small(heads=0.5), ctx_for(None))


def test_quantized_model_is_refused():
    pytest.importorskip("bitsandbytes")
    from hfsqueeze.core.context import CompressionContext as Ctx
    from hfsqueeze.methods.quantize import QuantizeConfig, apply_quantize

    model = make_tiny("llama")
    apply_quantize(model, QuantizeConfig(bits=8), Ctx())
    with pytest.raises(RecipeError, match="put the prune stage before quantize"):
        apply_prune(model, small(heads=0.5, importance="magnitude"), Ctx())
