"""`hfsqueeze tune`'s saved state: the model fingerprint, the sensitivity cache, the journal."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from hfsqueeze.cli import main as cli_main
from hfsqueeze.models import load_model
from hfsqueeze.tune import study as study_mod
from hfsqueeze.tune import tuner as tuner_mod
from hfsqueeze.tune.sensitivity import SensitivityCache, sensitivities
from tunekit import _own_cache  # noqa: F401  (autouse: a sensitivity cache per test)
from tunekit import EVALUATION, SETTINGS, _completed, run_tune, tiny_llama




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


def test_resume_reads_a_study_written_with_the_old_metric_keys(finished_run, tmp_path, tiny_tokenizer):
    """A study of the previous version kept ``kl``/``top1`` in its journal and trials.jsonl: --resume continues it,
    every record (old and new) comes back in the one vocabulary, and the artifact's card renders its tuning table."""
    out = _copy_run(finished_run, tmp_path)
    for name in ("study.journal", "trials.jsonl"):
        path = out / "tuning" / name
        text = path.read_text()
        assert '"kl_divergence"' in text
        path.write_text(text.replace('"kl_divergence"', '"kl"').replace('"top1_agreement"', '"top1"'))
    old = {r["number"]: r for r in _completed(out)}
    assert old and all("kl" in r["metrics"] and "kl_divergence" not in r["metrics"] for r in old.values())
    result = run_tune(load_model(str(finished_run / "m"))[0], tiny_tokenizer, out, trials=3, resume=True)
    done = {r["number"]: r for r in result.trials if r["state"] == "COMPLETE"}
    assert len(done) == 3 and set(old) < set(done)
    renamed = {"kl": "kl_divergence", "top1": "top1_agreement"}
    for number, record in old.items():  # the old records, read in today's keys, values unchanged
        assert done[number]["metrics"] == {renamed.get(k, k): v for k, v in record["metrics"].items()}
    assert all("kl" not in r["metrics"] and r["metrics"]["kl_divergence"] >= 0 for r in done.values())
    assert result.chosen["metrics"]["kl_divergence"] == min(r["metrics"]["kl_divergence"] for r in done.values()
                                                            if r["feasible"])
    card = (out / "README.md").read_text()
    assert "| KL (calibration) |" in card and "n/a |" not in card.split("## Tuning", 1)[1].split("\n## ", 1)[0]


def test_trial_record_round_trips_and_reads_old_keys():
    from hfsqueeze.evaluation.trials import TrialRecord

    old = {"number": 3, "state": "COMPLETE", "kind": "uniform:int8", "label": "int8", "point": {"bits": 8},
           "stages": [{"method": "quantize", "bits": 8}], "metrics": {"size": 0.3, "kl": 0.01, "top1": 0.9},
           "solution": None, "constraints": {"size": -0.1}, "feasible": True, "values": [0.01, 0.3], "seconds": 1.5,
           "error": None, "interrupted": False, "worker": 7, "skipped": None, "duplicate_of": None, "future": 1}
    record = TrialRecord.from_dict(old)
    assert record.metrics == {"size": 0.3, "kl_divergence": 0.01, "top1_agreement": 0.9}
    assert record.metric("kl") == 0.01 and record.uniform and record.measured
    again = record.to_dict()
    assert list(again) == [k for k in old if k != "future"]  # the same shape on disk, in the same order
    assert TrialRecord.from_dict(again) == record
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.feasible = False


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
