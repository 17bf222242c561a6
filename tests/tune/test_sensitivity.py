"""`hfsqueeze.tune` sensitivity: per-module scores, replayed exactly and cached."""

from __future__ import annotations

import pytest
import torch

from hfsqueeze.tune.sensitivity import SensitivityCache, score_modules, sensitivities
from hfsqueeze.tune.space import quantize_targets
from tunekit import _own_cache  # noqa: F401  (autouse: a sensitivity cache per test)
from tunekit import tiny_llama




# ---- sensitivity --------------------------------------------------------------------------------------------
def test_sensitivity_replay_is_exact_and_cached(tiny_tokenizer, tmp_path, monkeypatch):
    from hfsqueeze.core.data import load_texts, token_blocks
    from hfsqueeze.tune import sensitivity as sens_mod

    model = tiny_llama(layers=3)
    blocks = token_blocks(tiny_tokenizer, load_texts("builtin", split="train"), max_tokens=128, seq_len=64)
    scores = score_modules(model, blocks, {"bits": 4, "quant_type": "nf4"})
    # The same module scored with a full forward pass (no replay of the earlier layers) gives the same KL.
    name = "model.layers.2.mlp.down_proj"
    monkeypatch.setattr(sens_mod, "find_layers", lambda m: None)
    full = score_modules(model, blocks, {"bits": 4, "quant_type": "nf4"})
    assert scores[name] == pytest.approx(full[name], rel=1e-4) and scores[name] > 0
    assert all(type(m) is torch.nn.Linear for _, m in quantize_targets(model))  # the model is left unchanged
    monkeypatch.undo()

    cache = SensitivityCache([tmp_path / "s.json"])
    first = sensitivities(model, blocks, [{"bits": 8}], cache)
    monkeypatch.setattr(sens_mod, "score_modules", lambda *a, **k: pytest.fail("scored twice"))
    again = sensitivities(model, blocks, [{"bits": 8, "threshold": 2.0}], cache)  # same base format: cached
    assert again["int8"]["cached"] and again["int8"]["scores"] == first["int8"]["scores"]
