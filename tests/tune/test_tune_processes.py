"""`hfsqueeze tune` robust across processes: killed and resumed runs, workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hfsqueeze
from hfsqueeze.models import load_model
from tunekit import _own_cache  # noqa: F401  (autouse: a sensitivity cache per test)
from tunekit import EVALUATION, SETTINGS, _completed, run_tune, tiny_llama




# ---- robustness across processes ----------------------------------------------------------------------------
KILLABLE = r"""
import json, sys, hfsqueeze
from hfsqueeze.models import load_model
model, tok = load_model(sys.argv[1])
hfsqueeze.tune(model, tok, budget="size=0.5", trials=int(sys.argv[3]), output=sys.argv[2],
               settings=json.loads(sys.argv[4]), evaluation=json.loads(sys.argv[5]))
"""


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


def test_a_trial_waiting_for_the_last_ones_is_not_counted_as_running():
    """Two processes at the end of a search each hold a trial that only waits for the last running trials to end: if
    each counted the other's as running, both would wait forever (seen with a dead worker's point queued again)."""
    import optuna

    from hfsqueeze.tune.study import WAITING, counted

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    running = study.ask()
    running.set_user_attr("worker", 1)
    waiting = study.ask()
    waiting.set_user_attr(WAITING, True)
    assert counted(study) == (1, 1)
    assert counted(study, exclude=running.number) == (1, 0)


def test_a_dead_workers_point_queued_again_holds_its_slot():
    """A point queued again after its process died counts as running: a fresh trial asked just before it was queued
    must wait for it, or the fresh point takes the last slot and the dead worker's point never runs (seen in the
    two-worker PostgreSQL test)."""
    import optuna

    from hfsqueeze.tune.study import counted

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, state=optuna.trial.TrialState.WAITING,
                                              user_attrs={"kind": "search", "redo_of": 0}))
    assert counted(study) == (1, 1)
    redo = study.ask()  # the queued point is the next one asked
    assert redo.user_attrs.get("redo_of") == 0
    assert counted(study, exclude=redo.number) == (1, 0)
