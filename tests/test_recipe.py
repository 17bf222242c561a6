import pytest
import yaml

from hfsqueeze import Recipe, RecipeError
from hfsqueeze.recipe import RECIPES_DIR
from hfsqueeze.registry import available_stages, get_stage, register_stage
from hfsqueeze.methods.quantize import QuantizeConfig


def test_builtin_recipes_round_trip_identically():
    paths = sorted(RECIPES_DIR.glob("*.yaml"))
    assert {"int8", "nf4", "fp4", "bf16", "fp16"} <= {p.stem for p in paths}
    for path in paths:
        first = Recipe.load(path)
        again = Recipe.load(yaml.safe_load(first.to_yaml()))
        assert again.to_dict() == first.to_dict(), path
        assert Recipe.load(again.to_yaml()).to_yaml() == first.to_yaml()


@pytest.mark.parametrize(
    "stage",
    [
        {"bits": 8}, {"bits": 8, "threshold": 0.0, "skip_modules": ["lm_head", "mlp.down_proj"]},
        {"bits": 4}, {"bits": 4, "quant_type": "fp4", "double_quant": True, "compute_dtype": "bfloat16"},
        {"bits": 16}, {"bits": 16, "dtype": "fp16"},
    ],
)
def test_quantize_config_round_trip(stage):
    cfg = QuantizeConfig.from_dict(stage)
    assert QuantizeConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "method"}) == cfg
    assert cfg.to_dict()["method"] == "quantize"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stages": [{"method": "quantize", "bits": 3}]}, "stage 1 (quantize): key 'bits': got 3; allowed: 4 | 8 | 16"),
        ({"stages": [{"method": "quantize", "bitz": 8}]},
         "stage 1 (quantize): unknown key 'bitz' (did you mean 'bits'?); allowed keys:"),
        ({"stages": [{"method": "quantize", "bits": "eight"}]}, "key 'bits': got 'eight'"),
        ({"stages": [{"method": "quantize", "bits": 8}, {"method": "squash"}]}, "stage 2: unknown method 'squash'"),
        ({"stages": [{"method": "quantize", "bits": 8, "quant_type": "nf4"}]}, "'quant_type': only applies to bits: 4"),
        ({"stages": [{"method": "quantize", "bits": 8, "threshold": -1}]}, "'threshold': got -1.0; must be a finite"),
        ({"stages": [{"method": "quantize", "bits": 8, "threshold": float("nan")}]}, "'threshold': got nan; must be a"),
        ({"stages": [{"method": "quantize", "bits": 8, "threshold": float("inf")}]}, "'threshold': got inf; must be a"),
        ({"stages": [{"bits": 8}]}, "stage 1: missing key 'method'"),
        ({"stages": []}, "needs 'stages'"),
        ({"stages": [{"method": "quantize"}], "evaluaton": {}}, "recipe: unknown key 'evaluaton'"),
        ({"stages": [{"method": "quantize"}], "evaluation": {"max_tokens": 0}}, "key 'max_tokens': got 0"),
    ],
)
def test_bad_recipes_give_one_clear_line(data, message):
    with pytest.raises(RecipeError) as err:
        Recipe.load(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides():
    r = Recipe.load("int8", overrides=["quantize.threshold=5.0", "evaluation.max_tokens=512"])
    assert r.stages[0].threshold == 5.0 and r.evaluation.max_tokens == 512
    two = {"stages": [{"method": "quantize", "bits": 16}, {"method": "quantize", "bits": 8}]}
    assert Recipe.load(two, overrides=["stages.2.bits=4"]).stages[1].bits == 4
    with pytest.raises(RecipeError, match="has 2 'quantize' stages"):
        Recipe.load(two, overrides=["quantize.bits=4"])
    with pytest.raises(RecipeError, match="'prune' is not a stage of this recipe"):
        Recipe.load("int8", overrides=["prune.heads=0.1"])
    with pytest.raises(RecipeError, match="must look like key.path=value"):
        Recipe.load("int8", overrides=["quantize.bits"])
    with pytest.raises(RecipeError, match="got 3"):
        Recipe.load("int8", overrides=["quantize.bits=3"])


def test_recipe_sources(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - method: quantize\n    bits: 4\n")
    from_file = Recipe.load(path)
    assert from_file.stages[0].quant_type == "nf4"
    assert Recipe.load(from_file).to_dict() == from_file.to_dict()
    assert Recipe.load(str(path)).to_dict() == from_file.to_dict()
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(bad)
    with pytest.raises(RecipeError, match="recipe not found"):
        Recipe.load(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="must be a Recipe"):
        Recipe.load(42)


def test_registry_refuses_duplicates_and_lists_names():
    assert "quantize" in available_stages()
    with pytest.raises(ValueError, match="already registered"):
        register_stage("quantize", QuantizeConfig)(lambda m, c, x: {})
    with pytest.raises(RecipeError, match="allowed: .*quantize"):
        get_stage("nope")


def test_recover_override_at_top_level():
    recipe = {"stages": [{"method": "prune", "heads": 0.25}]}
    assert Recipe.load(recipe, overrides=["recover=auto"]).recover == "auto"
    loaded = Recipe.load(recipe, overrides=["recover.training_args.max_steps=5"])
    assert loaded.recover == {"training_args": {"max_steps": 5}}


def test_recover_on_a_prune_stage_inserts_recovery_after_it():
    recipe = Recipe.load({"stages": [{"method": "prune", "heads": 0.25, "recover": "auto"},
                                     {"method": "quantize", "bits": 8}]})
    expanded = recipe.expanded()
    assert [s.method for s in expanded.stages] == ["prune", "distill", "quantize"]
    assert expanded.stages[1].teacher == "original" and expanded.stages[0].recover is None
    assert [s.method for s in expanded.expanded().stages] == ["prune", "distill", "quantize"]  # idempotent


def test_a_recipe_too_large_or_too_deep_is_one_line_before_parsing(tmp_path):
    """Recipes are a few KB: a 300 KB file (here: a valid recipe padded with comments) and nesting 5000 deep (a
    RecursionError inside PyYAML before) are refused in one line; so is a Python dict nested that deep."""
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 30_000 + "stages: [{method: quantize, bits: 8}]\n")
    deep_yaml = "stages: " + "[" * 5000 + "]" * 5000 + "\n"
    deep_dict: dict = {"stages": [{"method": "quantize"}], "evaluation": {}}
    cursor = deep_dict["evaluation"]
    for _ in range(5000):
        cursor["x"] = {}
        cursor = cursor["x"]
    for source, message in [(big, "is 293 KiB; a recipe is at most 256 KiB"),
                            (deep_yaml, "nested deeper than 32 levels"),
                            (deep_dict, "recipe is nested deeper than 32 levels")]:
        with pytest.raises(RecipeError) as err:
            Recipe.load(source)
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="too large for a recipe"):
        Recipe.load("stages: [{method: quantize}]\n" + "#" * 300_000)
