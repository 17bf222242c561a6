"""The prune stage's options: importance scores, scopes and the other options."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny
from hfsqueeze.core.errors import RecipeError
from hfsqueeze.methods.prune import PruneWarning, apply_prune
from hfsqueeze.methods.prune.surgery import PLAN_KEY, attention_shape, family_of, layer_list
from prunekit import ctx_for, make_model, run, small, zero_heads


# ---- importance ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("importance", ["gradient", "activation", "magnitude", "kl"])
@pytest.mark.parametrize("kind", ["llama_mha", "bert"])
def test_a_dead_head_scores_lowest(kind, importance, tiny_tokenizer):
    from hfsqueeze.methods.prune import compute_scores

    model = make_model(kind)
    family = family_of(model.config)
    layer = layer_list(family, model)[0]
    zero_heads(family, layer, [2])
    if importance == "magnitude":  # weights only: the head's query rows must go too
        proj = layer.self_attn.q_proj if family == "llama" else layer.attention.self.query
        with torch.no_grad():
            proj.weight[32:48] = 0
    scores, units = compute_scores(family, model, small(heads=0.25, importance=importance),
                                   ctx_for(tiny_tokenizer), layers=True)
    assert [u[0] for u in units[0]] == [[0], [1], [2], [3]]
    layer_scores = scores.heads[0]
    assert int(layer_scores.argmin()) == 2
    if importance != "magnitude":
        assert float(layer_scores[2]) < 1e-6 < float(layer_scores.max())
    assert scores.layers is not None and scores.layers.shape == (2,)
    assert [s.numel() for s in scores.ffn] == [128, 128]


# ---- scopes and options ------------------------------------------------------------------------------------------
def test_layerwise_is_uniform_and_reloads_stock(tiny_tokenizer):
    model = make_model("llama_mha", num_hidden_layers=3)
    details = apply_prune(model, small(heads=0.5, ffn=0.25, scope="layerwise", importance="activation"),
                          ctx_for(tiny_tokenizer))
    assert details["heads_kept_per_layer"] == [2, 2, 2]
    assert details["ffn_width_per_layer"] == [96, 96, 96]
    assert details["reload"] == "stock" and not hasattr(model.config, PLAN_KEY)
    assert (model.config.num_attention_heads, model.config.intermediate_size, model.config.head_dim) == (2, 96, 16)


def test_global_honours_min_heads_and_protect_layers(tiny_tokenizer):
    model = make_model("llama_mha", num_hidden_layers=4)
    config = small(heads=0.75, ffn=0.25, scope="global", importance="magnitude", min_heads_per_layer=2,
                   protect_layers=[0, -1])
    with pytest.warns(PruneWarning, match="removed 4 of the 12 heads"):
        details = apply_prune(model, config, ctx_for(tiny_tokenizer))
    assert details["heads_kept_per_layer"] == [4, 2, 2, 4]
    assert details["ffn_width_per_layer"][0] == details["ffn_width_per_layer"][3] == 128
    assert sum(details["ffn_width_per_layer"][1:3]) == 256 - 128  # a quarter of all 512 neurons, from layers 1-2
    assert details["reload"] == "trust_remote_code"
    assert model.config.hfsqueeze_pruning["num_attention_heads"] == [4, 2, 2, 4]


def test_iterative_steps_reach_the_target(tiny_tokenizer):
    model = make_model("llama_mha", num_hidden_layers=4)
    details = apply_prune(model, small(heads=0.5, layers=1, steps=2, importance="gradient"),
                          ctx_for(tiny_tokenizer))
    assert len(details["importance_scores"]) == 2
    assert len(details["layers_kept"]) == 3
    # Half the heads of the three surviving layers, removed over two steps.
    assert sum(details["heads_kept_per_layer"]) == 6
    step1, step2 = (sum(map(len, h["head_units"])) for h in (d for d in details["importance_scores"]))
    assert step2 < step1 == 16  # step 2 re-scored the pruned model
    run(model)


def test_layerwise_rounding_to_nothing_fails_before_scoring(tiny_tokenizer, monkeypatch):
    import hfsqueeze.methods.prune.apply as prune_apply

    monkeypatch.setattr(prune_apply, "compute_scores", lambda *a, **k: pytest.fail("scored before the error"))
    model = make_tiny("llama")  # two key/value groups per layer: 10% rounds to none
    with pytest.raises(RecipeError, match="key 'heads': 0.1 removes no head: .* rounds to 0"):
        apply_prune(model, small(heads=0.1, ffn=0.1, scope="layerwise", importance="gradient"),
                    ctx_for(tiny_tokenizer))
    assert attention_shape("llama", model.model.layers[0])[:2] == (4, 2)
