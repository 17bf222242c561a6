"""`hfsqueeze tune` on tiny models: the whole search, its output and its reproduction."""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time

import pytest
import torch
import yaml
from conftest import outputs

import hfsqueeze
from hfsqueeze import RecipeError
from hfsqueeze.evaluation.measure import disk_bytes
from hfsqueeze.tune import Budget, InfeasibleBudgetError, load_space
from hfsqueeze.tune import final as final_mod
from hfsqueeze.tune import study as study_mod
from hfsqueeze.tune import prepare as prepare_mod
from hfsqueeze.tune import tuner as tuner_mod
from hfsqueeze.tune.sensitivity import SensitivityCache, score_modules, sensitivities
from hfsqueeze.tune.space import quantize_targets
from tunekit import _own_cache  # noqa: F401  (autouse: a sensitivity cache per test)
from tunekit import IDS, run_tune, tiny_llama




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
    assert all(chosen["metrics"]["kl_divergence"] <= t["metrics"]["kl_divergence"] for t in uniform)
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
    monkeypatch.setattr(prepare_mod, "fp16_overflows", lambda *a: False)  # as if the up-front check missed it
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
                                                    r"closest point found: #\d+ .*size 0\.\d+x, kl .*prefill"):
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
    assert result.chosen["metrics"]["kl_divergence"] <= 0.002
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
    monkeypatch.setattr(prepare_mod, "sensitivities", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_missing_optuna_names_the_pip_command(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.raises(hfsqueeze.BackendMissingError, match=r"pip install 'optuna>=5'"):
        run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_the_final_rebuild_shares_the_original_weights_and_returns_a_model_of_its_own(tiny_tokenizer, tmp_path,
                                                                                        monkeypatch):
    # A quantize-only point writes into no tensor: the final `compress` starts from a copy that shares the original's
    # weights, as the trials do (a deep copy held a second fp32 model at the end of every tune); the model returned
    # owns all of its weights afterwards, so training it never changes the caller's model.
    model = tiny_llama()
    ptr = model.model.embed_tokens.weight.data_ptr()
    shared_while_compressing = []
    real = final_mod.compress

    def spy(final, recipe, **kwargs):
        shared_while_compressing.append(final.model.embed_tokens.weight.data_ptr() == ptr)
        return real(final, recipe, **kwargs)

    monkeypatch.setattr(final_mod, "compress", spy)
    space = {"quantize": {"bits": 8, "threshold": [6.0], "rest_dtype": "fp32", "keep": 0.0}}
    result = run_tune(model, tiny_tokenizer, tmp_path / "t", space=space, budget="size=0.9", trials=1)
    assert shared_while_compressing == [True, True]  # round-to-nearest, then with folded scales (int8's variant)
    theirs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert not [n for n, t in result.model.named_parameters() if t.untyped_storage().data_ptr() in theirs]
    assert result.model.lm_head.weight is result.model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.data_ptr() == ptr and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


# ---- the chosen point, calibrated -----------------------------------------------------------------------------
def test_the_chosen_4bit_point_is_built_calibrated_too_and_the_better_build_is_kept(tiny_tokenizer, tmp_path):
    model = tiny_llama()
    space = {"quantize": {"bits": 4, "quant_type": ["nf4"], "rest_dtype": "bf16"}}
    result = run_tune(model, tiny_tokenizer, tmp_path / "t", space=space, budget="size=0.6", trials=2)
    calibrated = result.report.tuning["calibrated"]
    kl = calibrated["kl_divergence"]
    assert calibrated["tried"] and calibrated["won"] == (kl["calibrated"] < kl["round_to_nearest"])
    four_bit = next(s for s in result.recipe["stages"] if s.get("bits") == 4)
    assert (four_bit.get("calibration") == "gptq") is calibrated["won"]
    assert result.report.final.kl_divergence == pytest.approx(min(kl.values()))  # the kept build is the one saved
    reloaded = hfsqueeze.load_compressed(tmp_path / "t")
    torch.testing.assert_close(outputs(result.model, IDS), outputs(reloaded, IDS))
    assert "built twice" in (tmp_path / "t" / "README.md").read_text()
    # Switched off, or on a point with no calibrated variant (a 16-bit cast), nothing more is built.
    off = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "off", space=space, budget="size=0.6", trials=2,
                   calibrate=False)
    assert "calibrated" not in off.report.tuning
    assert all(s.get("calibration") is None for s in off.recipe["stages"])
    cast = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "cast", budget="size=0.9", trials=1,
                    space={"quantize": {"bits": 16, "dtype": ["bf16"]}})
    assert "calibrated" not in cast.report.tuning


def test_a_chosen_int8_point_is_tried_with_folded_scales():
    """int8's calibrated variant is folded SmoothQuant scales searched per layer (its loss is the activation path);
    4-bit's is GPTQ; a point already calibrated has none."""
    int8 = [{"method": "quantize", "bits": 16, "dtype": "bf16"},
            {"method": "quantize", "bits": 8, "threshold": 6.0, "skip_modules": ["lm_head"]}]
    assert final_mod.calibrated_stages(int8) == [int8[0], {**int8[1], "smooth": True, "alpha": "auto"}]
    nf4 = [{"method": "quantize", "bits": 4, "quant_type": "nf4"}]
    assert final_mod.calibrated_stages(nf4) == [{**nf4[0], "calibration": "gptq"}]
    assert final_mod.calibrated_stages([{**nf4[0], "calibration": "gptq"}]) is None
    assert final_mod.calibrated_stages([{"method": "prune", "ffn": 0.25}]) is None


def test_a_calibrated_build_that_cannot_run_keeps_round_to_nearest_and_says_why(tiny_tokenizer, tmp_path,
                                                                                monkeypatch):
    def refuse(*args, **kwargs):
        raise RecipeError("quantize: calibration: gptq got 3 calibration tokens")

    real = final_mod.FinalBuild.build
    monkeypatch.setattr(final_mod.FinalBuild, "build", lambda self, model, stages, description: (
        refuse() if any(s.get("calibration") for s in stages) else real(self, model, stages, description)))
    space = {"quantize": {"bits": 4, "quant_type": ["nf4"], "rest_dtype": "bf16"}}
    result = run_tune(tiny_llama(), tiny_tokenizer, tmp_path / "t", space=space, budget="size=0.6", trials=1)
    assert result.report.tuning["calibrated"] == {"tried": False,
                                                  "why": "quantize: calibration: gptq got 3 calibration tokens"}
    assert all(s.get("calibration") is None for s in result.recipe["stages"])
    assert "not built calibrated: quantize: calibration: gptq got 3" in (tmp_path / "t" / "README.md").read_text()
