"""Recovery expansion: a stage's ``recover`` field becomes explicit distill stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from hfsqueeze.core.errors import RecipeError
from hfsqueeze.methods.distill import DistillConfig, expand_recovery
from hfsqueeze.recipe import Recipe
from distillkit import FAST, SMALL_EVAL, tiny_llama
from distillkit import _one_thread  # noqa: F401  (autouse: one torch thread per module)




# ---- recovery expansion -------------------------------------------------------------------------------------------


@dataclass
class _FakePrune:
    method: str = "prune"
    recover: Any = None


@dataclass
class _FakeRecipe:
    stages: list
    recover: Any = None


def test_expand_recovery_inserts_after_pruning_and_is_idempotent():
    quantize = Recipe.load({"stages": [{"method": "quantize", "bits": 8}]}).stages[0]
    recipe = _FakeRecipe([_FakePrune(), quantize], recover="auto")
    expanded = expand_recovery(recipe)
    assert [s.method for s in expanded.stages] == ["prune", "distill", "quantize"]
    assert expanded.stages[1].teacher == "original" and expanded.recover is None
    assert expand_recovery(expanded).stages == expanded.stages
    assert [s.method for s in recipe.stages] == ["prune", "quantize"]  # the input is untouched

    own = expand_recovery(_FakeRecipe([_FakePrune(recover={"training_args": {"max_steps": 7}}), _FakePrune()]))
    assert [s.method for s in own.stages] == ["prune", "distill", "prune"]
    assert own.stages[1].training_args["max_steps"] == 7
    assert own.stages[1].training_args["per_device_train_batch_size"] == 4
    off = expand_recovery(_FakeRecipe([_FakePrune(recover="none"), _FakePrune()], recover="auto"))
    assert [s.method for s in off.stages] == ["prune", "prune", "distill"]
    explicit = _FakeRecipe([_FakePrune(), DistillConfig(teacher="original")], recover="auto")
    assert [s.method for s in expand_recovery(explicit).stages] == ["prune", "distill"]
    with pytest.raises(RecipeError, match="key 'recover': got 'sometimes'; allowed: auto, none, or a mapping"):
        expand_recovery(_FakeRecipe([_FakePrune(recover="sometimes")]))
    with pytest.raises(RecipeError, match="unknown key 'max_steps'"):
        expand_recovery(_FakeRecipe([_FakePrune()], recover={"max_steps": 5}))


def test_compress_recover_auto_inserts_recovery_after_pruning(tiny_tokenizer):
    import hfsqueeze

    model = tiny_llama(4, initializer_range=0.2)  # peaked outputs: pruning moves them, recovery brings them back
    recipe = {
        "evaluation": SMALL_EVAL,
        "recover": {"block_size": 64, "data": {"text": "builtin", **FAST},
                    "training_args": {"max_steps": 8, "learning_rate": 1e-3}},
        "stages": [{"method": "prune", "heads": 0.5, "ffn": 0.5, "importance": "magnitude"}],
    }
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    assert [s.method for s in report.stages] == ["prune", "distill"]
    assert "recover" not in report.recipe and report.recipe["stages"][1]["teacher"] == "original"
    d = report.stages[1].details
    assert d["teacher"] == "original" and d["steps"] == 8 and report.recipe["stages"][1]["alpha"] == 1.0
    # Pure distillation: recovery brings the pruned model closer to the original.
    points = d["quality"]["held-out: causal_lm"]
    assert points["saved"]["kl_divergence"] < points["before"]["kl_divergence"] and d["kept"] == "recovered"
