"""`hfsqueeze.tune` search spaces: the built-in spaces, space files, drawn points."""

from __future__ import annotations

import pytest
import yaml

import hfsqueeze
from hfsqueeze import RecipeError
from hfsqueeze.tune import load_space
from hfsqueeze.tune.space import plan_of
from tunekit import _own_cache  # noqa: F401  (autouse: a sensitivity cache per test)




# ---- spaces -------------------------------------------------------------------------------------------------
def test_builtin_spaces():
    assert set(load_space("quantize").sections) == {"quantize"}
    assert set(load_space("all").sections) == {"quantize", "prune", "recover"}
    flat = load_space("all").flat()
    assert flat["quantize.threshold"].when == {"quantize.bits": (8,)}
    assert flat["recover.training_args.max_steps"].when == {"recover.enabled": (True,), "prune.enabled": (True,)}
    assert flat["prune.heads"].when == {"prune.enabled": (True,)}  # the prune stage's own space, behind a switch


@pytest.mark.parametrize("body, message", [
    ({"quantise": {"bits": [8]}}, "unknown section 'quantise'; allowed: quantize, prune, recover"),
    ({"quantize": {"bitz": [8]}}, "unknown key 'bitz'; allowed keys:"),
    ({"quantize": {"bits": [8, 3]}}, "key 'bits'[1]: got 3; allowed: 4 | 8 | 16"),
    ({"quantize": {"quant_type": {"low": 1, "high": 2}}}, "a range needs a numeric key"),
    ({"quantize": {"threshold": {"low": 6, "high": 1}}}, "low 6.0 is above high 1.0"),
    ({"quantize": {"threshold": {"low": 1, "hi": 6}}}, "a range needs low and high"),
    ({"quantize": {"threshold": []}}, "an empty list of choices"),
    ({"quantize": {"keep": {"low": 0.0, "high": 2.0}}}, "within 0..1"),
    ({"quantize": {"skip_modules": ["x"]}}, "unknown key 'skip_modules'"),
    ({"quantize": "int8"}, "must be a mapping"),
    ({"recover": {"enabled": [True]}}, "needs a 'prune' section"),
    ({"prune": {"enabled": True, "heads": 0.1}, "recover": {"max_steps": [5]}},
     "unknown key 'max_steps'; allowed keys: alpha, enabled, temperature, training_args.max_steps"),
    ({"prune": {"enabled": True, "heads": 0.1}, "recover": {"training_args.max_steps": [5.5]}},
     "got 5.5; expected int"),
    ([1, 2], "expected a mapping of sections"),
])
def test_space_yaml_is_validated_strictly(tmp_path, body, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(RecipeError) as info:
        load_space(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


_RECOVER = "prune:\n  enabled: true\n  heads: [0.25]\nrecover:\n  enabled: true\n"


@pytest.mark.parametrize("text, message", [
    ("quantize:\n  bits: [8]\n  bits: [4]\n", "duplicate key 'bits' (first given on line 2)"),
    ("quantize:\n  threshold: {low: 1.0, high: 6.0}\n",
     "quantize: this section searches nothing: 'threshold' apply only when bits is 8, and the section does not set "
     "bits; add bits: 8"),
    ("prune:\n  heads: {low: 0.0, high: 0.25}\n", "prune: this section searches nothing: 'heads' apply only when "
     "enabled is true, and the section does not set enabled; add enabled: true"),
    ("quantize:\n  bits: [16, 8]\n  quant_type: [nf4]\n",
     "key 'quant_type' is never searched: it applies only when bits is 4, and bits allows only 16, 8 here"),
    ("prune:\n  enabled: [true, false]\n  heads: [0.0]\n  steps: [2]\n",
     "prune: this section searches nothing: the prune stage refuses every point of it (key 'heads': nothing to "
     "prune"),
    ("quantize:\n  bits: [8]\n  threshold: {low: .nan, high: 6.0}\n", "key 'threshold': low must be a finite number; "
     "got nan"),
    ("quantize:\n  bits: [8]\n  threshold: [2.0, .inf]\n", "key 'threshold'[1]: got inf; expected a finite number"),
    ("quantize:\n  bits: [8]\n  threshold: {low: 1.0, high: 6.0, step: .nan}\n", "step must be a positive number"),
    ("quantize:\n  bits: [8, 4]\n  threshold: {low: -1.0, high: 6.0}\n",
     "quantize: key 'threshold': got -1.0; must be a finite number >= 0"),
    ("prune:\n  enabled: true\n  heads: {low: 0.0, high: 5.0}\n",
     "prune: key 'heads': got 5.0; a fraction must be in [0, 1), or give a count as an integer (in the range "
     "0.0..5.0)"),
    ("prune:\n  enabled: true\n  heads: [0, 0.25]\n  steps: [1, 0]\n", "prune: key 'steps': got 0; must be >= 1"),
    (_RECOVER + "  training_args.max_steps: [-5]\n", "recover: key 'training_args.max_steps': got -5; must be > 0"),
    (_RECOVER + "  alpha: {low: 0.5, high: 1.5}\n", "recover: key 'alpha': got 1.5; must be between 0 and 1"),
])
def test_space_yaml_refuses_what_no_trial_could_run(tmp_path, text, message):
    """Duplicate keys, keys no trial would draw, non-finite numbers and values the stage's own config refuses: one
    line each, the way recipes are refused."""
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_space(str(path))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_space_yaml_accepts_zero_amounts_and_every_stage_key(tmp_path):
    """A zero amount is a point without pruning (the stage is left out), not an error; every declared key passes."""
    path = tmp_path / "space.yaml"
    path.write_text("quantize: {bits: [16, 8, 4], dtype: [bf16, fp16], threshold: {low: 0.0, high: 8.0}, "
                    "quant_type: [nf4, fp4], double_quant: [false, true], compute_dtype: [float32, bfloat16], "
                    "rest_dtype: [fp32, bf16], keep: {low: 0.0, high: 1.0}}\n"
                    "prune: {enabled: [false, true], heads: [0, 2, 0.25], ffn: {low: 0.0, high: 0.5}, steps: [1, 2]}\n"
                    "recover: {enabled: [false, true], training_args.max_steps: {low: 5, high: 50, log: true}}\n")
    assert set(load_space(str(path)).flat()) >= {"quantize.compute_dtype", "prune.heads",
                                                  "recover.training_args.max_steps"}


def test_space_yaml_choices_ranges_and_fixed_values(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("quantize:\n  bits: [8, 4]\n  threshold: {low: 1, high: 6, step: 0.5}\n  rest_dtype: bf16\n")
    space = load_space(str(path))
    flat = space.flat()
    assert flat["quantize.bits"].choices == (8, 4)
    assert flat["quantize.threshold"].low == 1.0 and flat["quantize.threshold"].when == {"quantize.bits": (8,)}
    assert flat["quantize.rest_dtype"].choices == ("bf16",)  # a plain value: fixed, never drawn
    assert type(space).from_dict(space.to_dict()).to_dict() == space.to_dict()


def test_point_to_explicit_recipe():
    plan = plan_of({"quantize.bits": 4, "quantize.quant_type": "nf4", "quantize.double_quant": True,
                    "quantize.compute_dtype": "bfloat16", "quantize.rest_dtype": "bf16", "quantize.keep": 0.5,
                    "prune.enabled": True, "prune.heads": 0.25, "prune.ffn": 0.0, "prune.importance": "magnitude",
                    "recover.enabled": True, "recover.training_args.max_steps": 5, "recover.alpha": 1.0})
    stages = plan.stages(["lm_head", "model.layers.0.mlp.down_proj"])
    assert stages == [
        {"method": "prune", "heads": 0.25, "ffn": 0.0, "importance": "magnitude",
         "recover": {"training_args": {"max_steps": 5}, "alpha": 1.0}},
        {"method": "quantize", "bits": 16, "dtype": "bf16"},
        {"method": "quantize", "bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
         "skip_modules": ["lm_head", "model.layers.0.mlp.down_proj"]},
    ]
    hfsqueeze.Recipe.load({"stages": stages})  # a valid recipe
    assert plan_of({"prune.enabled": True, "prune.heads": 0.0, "prune.ffn": 0.0}).pre_stages == []
