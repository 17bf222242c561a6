"""`hfsqueeze.tune` per-module choices: kept modules, the 16-bit rest and the solver's size model."""

from __future__ import annotations

import pytest
import torch
from conftest import outputs, reload_outputs_in_fresh_process

import hfsqueeze
from hfsqueeze.evaluation.measure import disk_bytes
from hfsqueeze.tune.solve import estimate_bytes, solve
from hfsqueeze.tune.space import plan_of, quantize_targets
from tunekit import _own_cache  # noqa: F401  (autouse: a sensitivity cache per test)
from tunekit import IDS, tiny_llama




# ---- per-module choices -------------------------------------------------------------------------------------
def test_full_module_name_skips_only_that_module():
    """``model.layers.1.mlp.down_proj`` must not also keep ``model.layers.11.mlp.down_proj`` unquantized."""
    model = tiny_llama(layers=12)
    recipe = {"stages": [{"method": "quantize", "bits": 8,
                          "skip_modules": ["lm_head", "model.layers.1.mlp.down_proj"]}]}
    hfsqueeze.compress(model, recipe, measure_quality=False)
    assert type(model.get_submodule("model.layers.1.mlp.down_proj")) is torch.nn.Linear
    assert type(model.get_submodule("model.layers.11.mlp.down_proj")).__name__ == "Linear8bitLt"
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")).__name__ == "Linear8bitLt"
    assert type(model.get_submodule("lm_head")) is torch.nn.Linear


def test_sixteen_bit_rest_with_kept_modules_reloads_stock(tiny_tokenizer, tmp_path):
    """The recipe tune writes (a bf16 stage, then int8 with kept modules) reloads with plain from_pretrained."""
    model = tiny_llama()
    recipe = {"stages": [{"method": "quantize", "bits": 16, "dtype": "bf16"},
                         {"method": "quantize", "bits": 8, "threshold": 2.0,
                          "skip_modules": ["lm_head", "model.layers.0.mlp.down_proj"]}],
              "evaluation": {"max_tokens": 128, "seq_len": 64, "latency": False}}
    model.compress(recipe, tokenizer=tiny_tokenizer)
    kept = model.get_submodule("model.layers.0.mlp.down_proj")
    assert type(kept) is torch.nn.Linear and kept.weight.dtype == torch.bfloat16
    out = hfsqueeze.save_compressed(model, tmp_path / "a", tokenizer=tiny_tokenizer)
    torch.testing.assert_close(reload_outputs_in_fresh_process(out, IDS), outputs(model, IDS))


@pytest.mark.parametrize("fmt, rest, keep", [
    ({"bits": 8, "threshold": 6.0}, "fp32", 0.0), ({"bits": 8, "threshold": 1.0}, "bf16", 0.5),
    ({"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}, "bf16", 1.0),
    ({"bits": 4, "quant_type": "fp4", "double_quant": False, "compute_dtype": "float32"}, "fp32", 0.5),
])
def test_size_estimate_matches_the_saved_file(fmt, rest, keep):
    """The solver's size model is within 1% of the real file, and never under it by more than 0.2%."""
    model = tiny_llama(layers=4)
    scores = {name: float(i) for i, (name, _) in enumerate(quantize_targets(model))}
    sol = solve(model, fmt, rest, scores, keep=keep)
    stages = plan_of({f"quantize.{k}": v for k, v in {**fmt, "rest_dtype": rest, "keep": keep}.items()}).stages(
        sol.skip_modules)
    hfsqueeze.compress(model, {"stages": stages}, measure_quality=False)
    real = disk_bytes(model)
    assert abs(sol.predicted_bytes - real) / real < 0.01
    assert sol.predicted_bytes > real * 0.998


def test_solver_fills_the_size_budget_by_kl_saved_per_byte():
    model = tiny_llama(layers=4)
    names = [name for name, _ in quantize_targets(model)]
    scores = {name: (10.0 if "down_proj" in name else 0.1) for name in names}
    fmt = {"bits": 8, "threshold": 6.0}
    base = estimate_bytes(model, fmt, "bf16")
    down = solve(model, fmt, "bf16", scores, keep=1.0, size_limit=base + 40_000)
    assert {n for n in names if "down_proj" in n} <= set(down.kept)  # the most KL per byte first ...
    assert len(down.kept) < len(names) // 2  # ... then whatever small module still fits
    assert down.predicted_bytes <= base + 40_000
    assert solve(model, fmt, "bf16", scores, keep=0.0, size_limit=base + 40_000).kept == []
    assert down.skip_modules[0] == "lm_head"
    everything = solve(model, fmt, "bf16", scores, keep=1.0)
    assert len(everything.kept) == len(names) - 1  # one module stays quantized (else it is the bf16 point)
