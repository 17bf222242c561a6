"""`hfsqueeze tune` on tiny models: budgets, spaces, sensitivity, the solver, the study, its output and robustness."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import outputs, reload_outputs_in_fresh_process

import hfsqueeze
from hfsqueeze import RecipeError
from hfsqueeze.cli import main as cli_main
from hfsqueeze.evaluation.measure import disk_bytes
from hfsqueeze.models import load_model
from hfsqueeze.tune import Budget, InfeasibleBudgetError, load_space
from hfsqueeze.tune import study as study_mod
from hfsqueeze.tune import tuner as tuner_mod
from hfsqueeze.tune.sensitivity import SensitivityCache, score_modules, sensitivities
from hfsqueeze.tune.solve import estimate_bytes, solve
from hfsqueeze.tune.space import plan_of, quantize_targets

pytest.importorskip("optuna")

IDS = torch.randint(5, 400, (1, 24), generator=torch.Generator().manual_seed(3))
# Small enough that a trial takes about a second on one core.
SETTINGS = {"calibration_tokens": 256, "seq_len": 128, "sensitivity_tokens": 128, "prompt_tokens": 16,
            "decode_tokens": 2, "latency_rounds": 1}


def tiny_llama(layers: int = 2):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test gets its own sensitivity cache (``$HFSQUEEZE_CACHE/sensitivity``)."""
    monkeypatch.setenv("HFSQUEEZE_CACHE", str(tmp_path / "cache"))


# The final re-measurement on the held-out text, small too.
EVALUATION = {"max_tokens": 256, "seq_len": 128, "prompt_tokens": 16, "decode_tokens": 4, "repeats": 1}


def run_tune(model, tok, out, **kwargs):
    kwargs.setdefault("budget", "size=0.5")
    kwargs.setdefault("trials", 4)
    return hfsqueeze.tune(model, tok, output=out, settings=SETTINGS, evaluation=EVALUATION, **kwargs)


# ---- budgets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, minimize, limits", [
    ("size=0.30", "kl", {"size": 0.30}),
    ("size=150MiB", "kl", {"size_bytes": 150 * 2**20}),
    ("size=1.5GB,ppl=+1%", "kl", {"size_bytes": 1.5e9, "ppl": 0.01}),
    ("bits=4.5", "kl", {"bits": 4.5}),
    ("prefill=0.6, kl=0.05", "kl", {"prefill": 0.6, "kl": 0.05}),
    ("kl=0.005", "size", {"kl": 0.005}),
    ("ppl=2%", "decode", {"ppl": 0.02}),
    ("top1=0.95,size=0.5", "prefill", {"top1": 0.95, "size": 0.5}),
])
def test_budget_parses(text, minimize, limits):
    budget = Budget.parse(text, minimize)
    assert budget.limits == pytest.approx(limits)
    assert budget.describe() and budget.to_dict()["minimize"] == minimize


@pytest.mark.parametrize("text, minimize, message", [
    ("size", "kl", "expected key=value"),
    ("size=abc", "kl", "expected a fraction of the original"),
    ("size=1.5", "kl", "must be <= 1"),
    ("size=10furlongs", "kl", "unknown unit 'furlongs'"),
    ("speed=2", "kl", "unknown key 'speed'"),
    ("ppl=1.01", "kl", "increase in percent"),
    ("kl=-1", "size", "must be a positive number"),
    ("top1=2", "size", "must be in (0, 1]"),
    ("size=0.3,size=0.4", "kl", "given twice"),
    ("kl=0.01", "kl", "minimizing KL needs a size or latency limit"),
    ("size=0.3", "size", "needs a quality limit"),
    ("size=0.3", "speed", "allowed: kl, size, prefill, decode"),
])
def test_budget_errors_are_one_line(text, minimize, message):
    with pytest.raises(RecipeError, match=None) as info:
        Budget.parse(text, minimize)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text, described", [
    ("size=1e-5MiB", "size<=10.49B"),
    ("size=150MiB", "size<=150MiB"),
    ("size=149.5MiB,ppl=+1%", "size<=149.5MiB, ppl<=+1%"),
    ("size=1.5GB", "size<=1.397GiB"),
    ("size=0.00001", "size<=1e-05x"),
])
def test_budget_is_described_with_its_significant_digits(text, described):
    assert Budget.parse(text).describe() == described


def test_budget_constraints_and_size_limit():
    budget = Budget.parse("size=0.5,ppl=+2%,top1=0.9")
    m = {"size": 0.4, "disk_bytes": 40, "ppl": 1.03, "top1": 0.95, "kl": 0.01}
    c = budget.constraints(m)
    assert c["size"] < 0 and c["ppl"] == pytest.approx(0.01) and c["top1"] < 0
    assert Budget.parse("size=0.5,bits=8").size_limit_bytes(1000, 100) == 100  # 8 bits x 100 params < 500 bytes


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


# ---- the whole search ---------------------------------------------------------------------------------------
def test_tune_end_to_end_output_and_reproduction(tiny_tokenizer, tmp_path):
    model = tiny_llama()
    before = outputs(model, IDS)
    result = run_tune(model, tiny_tokenizer, tmp_path / "tuned", budget="size=0.5", trials=6)
    torch.testing.assert_close(outputs(model, IDS), before)  # the original is untouched
    out = tmp_path / "tuned"
    for name in ("config.json", "model.safetensors", "recipe.yaml", "report.json", "README.md",
                 "tuning/study.journal", "tuning/trials.jsonl", "tuning/sensitivity.json", "tuning/pareto.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    tuning = report["tuning"]
    assert tuning["budget"]["limits"] == {"size": 0.5} and tuning["objectives"] == ["kl", "size"]
    assert len(tuning["trials"]) == 6 and tuning["pareto"] and tuning["chosen"] in tuning["pareto"]
    chosen = next(t for t in tuning["trials"] if t["number"] == tuning["chosen"])
    assert chosen["feasible"] and chosen["metrics"]["size"] <= 0.5
    # Never worse than a uniform stock recipe that fits the budget.
    uniform = [t for t in tuning["trials"] if t["kind"].startswith("uniform:") and t["feasible"]]
    assert all(chosen["metrics"]["kl"] <= t["metrics"]["kl"] for t in uniform)
    assert report["final"]["disk_bytes"] <= 0.5 * tuning["original"]["disk_bytes"]
    assert "## Tuning" in (out / "README.md").read_text() and "tuning/pareto.png" in (out / "README.md").read_text()
    lines = (out / "tuning/trials.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["stages"] for line in lines)

    # recipe.yaml is explicit (plain values, no ranges) and reproduces the artifact from the original.
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["stages"] == chosen["stages"]
    assert not any(isinstance(v, dict) for s in recipe["stages"] for v in s.values())
    again = tiny_llama()
    hfsqueeze.compress(again, str(out / "recipe.yaml"), measure_quality=False)
    reloaded = hfsqueeze.load_compressed(out)
    torch.testing.assert_close(outputs(again, IDS), outputs(reloaded, IDS))
    torch.testing.assert_close(outputs(result.model, IDS), outputs(reloaded, IDS))
    assert result.recipe["stages"] == chosen["stages"] and result.pareto


def test_tuning_never_reads_eval_tokens(tiny_tokenizer, tmp_path, monkeypatch):
    """The search (pruning, recovery training and quantization trials included) only reads the calibration split;
    the held-out split is read once the search is over, to re-measure the chosen point."""
    calls, searching = [], [True]
    real_finish = tuner_mod._finish

    def recording(name, real):
        def text(split="eval", *args, **kwargs):
            calls.append(("eval" if name == "bible_text" else split, searching[0]))
            return real(split, *args, **kwargs) if name == "builtin_text" else real(*args, **kwargs)

        return text

    def finish(*args, **kwargs):
        searching[0] = False
        return real_finish(*args, **kwargs)

    # Every module's binding of the built-in texts (the held-out pydoc split, and the Bible text used only for
    # evaluation), wherever it was imported.
    for module in [m for name, m in sys.modules.items() if name.startswith("hfsqueeze") and m is not None]:
        for name in ("builtin_text", "bible_text"):
            if callable(getattr(module, name, None)):
                monkeypatch.setattr(module, name, recording(name, getattr(module, name)))
    monkeypatch.setattr(tuner_mod, "_finish", finish)
    space = {"quantize": {"bits": 8, "threshold": [6.0, 2.0], "rest_dtype": "fp32", "keep": 0.0},
             "prune": {"enabled": True, "heads": 0.25, "importance": "gradient", "calibration_tokens": 128,
                       "seq_len": 64},
             "recover": {"enabled": True, "training_args.max_steps": 1}}
    result = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", space=space, budget="size=0.9", trials=2)
    assert any(r["state"] == "COMPLETE" for r in result.trials)
    assert any(s["method"] == "distill" for s in result.recipe["stages"])  # recovery really ran
    assert ("eval", True) not in calls and ("train", True) in calls
    assert ("eval", False) in calls  # ... and the chosen point was re-measured on the held-out split


def test_failing_trial_is_recorded_not_raised(tiny_tokenizer, tmp_path, monkeypatch):
    real = study_mod.run_point
    count = [0]

    def flaky(tctx, point):
        count[0] += 1
        if count[0] == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(tctx, point)

    monkeypatch.setattr(study_mod, "run_point", flaky)
    result = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", trials=4)
    failed = [r for r in result.trials if r["state"] == "FAIL"]
    assert len(failed) == 1 and "out of memory (simulated)" in failed[0]["error"]
    assert len([r for r in result.trials if r["state"] == "COMPLETE"]) == 3


def test_fp16_that_overflows_is_left_out_of_the_space(tiny_tokenizer, tmp_path, caplog):
    # A residual stream beyond float16's range (as Gemma-3's is): fine in fp32 (the norms scale it back), inf/NaN
    # in fp16. Before the check every fp16 trial failed with NaN.
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e7)
    space = {"quantize": {"bits": [8], "threshold": [6.0], "rest_dtype": ["fp16", "bf16"], "keep": [1.0]}}
    with caplog.at_level("WARNING", logger="hfsqueeze"):
        result = run_tune(model, tiny_tokenizer, tmp_path / "t", budget="size=0.9", space=space, trials=3)
    assert "overflows in float16" in caplog.text
    assert not [r for r in result.trials if r["state"] == "FAIL"]
    assert all("fp16" not in json.dumps(r["stages"]) for r in result.trials)
    with pytest.raises(RecipeError, match="overflows in float16"):
        run_tune(model, tiny_tokenizer, tmp_path / "u", budget="size=0.9", trials=2,
                 space={"quantize": {"bits": [8], "rest_dtype": ["fp16"]}})


def test_a_point_with_non_finite_outputs_is_a_failed_trial_that_says_so(tiny_tokenizer, tmp_path, monkeypatch):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e7)
    monkeypatch.setattr(tuner_mod, "fp16_overflows", lambda *a: False)  # as if the up-front check missed it
    space = {"quantize": {"bits": [8], "threshold": [6.0], "rest_dtype": ["fp16"], "keep": [1.0]}}
    with pytest.raises(InfeasibleBudgetError):
        run_tune(model, tiny_tokenizer, tmp_path / "t", budget="size=0.9", space=space, trials=1)
    records = [json.loads(line) for line in (tmp_path / "t" / "tuning" / "trials.jsonl").read_text().splitlines()]
    assert records and all(r["state"] == "FAIL" for r in records)
    assert "outputs are not finite" in records[0]["error"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped interrupt itself
def test_ctrl_c_that_python_drops_in_a_destructor_still_stops_the_search(tiny_tokenizer, tmp_path, monkeypatch):
    # A KeyboardInterrupt raised inside __del__ (a trial frees models; optuna collects garbage after each trial) is
    # printed and dropped by Python: the search used to run on to its last trial and report "done".
    real = study_mod.run_point
    count = [0]

    class SigintOnDelete:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes, still inside __del__
                pass

    def interrupted_in_a_destructor(tctx, point):
        count[0] += 1
        if count[0] == 2:
            SigintOnDelete()
        return real(tctx, point)

    monkeypatch.setattr(study_mod, "run_point", interrupted_in_a_destructor)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may start us with SIGINT ignored
    try:
        result = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", trials=8)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the search
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.stopped == "interrupted"
    assert count[0] <= 3


def test_time_budget_stops_cleanly(tiny_tokenizer, tmp_path):
    model = tiny_llama()
    start = time.time()
    run_tune(model, tiny_tokenizer, tmp_path / "first", trials=1)  # caches the sensitivities; times one trial
    one = time.time() - start
    start = time.time()
    result = run_tune(model, tiny_tokenizer, tmp_path / "t", trials=500, time_budget=2 * one)
    assert result.stopped == "time budget" and 1 <= len(result.trials) < 500
    assert time.time() - start < 6 * one and (tmp_path / "t" / "model.safetensors").is_file()


def test_time_budget_bounds_the_sensitivity_pass(tiny_tokenizer, tmp_path, caplog):
    """Scoring stops at the deadline: what was scored is kept, the rest is named and gets the mean, nothing cached."""
    from hfsqueeze.core.data import load_texts, token_blocks

    model = tiny_llama()
    blocks = token_blocks(tiny_tokenizer, load_texts("builtin", split="train"), max_tokens=128, seq_len=64)
    names = [name for name, _ in quantize_targets(model)]
    deadline = time.time() + 5.0

    def spend_the_budget(done: int, total: int) -> None:
        if done == 3:  # the budget runs out while the third module is scored
            time.sleep(max(0.0, deadline - time.time()) + 0.01)

    assert list(score_modules(model, blocks, {"bits": 8}, spend_the_budget, deadline=deadline)) == names[:3]
    cache = SensitivityCache([tmp_path / "s.json"])
    with caplog.at_level("WARNING", logger="hfsqueeze"):
        entry = sensitivities(model, blocks, [{"bits": 8}], cache, deadline=time.time() - 1)["int8"]
    assert entry["unscored"] == names and set(entry["scores"]) == set(names)
    assert f"time budget ran out during the sensitivity pass: int8 scored 0 of {len(names)} modules" in caplog.text
    # A pass cut short is kept as an interrupted one (what --resume continues), never reused as if complete.
    again = sensitivities(model, blocks, [{"bits": 8}], cache)["int8"]
    assert not again["cached"] and "unscored" not in again and set(again["scores"]) == set(names)


def test_tune_time_budget_includes_the_sensitivity_pass(tiny_tokenizer, tmp_path, monkeypatch):
    """A budget spent before the sensitivity pass ends: it stops there, the report says how many were not scored."""
    from hfsqueeze.tune import sensitivity as sens_mod

    real = sens_mod.score_modules
    seen = {}

    def slow(model, blocks, fmt, progress=None, *, deadline=None, **kwargs):
        seen["deadline"] = deadline
        time.sleep(max(0.0, deadline - time.time()) + 0.05)  # the pass takes longer than the whole budget
        return real(model, blocks, fmt, progress, deadline=deadline, **kwargs)

    monkeypatch.setattr(sens_mod, "score_modules", slow)
    start = time.time()
    with pytest.raises(RecipeError, match=r"--time-budget ran out before any trial finished \(\d+s, the "
                                          r"sensitivity pass cut short\); give a longer time budget"):
        run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", trials=50, time_budget=3.0)
    assert seen["deadline"] == pytest.approx(start + 3.0, abs=1.0)
    assert time.time() - start < 30
    summary = json.loads((tmp_path / "t" / "tuning" / "summary.json").read_text())
    assert summary["sensitivity"]["int8"]["unscored"] == len(quantize_targets(tiny_llama()))


def test_tune_times_latency_only_when_the_budget_asks(tiny_tokenizer, tmp_path):
    result = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "size", budget="size=0.5", trials=2)
    assert result.report.tuning["settings"]["latency"] is False
    assert all((t.get("metrics") or {}).get("prefill") is None for t in result.trials)
    assert result.report.final.prefill_ms_per_token is None
    asked = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "prefill", budget="prefill=1000,kl=1.0", trials=2)
    assert asked.report.tuning["settings"]["latency"] is True
    assert any((t.get("metrics") or {}).get("prefill") is not None for t in asked.trials)


def test_infeasible_budget_names_the_closest_point(tiny_tokenizer, tmp_path):
    with pytest.raises(InfeasibleBudgetError, match=r"no point within the budget prefill<=0.01x after 2 trials; "
                                                    r"closest point found: #\d+ .*size 0\.\d+x, KL .*prefill"):
        run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", budget="prefill=0.01", trials=2)
    assert (tmp_path / "t" / "tuning" / "trials.jsonl").is_file()  # the trials are kept (resumable)


def test_points_predicted_over_the_size_budget_are_skipped_not_built(tiny_tokenizer, tmp_path, monkeypatch):
    """16-bit is 0.5x of fp32: under size=0.3 the exact size model rules it out before anything is built."""
    monkeypatch.setattr(study_mod, "run_point", lambda *a: pytest.fail("a point over the size budget was built"))
    space = {"quantize": {"bits": [16], "dtype": ["bf16", "fp16"]}}
    with pytest.raises(InfeasibleBudgetError, match=r"after 0 trials \(no trial finished; \d+ points were predicted "
                                                    r"over the size limit, the smallest at 0.50\dx\)"):
        run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", space=space, budget="size=0.3", trials=2)
    records = [json.loads(line) for line in (tmp_path / "t/tuning/trials.jsonl").read_text().splitlines()]
    assert records and all(r["skipped"].startswith("predicted size") and not r["feasible"] for r in records)
    assert all(r["metrics"]["size"] == pytest.approx(0.5, abs=0.01) for r in records)


def test_baselines_just_over_the_budget_are_not_queued(tiny_tokenizer, tmp_path):
    """A budget 0.1% under int8 with a bf16 rest: no int8 point with that rest can fit (the size model is exact), so
    none is queued; before the fix a 2% margin let them in, and a one-trial run on SmolLM2 ended infeasible."""
    from hfsqueeze.core.data import load_texts, token_blocks
    from hfsqueeze.tune.study import plan_baselines
    from hfsqueeze.tune.trial import TrialContext, TuneSettings

    model = tiny_llama()
    probe = copy.deepcopy(model)
    hfsqueeze.compress(probe, {"stages": [{"method": "quantize", "bits": 16}, {"method": "quantize", "bits": 8}]},
                       measure_quality=False)
    limit = int(disk_bytes(probe) * 0.999)
    blocks = token_blocks(tiny_tokenizer, load_texts("builtin", split="train"), max_tokens=64, seq_len=64)
    scores = {"scores": {}}
    tctx = TrialContext(model, tiny_tokenizer, "builtin", blocks, Budget.parse(f"size={limit}B"),
                        load_space("quantize"), TuneSettings(), {"int8": scores, "nf4": scores, "fp4": scores},
                        disk_bytes(model), sum(p.numel() for p in model.parameters()))
    kinds = [kind for kind, _, _ in plan_baselines(tctx, 100)]
    assert kinds and not [k for k in kinds if "int8" in k and "fp32" not in k]
    assert "uniform:nf4+bf16-rest" in kinds


def test_a_point_drawn_again_is_not_rebuilt(tiny_tokenizer, tmp_path, monkeypatch):
    """A space of two points: the sampler can only repeat them; repeats reuse the measurement and do not count."""
    real, built = study_mod.run_point, []

    def counting(tctx, point):
        built.append(point)
        return real(tctx, point)

    monkeypatch.setattr(study_mod, "run_point", counting)
    space = {"quantize": {"bits": 8, "threshold": [6.0, 2.0], "rest_dtype": "bf16", "keep": 0.0}}
    result = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", space=space, trials=3)
    measured = [r for r in result.trials if r["duplicate_of"] is None]
    assert len(built) == len(measured) == 2  # the third trial never comes: only two distinct points exist
    repeats = [r for r in result.trials if r["duplicate_of"] is not None]
    assert repeats and all(r["metrics"] == result.trials[r["duplicate_of"]]["metrics"] for r in repeats)
    assert len(result.pareto) == len({json.dumps(p["stages"]) for p in result.pareto})


def test_minimize_size_within_a_quality_budget(tiny_tokenizer, tmp_path):
    result = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", budget="kl=0.002", minimize="size", trials=5)
    assert result.chosen["metrics"]["kl"] <= 0.002
    feasible = [r for r in result.trials if r["feasible"]]
    assert result.chosen["metrics"]["size"] == min(r["metrics"]["size"] for r in feasible)


def test_output_checks_before_any_work(tiny_tokenizer, tmp_path):
    model = tiny_llama()
    run_tune(model, tiny_tokenizer, tmp_path / "t", trials=1)
    with pytest.raises(hfsqueeze.ArtifactError, match="holds a previous tuning run; pass --resume"):
        run_tune(model, tiny_tokenizer, tmp_path / "t", trials=1)
    with pytest.raises(hfsqueeze.ArtifactError, match="holds no tuning run"):
        run_tune(model, tiny_tokenizer, tmp_path / "new", trials=1, resume=True)
    with pytest.raises(RecipeError, match="another budget"):
        run_tune(model, tiny_tokenizer, tmp_path / "t", trials=2, resume=True, budget="size=0.4")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(hfsqueeze.ArtifactError, match="not empty"):
        run_tune(model, tiny_tokenizer, tmp_path / "foreign", trials=1)


@pytest.mark.parametrize("settings, message", [
    ({"calibration_tokns": 5}, "settings: unknown key 'calibration_tokns'; allowed: calibration_tokens"),
    ({"calibration_tokens": 0}, "key 'calibration_tokens': got 0; must be an integer >= 1"),
])
def test_bad_settings_fail_before_anything_is_written(tiny_tokenizer, tmp_path, settings, message):
    with pytest.raises(RecipeError) as info:
        hfsqueeze.tune(tiny_llama(), tiny_tokenizer, budget="size=0.5", output=tmp_path / "t", settings=settings)
    assert message in str(info.value) and not (tmp_path / "t").exists()


def test_a_failure_before_the_search_leaves_nothing_behind(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tuner_mod, "sensitivities", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_missing_optuna_names_the_pip_command(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(hfsqueeze.BackendMissingError, match=r"pip install 'optuna>=5'"):
        run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t")
    assert not (tmp_path / "t").exists()


# ---- CLI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--budget", "size=2x"], "budget size='2x'"),
    (["--budget", "kl=0.01"], "minimizing KL needs a size or latency limit"),
    (["--budget", "size=0.3", "--space", "nope.yaml"], "space 'nope.yaml': not a file"),
    (["--budget", "size=0.3", "--time-budget", "soon"], "--time-budget: got 'soon'"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    code = cli_main(["tune", *args, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("hfsqueeze: error:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setup, extra, message", [
    ("empty", ["--resume"], "holds no tuning run"),
    ("foreign", [], "is not empty"),
])
def test_cli_output_errors_come_before_loading_the_model(setup, extra, message, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    if setup == "foreign":
        (out / "thesis.txt").write_text("mine")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(hfsqueeze.models, "load_model", no_load)
    code = cli_main(["tune", "--budget", "size=0.5", "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == ([] if setup == "empty" else ["thesis.txt"])


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "trials: got 0; must be an integer >= 1"),
    (["--workers", "0"], "workers: got 0; must be an integer >= 1"),
    (["--workers", "100000"], "--workers 100000: at most {cpus} here: this machine gives this process {cpus} CPU"),
    (["--time-budget", "0"], "--time-budget: got '0'"),
])
def test_cli_tune_settings_are_checked_before_loading(args, message, tmp_path, capsys, monkeypatch):
    from hfsqueeze.tune.resources import usable_cpus

    monkeypatch.setattr(hfsqueeze.models, "load_model", _no_load)
    code = cli_main(["tune", "--budget", "size=0.5", "--model", str(tmp_path), *args,
                     "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message.format(cpus=usable_cpus()) in err, err
    assert not (tmp_path / "out").exists()


def test_cli_workers_are_bounded_by_memory_before_loading(tmp_path, capsys, monkeypatch):
    """Each worker loads its own model: the bound comes from the weight files on disk and the available memory."""
    from hfsqueeze.tune import resources

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"\0" * 2**20)  # only its size is read
    monkeypatch.setattr(resources, "usable_cpus", lambda: 64)
    monkeypatch.setattr(resources, "available_memory", lambda: 7 * 2**20)  # room for 3 workers x 2 copies
    monkeypatch.setattr(hfsqueeze.models, "load_model", _no_load)
    code = cli_main(["tune", "--budget", "size=0.5", "--model", str(model_dir), "--workers", "4",
                     "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert ("--workers 4: at most 3 here: each worker holds 2 copies of the model (the one it loads and the one a "
            "trial compresses), about 2MiB, and 7MiB of memory is available") in err
    assert not (tmp_path / "out").exists()


def test_api_workers_are_bounded_before_anything_is_written(tiny_tokenizer, tmp_path, monkeypatch):
    from hfsqueeze.tune import resources

    monkeypatch.setattr(resources, "usable_cpus", lambda: 1)
    with pytest.raises(RecipeError, match="workers 2: at most 1 here: this machine gives this process 1 CPU core$"):
        run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", workers=2)
    assert not (tmp_path / "t").exists()


def _cli_model_with_quick_tune(tmp_path, tiny_tokenizer, monkeypatch):
    """A tiny model directory for `hfsqueeze tune --model`, and tune patched to the tests' quick settings."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    real = tuner_mod.tune
    monkeypatch.setattr(tuner_mod, "tune", lambda *a, **k: real(*a, **{**k, "settings": SETTINGS,
                                                                      "evaluation": EVALUATION}))
    return tmp_path / "m"


def test_cli_disk_full_while_tuning_is_one_line(tiny_tokenizer, tmp_path, capsys, monkeypatch):
    _cli_model_with_quick_tune(tmp_path, tiny_tokenizer, monkeypatch)

    def disk_full(tuning, records):
        raise OSError(28, "No space left on device", str(tuning / "trials.jsonl"))

    monkeypatch.setattr(tuner_mod, "write_trials_jsonl", disk_full)
    out = tmp_path / "out"
    code = cli_main(["tune", "--model", str(tmp_path / "m"), "--budget", "size=0.5", "--trials", "1",
                     "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"hfsqueeze: error: tune failed on {out}/tuning/trials.jsonl (No space left on device); the trials finished "
        f"so far are kept in {out}/tuning/: make room and continue with --resume")


def test_short_calibration_text_is_warned_and_reported(tiny_tokenizer, tmp_path):
    text = tmp_path / "one-word.txt"
    text.write_text("hello")
    with pytest.warns(hfsqueeze.HfSqueezeWarning, match="calibration tokens") as caught:
        result = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", calibration=str(text), trials=1,
                          budget="size=0.9")
    calibration = result.report.tuning["calibration"]
    assert 0 < calibration["tokens"] < 256
    assert calibration["warning"] == str(caught[0].message)
    assert f"only {calibration['tokens']} calibration tokens (at least 256 recommended)" in calibration["warning"]
    saved = json.loads((tmp_path / "t" / "report.json").read_text())
    assert saved["tuning"]["calibration"]["warning"] == calibration["warning"]


def test_cli_tune_runs_and_shows_progress(tiny_tokenizer, tmp_path, capsys, monkeypatch):
    _cli_model_with_quick_tune(tmp_path, tiny_tokenizer, monkeypatch)
    code = cli_main(["tune", "--model", str(tmp_path / "m"), "--budget", "size=0.5", "--trials", "3",
                     "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tune: 3/3 trials" in captured.err and "best so far" in captured.err and "ETA" in captured.err
    assert "chosen:" in captured.out and (tmp_path / "out" / "tuning" / "pareto.png").is_file()


# ---- robustness across processes ----------------------------------------------------------------------------
KILLABLE = r"""
import json, sys, hfsqueeze
from hfsqueeze.models import load_model
model, tok = load_model(sys.argv[1])
hfsqueeze.tune(model, tok, budget="size=0.5", trials=int(sys.argv[3]), output=sys.argv[2],
               settings=json.loads(sys.argv[4]), evaluation=json.loads(sys.argv[5]))
"""


def _completed(out: Path) -> list[dict]:
    path = out / "tuning" / "trials.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"state": "COMPLETE"' in line]


def _tune_until_two_trials(tokenizer, tmp_path: Path, out: Path, *, trials: int, stderr) -> subprocess.Popen:
    """Start `KILLABLE` on a saved tiny Llama in a child process; return it once two trials are finished."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "m"), str(out), str(trials), json.dumps(SETTINGS), json.dumps(EVALUATION)]
    # As in a terminal: a shell without job control (CI scripts, `cmd &`) starts children with SIGINT ignored.
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while len(_completed(out)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_kill_9_then_resume_keeps_every_finished_trial(tiny_tokenizer, tmp_path):
    out = tmp_path / "out"
    proc = _tune_until_two_trials(tiny_tokenizer, tmp_path, out, trials=6, stderr=subprocess.DEVNULL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {r["number"]: r for r in _completed(out)}
    assert 2 <= len(first) < 6

    result = run_tune(load_model(str(tmp_path / "m"))[0], tiny_tokenizer, out, trials=6,
                      resume=True)
    done = {r["number"]: r for r in result.trials if r["state"] == "COMPLETE"}
    for number, record in first.items():  # every finished trial is still there, unchanged, and ran once
        assert done[number]["stages"] == record["stages"] and done[number]["metrics"] == record["metrics"]
    kinds = [r["kind"] for r in done.values() if r["kind"] != "search"]
    assert len(kinds) == len(set(kinds))
    assert len(done) == 6 - len([r for r in result.trials if r["state"] == "FAIL" and not r["interrupted"]])


@pytest.mark.slow
def test_ctrl_c_saves_the_best_so_far_then_resume_continues(tiny_tokenizer, tmp_path):
    out = tmp_path / "out"
    proc = _tune_until_two_trials(tiny_tokenizer, tmp_path, out, trials=200, stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads((out / "report.json").read_text())  # the best point so far, saved as a normal artifact
    assert report["tuning"]["stopped"] == "interrupted" and (out / "model.safetensors").is_file()
    finished = {r["number"] for r in _completed(out)}
    result = run_tune(load_model(str(tmp_path / "m"))[0], tiny_tokenizer, out, trials=len(finished) + 2, resume=True)
    assert result.stopped == "done"
    assert finished <= {r["number"] for r in result.trials if r["state"] == "COMPLETE"}


@pytest.mark.slow
def test_two_workers_share_one_study(tiny_tokenizer, tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    # Trials slow enough (latency timed 10 times) that the second process, which takes seconds to start, gets some.
    result = hfsqueeze.tune(model, tiny_tokenizer, budget="size=0.5", trials=12, output=tmp_path / "out", workers=2,
                            model_path=str(tmp_path / "m"),
                            settings={**SETTINGS, "latency": True, "latency_rounds": 10},
                            evaluation=EVALUATION)
    done = [r for r in result.trials if r["state"] == "COMPLETE"]
    assert 12 <= len(done) <= 13  # two processes may each start the last trial
    assert len({r["worker"] for r in done}) == 2, (tmp_path / "out/tuning/worker-1.log").read_text()[-2000:]
    assert len({json.dumps(r["stages"], sort_keys=True) for r in done if r["kind"] != "search"}) == len(
        [r for r in done if r["kind"] != "search"])  # no baseline ran twice


# ---- saved state: fingerprint, sensitivity cache, journal ------------------------------------------------------
def _one_ulp_up(model):
    with torch.no_grad():
        weight = model.model.layers[0].mlp.down_proj.weight.view(-1)
        weight[5] = torch.nextafter(weight[5], torch.tensor(float("inf")))
    return model


def test_fingerprint_sees_the_config_and_every_weight_byte(tmp_path):
    from hfsqueeze.tune.sensitivity import fingerprint

    model = tiny_llama()
    before = fingerprint(model)
    model.save_pretrained(tmp_path / "m")
    assert fingerprint(load_model(str(tmp_path / "m"))[0]) == before  # what a worker or a resume loads
    other = copy.deepcopy(model)
    other.config.rope_parameters = {**other.config.rope_parameters, "rope_theta": 20000.0}
    assert fingerprint(other) != before
    act = copy.deepcopy(model)
    act.config.hidden_act = "gelu"
    assert fingerprint(act) != before
    assert fingerprint(_one_ulp_up(copy.deepcopy(model))) != before


def _blocks(tokenizer, tokens: int = 64):
    from hfsqueeze.core.data import load_texts, token_blocks

    return token_blocks(tokenizer, load_texts("builtin", split="train"), max_tokens=tokens, seq_len=tokens)


def test_sensitivity_cache_is_not_reused_for_a_model_one_ulp_away(tiny_tokenizer, tmp_path):
    from hfsqueeze.tune.sensitivity import fingerprint

    model, blocks = tiny_llama(), _blocks(tiny_tokenizer)
    shared = SensitivityCache([tmp_path / "shared.json"])
    assert not sensitivities(model, blocks, [{"bits": 8}], shared)["int8"]["cached"]
    assert sensitivities(model, blocks, [{"bits": 8}], shared)["int8"]["cached"]
    changed = _one_ulp_up(copy.deepcopy(model))
    assert fingerprint(changed) != fingerprint(model)
    assert not sensitivities(changed, blocks, [{"bits": 8}], shared)["int8"]["cached"]


def _poison(data: dict, how: str) -> None:
    entry = next(iter(data["entries"].values()))
    if how == "gpt2 module names":
        entry["scores"] = {f"transformer.h.{i}.{m}": 0.1 for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")}
    elif how == "faked tokens":
        entry["tokens"] = 999999
    elif how == "version 99":
        data["version"] = 99
    elif how == "string scores":
        entry["scores"] = {name: "0.5" for name in entry["scores"]}
    elif how == "no scores key":
        del entry["scores"]
    elif how == "negative and nan scores":
        first, second = list(entry["scores"])[:2]
        entry["scores"][first], entry["scores"][second] = -1.0, float("nan")


@pytest.mark.parametrize("how", ["gpt2 module names", "faked tokens", "version 99", "string scores", "no scores key",
                                 "negative and nan scores"])
def test_a_poisoned_sensitivity_cache_is_dropped_with_a_warning_and_rescored(tiny_tokenizer, tmp_path, how, caplog):
    model, blocks = tiny_llama(), _blocks(tiny_tokenizer)
    path = tmp_path / "sensitivity.json"
    first = sensitivities(model, blocks, [{"bits": 8}], SensitivityCache([path]))["int8"]
    data = json.loads(path.read_text())
    _poison(data, how)
    path.write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level("WARNING", logger="hfsqueeze"):
        again = sensitivities(model, blocks, [{"bits": 8}], SensitivityCache([path]))["int8"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0], warnings
    assert not again["cached"] and again["cached_modules"] == 0 and again["cached_from"] is None  # scored again
    assert again["scores"] == pytest.approx(first["scores"]) and again["tokens"] == blocks.numel()
    entry = next(iter(json.loads(path.read_text())["entries"].values()))  # the bad entry is replaced
    assert entry["tokens"] == blocks.numel() and entry["scores"] == pytest.approx(first["scores"])


def test_scores_from_the_cache_say_where_from(tiny_tokenizer, tmp_path):
    model, blocks = tiny_llama(), _blocks(tiny_tokenizer)
    shared = tmp_path / "shared.json"
    sensitivities(model, blocks, [{"bits": 8}], SensitivityCache([shared]))
    hit = sensitivities(model, blocks, [{"bits": 8}], SensitivityCache([tmp_path / "own.json", shared]))["int8"]
    assert hit["cached"] and hit["cached_from"] == str(shared) and hit["seconds"] == 0.0
    assert (tmp_path / "own.json").is_file()  # copied into the run's own file


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama and a finished 2-trial tune output (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("finished")
    model = tiny_llama()
    model.save_pretrained(root / "m")
    tiny_tokenizer.save_pretrained(root / "m")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HFSQUEEZE_CACHE", str(root / "cache"))
        run_tune(model, tiny_tokenizer, root / "out", trials=2)
    return root


def _copy_run(finished_run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(finished_run / "out", tmp_path / "out")
    return tmp_path / "out"


def _cli_tune(model_dir, out, monkeypatch, *extra) -> int:
    real = tuner_mod.tune
    monkeypatch.setattr(tuner_mod, "tune", lambda *a, **k: real(*a, **{**k, "settings": SETTINGS,
                                                                      "evaluation": EVALUATION}))
    return cli_main(["tune", "--model", str(model_dir), "--budget", "size=0.5", "--output", str(out), *extra])


@pytest.mark.parametrize("change", ["rope_theta", "one ulp"])
def test_resume_refuses_a_changed_model_in_one_line(finished_run, tmp_path, change, monkeypatch, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    out = _copy_run(finished_run, tmp_path)
    shutil.copytree(finished_run / "m", tmp_path / "m2")
    if change == "rope_theta":
        config = json.loads((tmp_path / "m2" / "config.json").read_text())
        config["rope_parameters"]["rope_theta"] = 20000.0
        (tmp_path / "m2" / "config.json").write_text(json.dumps(config))
    else:
        weights = load_file(tmp_path / "m2" / "model.safetensors")
        flat = weights["model.layers.0.mlp.down_proj.weight"].view(-1)
        flat[5] = torch.nextafter(flat[5], torch.tensor(float("inf")))
        save_file(weights, tmp_path / "m2" / "model.safetensors", metadata={"format": "pt"})
    journal = (out / "tuning" / "study.journal").read_bytes()
    code = _cli_tune(tmp_path / "m2", out, monkeypatch, "--trials", "3", "--resume")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hfsqueeze: error: --resume:") and "another model" in err, err
    assert err.count("\n") == 1
    assert (out / "tuning" / "study.journal").read_bytes() == journal  # nothing was run


@pytest.mark.parametrize("damage", ["cut off", "garbage"])
def test_a_torn_last_journal_line_is_repaired_on_resume(finished_run, tmp_path, tiny_tokenizer, damage, caplog):
    out = _copy_run(finished_run, tmp_path)
    journal = out / "tuning" / "study.journal"
    data = journal.read_bytes()
    good = data[:data.rstrip(b"\n").rindex(b"\n") + 1]  # every line but the last
    damaged = data[:-7] if damage == "cut off" else data + b"\x00\x17not json{\n"
    journal.write_bytes(damaged)
    finished = {r["number"]: r for r in _completed(out)}
    with caplog.at_level("WARNING", logger="hfsqueeze"):
        result = run_tune(load_model(str(finished_run / "m"))[0], tiny_tokenizer, out, trials=3, resume=True)
    warned = [r.getMessage() for r in caplog.records if "study.journal" in r.getMessage()]
    assert len(warned) == 1 and "last line" in warned[0], warned
    backups = list((out / "tuning").glob("study.journal.torn-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == damaged  # the original, as it was
    assert journal.read_bytes().startswith(good if damage == "cut off" else data)
    done = {r["number"]: r for r in result.trials if r["state"] == "COMPLETE"}
    assert len(done) == 3
    if damage == "garbage":  # nothing was lost: both finished trials are kept as they were
        assert all(done[n]["metrics"] == r["metrics"] for n, r in finished.items())


@pytest.mark.parametrize("damage, message", [
    ("middle", "is damaged at line 3 of"),
    ("emptied", "is empty but trials.jsonl records 2 finished trial(s)"),
])
def test_a_damaged_or_emptied_journal_is_one_line_exit_2(finished_run, tmp_path, damage, message, monkeypatch,
                                                          capsys):
    out = _copy_run(finished_run, tmp_path)
    journal = out / "tuning" / "study.journal"
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join(lines[:2] + [b'{"op_code": 4, "worker'] + lines[3:]) if damage == "middle" else b"")
    before = journal.read_bytes()
    code = _cli_tune(finished_run / "m", out, monkeypatch, "--trials", "3", "--resume")
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert journal.read_bytes() == before and not list((out / "tuning").glob("study.journal.torn-*"))


def test_interrupted_search_points_are_queued_again_once(tmp_path):
    optuna = study_mod.optuna_module()
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask({"quantize.threshold": optuna.distributions.FloatDistribution(1.0, 6.0)})
    trial.set_user_attr("interrupted", True)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert study_mod.requeue_interrupted(study) == 1 and study_mod.requeue_interrupted(study) == 0
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["redo_of"] for t in waiting] == [trial.number]
    assert waiting[0].system_attrs["fixed_params"] == trial.params


# ---- signals ----------------------------------------------------------------------------------------------------
# `hfsqueeze tune` in a child process, paused at a known point: the ``n``-th trial (before it is built) or the
# ``n``-th module of the sensitivity pass (before it is scored); the pause writes ``marker`` and sleeps.
PAUSING_CLI = r"""
import json, os, sys, time
from pathlib import Path
from hfsqueeze import cli
from hfsqueeze.tune import sensitivity as sens_mod, study as study_mod, tuner as tuner_mod
settings, evaluation, pause = (json.loads(a) for a in sys.argv[1:4])
real_tune = tuner_mod.tune
tuner_mod.tune = lambda *a, **k: real_tune(*a, **{**k, "settings": settings, "evaluation": evaluation})
module, name = (study_mod, "run_point") if pause["at"] == "trial" else (sens_mod, "_kl")
real, calls = getattr(module, name), []
def paused(*args, **kwargs):
    calls.append(1)
    if len(calls) == pause["n"]:
        # Written whole, then renamed: the test signals as soon as the marker exists, which must not cut the write.
        Path(pause["marker"] + ".tmp").write_text(json.dumps(args[1] if pause["at"] == "trial" else None))
        os.replace(pause["marker"] + ".tmp", pause["marker"])
        time.sleep(600)
    return real(*args, **kwargs)
setattr(module, name, paused)
sys.exit(cli.main(sys.argv[4:]))
"""


def _paused_cli(tmp_path: Path, tokenizer, at: str, n: int, trials: int) -> tuple[subprocess.Popen, Path]:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    args = [json.dumps(SETTINGS), json.dumps(EVALUATION), json.dumps({"at": at, "n": n, "marker": str(marker)}),
            "tune", "--model", str(tmp_path / "m"), "--budget", "size=0.5", "--trials", str(trials), "--output",
            str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_CLI, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate(timeout=60)[1][-3000:]
    return proc, marker


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_inside_a_trial_saves_the_best_so_far_exits_with_its_code_and_resume_redoes_it(
        tiny_tokenizer, tmp_path, signum, code):
    out = tmp_path / "out"
    proc, marker = _paused_cli(tmp_path, tiny_tokenizer, "trial", n=2, trials=3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    report = json.loads((out / "report.json").read_text())  # the best point so far, saved
    assert report["tuning"]["stopped"] == ("terminated" if signum == signal.SIGTERM else "interrupted")
    records = [json.loads(line) for line in (out / "tuning" / "trials.jsonl").read_text().splitlines()]
    point = json.loads(marker.read_text())
    cut = [r for r in records if r["point"] == point]
    assert len(cut) == 1 and cut[0]["state"] == "FAIL" and cut[0]["interrupted"], cut

    result = run_tune(load_model(str(tmp_path / "m"))[0], tiny_tokenizer, out, trials=3, resume=True)
    redone = [r for r in result.trials if r["point"] == point and r["state"] == "COMPLETE"]
    assert len(redone) == 1 and redone[0]["number"] != cut[0]["number"]
    assert len([r for r in result.trials if r["state"] == "COMPLETE"]) == 3


@pytest.mark.slow
def test_ctrl_c_in_the_sensitivity_pass_keeps_what_was_scored_and_resume_continues(tiny_tokenizer, tmp_path,
                                                                                   monkeypatch):
    from hfsqueeze.tune import sensitivity as sens_mod

    out = tmp_path / "out"
    proc, _ = _paused_cli(tmp_path, tiny_tokenizer, "sensitivity", n=5, trials=2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "continue with --resume" in err, err[-3000:]
    saved = json.loads((out / "tuning" / "sensitivity.json").read_text())["entries"]
    (partial,) = [e for k, e in saved.items() if k.endswith(":int8")]
    assert len(partial["scores"]) == 4 and not partial["complete"]  # module 5 was being scored

    model = load_model(str(tmp_path / "m"))[0]
    real, scored = sens_mod._kl, []
    monkeypatch.setattr(sens_mod, "_kl", lambda *a, **k: scored.append(1) or real(*a, **k))
    result = run_tune(model, tiny_tokenizer, out, trials=2, resume=True)
    targets = len(quantize_targets(model))
    assert len(scored) == 3 * targets - 4  # int8 continued where it stopped; nf4 and fp4 scored in full
    section = result.report.tuning["sensitivity"]["int8"]
    assert section["cached_modules"] == 4 and not section["cached"]
    assert section["cached_from"] == str(out / "tuning" / "sensitivity.json")


def test_quantize_only_trials_share_the_original_tensors(tiny_tokenizer):
    """A trial that only quantizes starts from a copy sharing the original's tensors (no second fp32 model in
    memory); the original's modules, dtypes and outputs stay as they were."""
    from hfsqueeze.core.data import load_texts, token_blocks
    from hfsqueeze.tune.trial import TrialContext, TuneSettings, build

    model = tiny_llama()
    before = outputs(model, IDS)
    blocks = token_blocks(tiny_tokenizer, load_texts("builtin", split="train"), max_tokens=64, seq_len=64)
    scores = {"scores": {}}
    tctx = TrialContext(model, tiny_tokenizer, "builtin", blocks, Budget.parse("size=0.9"), load_space("quantize"),
                        TuneSettings(), {"int8": scores, "nf4": scores, "fp4": scores}, disk_bytes(model),
                        sum(p.numel() for p in model.parameters()))
    embed = model.get_input_embeddings().weight
    for bits, rest in ((8, "fp32"), (4, "bf16")):
        built, _, _ = build(tctx, plan_of({"quantize.bits": bits, "quantize.rest_dtype": rest, "quantize.keep": 0.0}))
        assert type(built.model.layers[0].mlp.up_proj).__name__ != "Linear"
        copied = built.get_input_embeddings().weight
        assert (copied.data_ptr() == embed.data_ptr()) == (rest == "fp32")  # shared unless the cast replaced it
        assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear and embed.dtype == torch.float32
        assert torch.equal(outputs(model, IDS), before)
        del built


def test_the_recovery_teacher_shares_the_original_tensors(tiny_tokenizer):
    """tune's teacher for recovery trials is frozen and in eval mode, but costs no second copy of the weights; the
    original keeps its own requires_grad flags."""
    from hfsqueeze.core.data import load_texts, token_blocks
    from hfsqueeze.tune.trial import TrialContext, TuneSettings

    model = tiny_llama()
    model.requires_grad_(True)
    blocks = token_blocks(tiny_tokenizer, load_texts("builtin", split="train"), max_tokens=64, seq_len=64)
    tctx = TrialContext(model, tiny_tokenizer, "builtin", blocks, Budget.parse("size=0.9"), load_space("quantize"),
                        TuneSettings(), {}, disk_bytes(model), sum(p.numel() for p in model.parameters()))
    teacher = tctx.teacher
    assert teacher is tctx.teacher and teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert [p.data_ptr() for p in teacher.parameters()] == [p.data_ptr() for p in model.parameters()]


def test_the_final_rebuild_shares_the_original_weights_and_returns_a_model_of_its_own(tiny_tokenizer, tmp_path,
                                                                                        monkeypatch):
    # A quantize-only point writes into no tensor: the final `compress` starts from a copy that shares the original's
    # weights, as the trials do (a deep copy held a second fp32 model at the end of every tune); the model returned
    # owns all of its weights afterwards, so training it never changes the caller's model.
    model = tiny_llama()
    ptr = model.model.embed_tokens.weight.data_ptr()
    shared_while_compressing = []
    real = tuner_mod.compress

    def spy(final, recipe, **kwargs):
        shared_while_compressing.append(final.model.embed_tokens.weight.data_ptr() == ptr)
        return real(final, recipe, **kwargs)

    monkeypatch.setattr(tuner_mod, "compress", spy)
    space = {"quantize": {"bits": 8, "threshold": [6.0], "rest_dtype": "fp32", "keep": 0.0}}
    result = run_tune(model, tiny_tokenizer, tmp_path / "t", space=space, budget="size=0.9", trials=1)
    assert shared_while_compressing == [True]
    theirs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not [n for n, t in result.model.named_parameters() if t.untyped_storage().data_ptr() in theirs]
    assert result.model.lm_head.weight is result.model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.data_ptr() == ptr and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
