"""The distill stage's config: defaults, strict fields, refusals."""

from __future__ import annotations


import pytest

from hfsqueeze.core.errors import RecipeError
from hfsqueeze.methods.distill import DistillConfig
from hfsqueeze.recipe import Recipe
from distillkit import _one_thread  # noqa: F401  (autouse: one torch thread per module)




# ---- config -------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_defaults():
    cfg = DistillConfig.from_dict({
        "teacher": "previous", "student": {"keep": 0.5}, "hidden_states": {"weight": 0.1, "layer_map": [1, 3]},
        "data": [{"text": "builtin"}, {"text": "x.jsonl", "task": "sequence_classification", "weight": 0.5}],
        "training_args": {"max_steps": 3},
    })
    again = Recipe.load({"stages": [cfg.to_dict()]}).stages[0]
    assert again.to_dict() == cfg.to_dict()
    assert again.snapshot_needed() == "previous"
    assert DistillConfig().snapshot_needed() == "original"
    assert DistillConfig(teacher="some/model").snapshot_needed() is None
    assert [t.task for t in again.tasks] == ["causal_lm", "sequence_classification"]


@pytest.mark.parametrize("bad, message", [
    ({"alpha": 1.5}, "key 'alpha': got 1.5; must be between 0 and 1"),
    ({"temperature": 0}, "key 'temperature': got 0.0; must be > 0"),
    ({"training_args": {"max_step": 3}}, "unknown TrainingArguments field 'max_step'; similar: .*max_steps"),
    ({"training_args": {"output_dir": "x"}}, "'output_dir' is set by the stage"),
    ({"student": {"layers": [0], "keep": 2}}, "give exactly one of 'layers', 'keep' or 'config'"),
    ({"student": {"keep": 1.5}}, "key 'keep': got 1.5"),
    ({"data": {"task": "mlm"}}, "key 'data': key 'task': got 'mlm'; allowed: 'causal_lm' | 'sequence_classification'"),
    ({"data": [{"weight": 0}]}, r"key 'data\[0\]': key 'weight': got 0.0; must be > 0"),
    ({"tempreature": 2}, r"unknown key 'tempreature' \(did you mean 'temperature'\?\); allowed keys: .*temperature"),
])
def test_config_errors_name_key_value_and_allowed(bad, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.load({"stages": [{"method": "distill", **bad}]})
