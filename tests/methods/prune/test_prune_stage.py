"""The prune stage: the pruned model computes what the masked model computes."""

from __future__ import annotations

import copy

import pytest
import torch

from hfsqueeze.methods.prune import apply_prune
from hfsqueeze.methods.prune.importance import Gates
from hfsqueeze.methods.prune.surgery import family_of, ffn_input_projs, ffn_width, is_conv1d, layer_list
from prunekit import ATOL, ctx_for, make_model, run, small


# ---- the stage: pruned model == masked model ---------------------------------------------------------------------
def kept_rows(pruned: torch.Tensor, original: torch.Tensor, block: int) -> list[int]:
    """Indices of the ``block``-row blocks of ``original`` that survive, in order, in ``pruned``."""
    blocks = original.reshape(-1, block, original.shape[-1])
    out = []
    for b in pruned.reshape(-1, block, pruned.shape[-1]):
        out.append(next(i for i, o in enumerate(blocks) if torch.equal(o, b)))
    return out


@pytest.mark.parametrize("kind,mode", [("llama", "slots"), ("llama_mha", "groups"), ("gpt2", "groups"),
                                       ("bert", "groups")])
def test_pruned_model_equals_masked_model(kind, mode, tiny_tokenizer):
    model = make_model(kind)
    original = copy.deepcopy(model)
    family = family_of(model.config)
    details = apply_prune(model, small(heads=0.25, ffn=0.3, gqa_mode=mode, importance="gradient"),
                          ctx_for(tiny_tokenizer))
    assert details["parameters_removed"] > 0
    with Gates(family, original) as gates:
        for i, (orig_layer, layer) in enumerate(zip(layer_list(family, original), layer_list(family, model))):
            for h in details["heads_removed_per_layer"][i]:
                gates.head[i][h] = 0.0
            rows_now = ffn_input_projs(family, layer)[0]
            rows_then = ffn_input_projs(family, orig_layer)[0]
            w_now = rows_now.weight.t() if is_conv1d(rows_now) else rows_now.weight
            w_then = rows_then.weight.t() if is_conv1d(rows_then) else rows_then.weight
            kept = set(kept_rows(w_now, w_then, 1))
            for j in range(ffn_width(family, orig_layer)):
                if j not in kept:
                    gates.ffn[i][j] = 0.0
        masked = run(original)
    torch.testing.assert_close(run(model), masked, atol=ATOL, rtol=0)


def test_layer_removal_equals_skipping_the_layer(tiny_tokenizer):
    model = make_model("bert", num_hidden_layers=3)
    original = copy.deepcopy(model)
    details = apply_prune(model, small(layers=1, importance="magnitude"), ctx_for(tiny_tokenizer))
    (dropped,) = details["importance_scores"][0]["layers_dropped"]
    assert details["layers_kept"] == [i for i in range(3) if i != dropped]
    assert model.config.num_hidden_layers == 2
    with Gates("bert", original, layers=True) as gates:
        gates.layer[dropped] = 0.0
        torch.testing.assert_close(run(model), run(original), atol=ATOL, rtol=0)
