"""`hfsqueeze tune` on the command line: arguments, refusals, output."""

from __future__ import annotations

import json

import pytest

import hfsqueeze
from hfsqueeze import RecipeError
from hfsqueeze.cli import main as cli_main
from hfsqueeze.tune import tuner as tuner_mod
from tunekit import _own_cache  # noqa: F401  (autouse: a sensitivity cache per test)
from tunekit import EVALUATION, SETTINGS, run_tune, tiny_llama




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


@pytest.mark.parametrize("flag, calibrate", [([], True), (["--no-calibrate"], False)])
def test_cli_no_calibrate_reaches_tune(flag, calibrate, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    _cli_model_with_quick_tune(tmp_path, tiny_tokenizer, monkeypatch)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["calibrate"])
        raise hfsqueeze.RecipeError("stopped by the test")

    monkeypatch.setattr(tuner_mod, "tune", spy)
    code = cli_main(["tune", "--model", str(tmp_path / "m"), "--budget", "size=0.5", "--output",
                     str(tmp_path / "out"), *flag])
    assert code == 2 and seen == [calibrate]
