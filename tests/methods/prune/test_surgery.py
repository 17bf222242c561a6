"""Prune surgery is exact: removed heads, neurons and layers give what zeroing them gives."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from hfsqueeze.methods.prune import drop_layers, prune_ffn, prune_heads
from hfsqueeze.methods.prune.importance import head_units
from hfsqueeze.methods.prune.surgery import (
    attention_shape,
    family_of,
    ffn_output_proj,
    ffn_width,
    head_output_proj,
    is_conv1d,
    layer_list,
)
from prunekit import ATOL, IDS, make_model, run, zero_heads


def zero_neurons(family, layer, neurons):
    proj = ffn_output_proj(family, layer)
    with torch.no_grad():
        for j in neurons:
            if is_conv1d(proj):
                proj.weight[j, :] = 0
            else:
                proj.weight[:, j] = 0


# ---- surgery exactness -------------------------------------------------------------------------------------------
HEAD_CASES = [
    ("llama", "groups"), ("llama", "slots"), ("llama_mha", "groups"), ("qwen2", "groups"), ("qwen2", "slots"),
    ("gemma3", "groups"), ("gemma3", "slots"), ("gpt2", "groups"), ("bert", "groups"), ("roberta", "groups"),
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind,mode", HEAD_CASES)
def test_removing_zeroed_heads_keeps_outputs(kind, mode, attn):
    model = make_model(kind)
    model.set_attn_implementation(attn)
    family = family_of(model.config)
    layers = layer_list(family, model)
    plans = []
    for i, layer in enumerate(layers):
        n_q, n_kv, _ = attention_shape(family, layer)
        units = head_units(n_q, n_kv, mode)
        gone = units[i % len(units)]  # a different unit in each layer: per-layer sizes differ afterwards
        zero_heads(family, layer, gone[0])
        keep_q = [h for h in range(n_q) if h not in gone[0]]
        keep_kv = [h for h in range(n_kv) if h not in gone[1]]
        plans.append((keep_q, keep_kv))
    before = run(model)
    for layer, (keep_q, keep_kv) in zip(layers, plans):
        prune_heads(family, layer, keep_q, keep_kv)
    after = run(model)
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)
    for layer, (keep_q, keep_kv) in zip(layers, plans):
        n_q, n_kv, _ = attention_shape(family, layer)
        assert (n_q, n_kv if family == "llama" else n_q) == (len(keep_q), len(keep_kv) if family == "llama" else n_q)
        if family == "llama":
            assert layer.self_attn.num_key_value_groups == n_q // n_kv
    if family != "bert":
        model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False)  # the KV cache follows the new shapes


def test_gqa_modes_remove_what_they_say():
    model = make_tiny("llama")  # 4 query heads, 2 key/value heads
    layer = model.model.layers[0]
    prune_heads("llama", layer, [0, 1], [0])  # groups: the second k/v head with its two query heads
    assert attention_shape("llama", layer)[:2] == (2, 1)
    layer = model.model.layers[1]
    prune_heads("llama", layer, [0, 2], [0, 1])  # slots: slot 1 of both groups, every k/v head stays
    assert attention_shape("llama", layer)[:2] == (2, 2) and layer.self_attn.num_key_value_groups == 1
    with pytest.raises(ValueError, match="same number of query heads"):
        prune_heads("llama", make_tiny("llama").model.layers[0], [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="being removed"):
        prune_heads("llama", make_tiny("llama").model.layers[0], [0, 2], [0])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "gpt2", "bert"])
def test_removing_zeroed_neurons_keeps_outputs(kind):
    model = make_model(kind)
    family = family_of(model.config)
    plans = []
    for i, layer in enumerate(layer_list(family, model)):
        width = ffn_width(family, layer)
        gone = set(range(i, width, 3 + i))
        zero_neurons(family, layer, gone)
        plans.append([j for j in range(width) if j not in gone])
    before = run(model)
    for layer, keep in zip(layer_list(family, model), plans):
        prune_ffn(family, layer, keep)
    torch.testing.assert_close(run(model), before, atol=ATOL, rtol=0)
    assert [ffn_width(family, layer) for layer in layer_list(family, model)] == [len(k) for k in plans]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "gpt2"])
def test_dropping_an_identity_layer_keeps_outputs_and_generation(kind):
    model = make_model(kind)
    family = family_of(model.config)
    layer = layer_list(family, model)[0]
    # A layer whose attention and FFN add nothing is the identity on the (pre-norm) residual stream.
    zero_heads(family, layer, range(attention_shape(family, layer)[0]))
    zero_neurons(family, layer, range(ffn_width(family, layer)))
    with torch.no_grad():
        for proj in (head_output_proj(family, layer), ffn_output_proj(family, layer)):
            if proj.bias is not None:
                proj.bias.zero_()
    n = len(layer_list(family, model))
    before = run(model)
    gen_before = model.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False)
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    drop_layers(family, model, list(range(1, n)))
    torch.testing.assert_close(run(model), before, atol=ATOL, rtol=0)
    assert torch.equal(model.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False), gen_before)
    assert model.config.num_hidden_layers == n - 1 == len(layer_list(family, model))
    attn = layer_list(family, model)[0].self_attn if family == "llama" else layer_list(family, model)[0].attn
    assert attn.layer_idx == 0
    if layer_types:
        assert model.config.layer_types == layer_types[1:]
