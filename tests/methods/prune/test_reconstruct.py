"""Prune's ``reconstruct`` option: narrowed output projections refitted to the original layer's output."""

from __future__ import annotations

import copy

import pytest
import torch

from hfsqueeze.core.errors import RecipeError
from hfsqueeze.methods.prune import apply_prune
from prunekit import ATOL, ctx_for, make_model, run, small


# ---- reconstruction -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias,conv1d", [(False, False), (True, False), (True, True)])
def test_reconstruct_is_the_least_squares_fit_and_a_large_ridge_is_the_plain_cut(bias, conv1d):
    from transformers.pytorch_utils import Conv1D

    from hfsqueeze.methods.prune.reconstruct import reconstruct

    torch.manual_seed(0)
    x = torch.randn(2000, 12) @ torch.randn(12, 12) + 0.5  # correlated inputs with a mean: the bias can help
    module = Conv1D(5, 12) if conv1d else torch.nn.Linear(12, 5, bias=bias)
    torch.nn.init.normal_(module.weight)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    target = module(x).detach()
    xa = torch.cat([x, torch.ones(len(x), 1)], 1) if bias else x
    moments = (xa.double().t() @ xa.double()) / len(x)
    plain = copy.deepcopy(module)

    fitted = copy.deepcopy(module)
    error = reconstruct(fitted, keep, moments, ridge=0.0)
    inputs = torch.cat([x[:, keep], torch.ones(len(x), 1)], 1) if bias else x[:, keep]
    best = torch.linalg.lstsq(inputs.double(), target.double()).solution.t()  # [out, kept (+ bias)]
    w = fitted.weight.t() if conv1d else fitted.weight
    torch.testing.assert_close(w[:, keep].double(), best[:, :len(keep)], atol=1e-4, rtol=1e-4)
    if bias:
        torch.testing.assert_close(fitted.bias.double(), best[:, -1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        cut = x[:, keep] @ (plain.weight.t() if conv1d else plain.weight)[:, keep].t() + (plain.bias if bias else 0)
    cut_error = float(((cut - target) ** 2).sum() / (target ** 2).sum())
    assert error < 0.9 * cut_error
    assert error == pytest.approx(float(((inputs.double() @ best.t() - target.double()) ** 2).sum()
                                        / (target.double() ** 2).sum()), rel=1e-3)

    untouched = copy.deepcopy(module)
    reconstruct(untouched, keep, moments, ridge=1e9)
    torch.testing.assert_close(untouched.weight, plain.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,mode,layers", [("llama", "slots", 0), ("llama_mha", "groups", 1), ("gpt2", "groups", 0),
                                              ("bert", "groups", 1), ("qwen2", "groups", 0), ("gemma3", "slots", 1)])
def test_reconstruction_keeps_the_pruned_model_closer_to_the_original(kind, mode, layers, tiny_tokenizer, tmp_path):
    import hfsqueeze

    original = make_model(kind, num_hidden_layers=3) if layers and kind != "gemma3" else make_model(kind)
    plain, fitted = copy.deepcopy(original), copy.deepcopy(original)
    config = dict(heads=0.5, ffn=0.5, layers=layers, gqa_mode=mode, importance="magnitude", calibration_tokens=2048)
    apply_prune(plain, small(**config), ctx_for(tiny_tokenizer))
    details = apply_prune(fitted, small(**config, reconstruct=True, reconstruct_ridge=0.01), ctx_for(tiny_tokenizer))
    assert details["heads_removed_per_layer"] == apply_prune(copy.deepcopy(original), small(**config),
                                                             ctx_for(tiny_tokenizer))["heads_removed_per_layer"]
    assert 0 < details["importance_scores"][0]["reconstruction_error"] < 1
    ctx = ctx_for(tiny_tokenizer)
    ids = ctx.calibration_blocks(max_tokens=512, seq_len=64, source=None)
    ref = run(original, ids)
    assert ((run(fitted, ids) - ref) ** 2).mean() < ((run(plain, ids) - ref) ** 2).mean()
    hfsqueeze.save_compressed(fitted, tmp_path / "out", tokenizer=tiny_tokenizer)
    torch.testing.assert_close(run(hfsqueeze.load_compressed(tmp_path / "out"), ids), run(fitted, ids), atol=ATOL,
                               rtol=0)


def test_reconstruct_without_a_tokenizer_is_one_line():
    import hfsqueeze

    with pytest.raises(RecipeError, match=r"calibration data \(.*reconstruct\) needs a tokenizer") as info:
        hfsqueeze.compress(make_model("llama"), {"stages": [
            {"method": "prune", "heads": 0.5, "importance": "magnitude", "reconstruct": True}]})
    assert "\n" not in str(info.value)
