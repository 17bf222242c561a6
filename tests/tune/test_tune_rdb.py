"""`hfsqueeze tune --storage URL` and `hfsqueeze tune-worker` against a real PostgreSQL server.

`.ci/run` starts one on loopback (`.ci/postgres.sh`) and exports its URL as ``HFSQUEEZE_TEST_PG_URL``; without it
these tests skip. Each test gets a database of its own.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import hfsqueeze
from hfsqueeze.cli import main as cli_main

PG_URL = os.environ.get("HFSQUEEZE_TEST_PG_URL")
pytestmark = pytest.mark.skipif(not PG_URL, reason="HFSQUEEZE_TEST_PG_URL is not set (.ci/run starts a PostgreSQL "
                                                   "server and sets it; see .ci/postgres.sh)")

# Trials of about a second on one core (latency timed a few times, so workers that start later still get some).
SETTINGS = {"calibration_tokens": 256, "seq_len": 128, "sensitivity_tokens": 128, "prompt_tokens": 16,
            "decode_tokens": 2, "latency": True, "latency_rounds": 6}
EVALUATION = {"max_tokens": 256, "seq_len": 128, "prompt_tokens": 16, "decode_tokens": 4, "repeats": 1}
HEARTBEAT = 1


def tiny_llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


def _new_database() -> str:
    import sqlalchemy

    name = "t_" + uuid.uuid4().hex[:12]
    engine = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return PG_URL.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def db_url(monkeypatch, tmp_path):
    monkeypatch.setenv("HFSQUEEZE_CACHE", str(tmp_path / "cache"))
    return _new_database()


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", **extra}


@functools.cache
def _storage(url: str):
    """One storage (one connection pool) per database: the tests poll it."""
    from hfsqueeze.tune.storage import rdb_storage

    return rdb_storage(url)


def _trials(url: str, name: str = "s"):
    import optuna

    return optuna.load_study(study_name=name, storage=_storage(url)).get_trials(deepcopy=False)


# ---- the schema, the baselines: several starters at once ------------------------------------------------------
AT_ONCE = r"""
import json, os, sys, time
from hfsqueeze.tune.storage import StudyStorage, rdb_storage, study_lock
from hfsqueeze.tune.study import enqueue_baselines, optuna_module
url, what, go = sys.argv[1:4]
if what == "baselines":
    location = StudyStorage(url, "s")
    study = optuna_module().create_study(study_name="s", storage=location.open(), load_if_exists=True)
print("ready", flush=True)
while not os.path.exists(go):  # every process starts at the same moment
    time.sleep(0.001)
try:
    if what == "schema":
        rdb_storage(url)
        print("ok")
    else:
        with study_lock(location, None):
            print(enqueue_baselines(study, [(f"uniform:b{i}", {"x": i}, {}) for i in range(8)]))
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}"[:200])
"""


def _at_once(url: str, what: str, count: int, tmp_path: Path) -> list[str]:
    go = tmp_path / f"go-{what}"
    procs = [subprocess.Popen([sys.executable, "-c", AT_ONCE, url, what, str(go)], env=_env(),
                              stdout=subprocess.PIPE, text=True) for _ in range(count)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    return [proc.communicate(timeout=120)[0].strip() for proc in procs]


@pytest.mark.slow
def test_three_processes_create_the_schema_at_once(db_url, tmp_path):
    # Plain optuna.storages.RDBStorage loses this race (UniqueViolation on pg_type_typname_nsp_index).
    assert _at_once(db_url, "schema", 3, tmp_path) == ["ok"] * 3


@pytest.mark.slow
def test_two_starters_queue_each_baseline_once(db_url, tmp_path):
    from hfsqueeze.tune.storage import rdb_storage

    rdb_storage(db_url)
    counts = sorted(_at_once(db_url, "baselines", 2, tmp_path))
    kinds = [t.user_attrs["kind"] for t in _trials(db_url)]
    assert sorted(kinds) == sorted(f"uniform:b{i}" for i in range(8)) and counts == ["0", "8"]


# ---- a coordinator and workers on "other machines" ------------------------------------------------------------
COORDINATOR = r"""
import json, sys, hfsqueeze
from hfsqueeze.models import load_model
model, tok = load_model(sys.argv[1])
result = hfsqueeze.tune(model, tok, budget="size=0.5", trials=int(sys.argv[3]), output=sys.argv[2],
                        settings=json.loads(sys.argv[4]), evaluation=json.loads(sys.argv[5]), storage=sys.argv[6],
                        study_name="s", heartbeat=int(sys.argv[7]), detach=sys.argv[8:] == ["detach"])
print(json.dumps({"stopped": result.stopped, "trials": len(result.trials)}))
"""


def _published(url: str) -> bool:
    """The coordinator has published its run and queued its baselines."""
    import optuna

    try:
        study = optuna.load_study(study_name="s", storage=_storage(url))
    except KeyError:
        return False
    return "hfsqueeze" in study.user_attrs and bool(study.get_trials(deepcopy=False))


# The worker to be killed: `hfsqueeze tune-worker` whose trials after its first one stall when they draw their point
# (before any point is built or skipped), so the kill lands mid-trial (heartbeat running, the trial RUNNING) however
# loaded the machine is; a trial that finished between the check and the kill made the test fail.
STALLING_WORKER = r"""
import sys, time
import hfsqueeze.tune.study as study
from hfsqueeze.cli import main
suggest, calls = study.suggest, []
def stall_after_first(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
        time.sleep(3600)
    return suggest(*args, **kwargs)
study.suggest = stall_after_first
sys.exit(main(sys.argv[1:]))
"""


def _worker(url: str, home: Path, stall: bool = False) -> subprocess.Popen:
    """`hfsqueeze tune-worker` in a directory of its own, with its own copy of the model and its own cache."""
    start = ["-c", STALLING_WORKER] if stall else ["-m", "hfsqueeze.cli"]
    return subprocess.Popen([sys.executable, *start, "-v", "tune-worker", "--storage", url, "--study",
                             "s", "--model", str(home / "model")], cwd=home,
                            env=_env(HFSQUEEZE_CACHE=str(home / "cache"), TMPDIR=str(home)),
                            stdout=subprocess.PIPE, stderr=open(home / "worker.log", "w"), text=True)


def _wait_for(what, timeout: float = 240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_two_workers_that_share_only_the_url_and_one_killed_mid_trial(db_url, tmp_path, tiny_tokenizer):
    homes = {name: tmp_path / name for name in ("coordinator", "worker-a", "worker-b")}
    for home in homes.values():  # separate directories and copies: nothing shared but the URL
        _save(tiny_llama(), tiny_tokenizer, home / "model")
    trials = 20  # the workers start tens of seconds after the coordinator: enough left for both
    coordinator = subprocess.Popen(
        [sys.executable, "-c", COORDINATOR, str(homes["coordinator"] / "model"), str(homes["coordinator"] / "out"),
         str(trials), json.dumps(SETTINGS), json.dumps(EVALUATION), db_url, str(HEARTBEAT)],
        cwd=homes["coordinator"], env=_env(HFSQUEEZE_CACHE=str(homes["coordinator"] / "cache")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [coordinator]
    try:
        _wait_for(lambda: _published(db_url))  # the coordinator has published the run and queued its baselines
        workers = {name: _worker(db_url, homes[name], stall=name == "worker-b") for name in ("worker-a", "worker-b")}
        procs += list(workers.values())
        _run_and_kill_one(db_url, coordinator, workers, homes, trials)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def _run_and_kill_one(db_url, coordinator, workers, homes, trials) -> None:
    from optuna.trial import TrialState

    victim = workers["worker-b"]

    def victim_running():
        trials_now = _trials(db_url)
        mine = [t for t in trials_now if t.user_attrs.get("worker") == victim.pid]
        if any(t.state == TrialState.COMPLETE for t in mine):
            return next((t for t in mine if t.state == TrialState.RUNNING), None)
        return None

    killed = _wait_for(victim_running)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    out, err = coordinator.communicate(timeout=600)
    assert coordinator.returncode == 0, err[-3000:]
    survivor_out, _ = workers["worker-a"].communicate(timeout=120)
    assert workers["worker-a"].returncode == 0, (homes["worker-a"] / "worker.log").read_text()[-3000:]

    final = {t.number: t for t in _trials(db_url)}
    assert sum(1 for t in final.values() if t.state == TrialState.COMPLETE) >= trials
    assert final[killed.number].state == TrialState.FAIL  # failed by the heartbeat, not left RUNNING
    redo = [t for t in final.values() if t.user_attrs.get("redo_of") == killed.number]
    assert len(redo) == 1 and redo[0].state == TrialState.COMPLETE
    assert final[killed.number].params.items() <= redo[0].params.items()  # the same point, where it had one
    done = [t for t in final.values() if t.state == TrialState.COMPLETE]
    by_worker = {pid: sum(1 for t in done if t.user_attrs.get("worker") == pid)
                 for pid in (coordinator.pid, workers["worker-a"].pid, victim.pid)}
    assert by_worker[workers["worker-a"].pid] >= 1 and by_worker[victim.pid] >= 1, by_worker
    assert not [t for t in final.values() if t.state == TrialState.RUNNING]
    kinds = [t.user_attrs["kind"] for t in done if t.user_attrs.get("kind", "search") != "search"]
    assert len(kinds) == len(set(kinds))  # no baseline ran twice, the killed one included
    report = json.loads((homes["coordinator"] / "out" / "report.json").read_text())
    records = {r["number"]: r for r in report["tuning"]["trials"]}
    assert records[killed.number]["interrupted"] and "trial(s) run here" in survivor_out
    print(f"\ntrials per worker {by_worker}; killed trial {killed.number} redone as {redo[0].number}")


def _interrupt_coordinator(db_url, tmp_path, tokenizer, trials: int, *extra: str) -> dict:
    """A coordinator (``extra``: its last arguments, ``detach``) and one `tune-worker`, each in its own directory; the
    coordinator gets Ctrl-C once the worker has finished a trial. Returns the processes' outputs, the COMPLETE count
    right after the coordinator exited, the final trials and the coordinator's report."""
    from optuna.trial import TrialState

    homes = {name: tmp_path / name for name in ("coordinator", "worker")}
    for home in homes.values():
        _save(tiny_llama(), tokenizer, home / "model")
    # As in a terminal: a shell without job control starts children with SIGINT ignored.
    coordinator = subprocess.Popen(
        [sys.executable, "-c", COORDINATOR, str(homes["coordinator"] / "model"), str(homes["coordinator"] / "out"),
         str(trials), json.dumps(SETTINGS), json.dumps(EVALUATION), db_url, str(HEARTBEAT), *extra],
        cwd=homes["coordinator"], env=_env(HFSQUEEZE_CACHE=str(homes["coordinator"] / "cache")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    procs = [coordinator]
    try:
        _wait_for(lambda: _published(db_url))
        worker = _worker(db_url, homes["worker"])
        procs.append(worker)
        _wait_for(lambda: any(t.user_attrs.get("worker") == worker.pid and t.state == TrialState.COMPLETE
                              for t in _trials(db_url)))
        coordinator.send_signal(signal.SIGINT)
        _, err = coordinator.communicate(timeout=300)
        at_stop = sum(1 for t in _trials(db_url) if t.state == TrialState.COMPLETE)
        out, _ = worker.communicate(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert coordinator.returncode == 0, err[-3000:]
    report = json.loads((homes["coordinator"] / "out" / "report.json").read_text())
    return {"worker_code": worker.returncode, "worker_out": out, "at_stop": at_stop, "final": _trials(db_url),
            "report": report}


@pytest.mark.slow
def test_ctrl_c_of_the_coordinator_stops_the_workers_and_leaves_the_study_consistent(db_url, tmp_path,
                                                                                      tiny_tokenizer):
    from optuna.trial import TrialState

    run = _interrupt_coordinator(db_url, tmp_path, tiny_tokenizer, 200)
    # The worker finishes its running trial and stops.
    assert run["worker_code"] == 0 and "stopped by the coordinator (interrupted)" in run["worker_out"], run
    final = run["final"]
    assert not [t for t in final if t.state == TrialState.RUNNING]  # queued points stay queued for a resume
    assert run["report"]["tuning"]["stopped"] == "interrupted"
    assert sum(1 for t in final if t.state == TrialState.COMPLETE) < 200


@pytest.mark.slow
def test_a_detached_coordinator_leaves_the_workers_running_to_the_trial_budget(db_url, tmp_path, tiny_tokenizer):
    from optuna.trial import TrialState

    trials = 40  # the worker starts tens of seconds after the coordinator: enough left for it
    run = _interrupt_coordinator(db_url, tmp_path, tiny_tokenizer, trials, "detach")
    assert run["report"]["tuning"]["stopped"] == "interrupted"  # the best point so far is saved
    # The worker goes on to the trial budget.
    assert run["worker_code"] == 0 and "stopped by the coordinator" not in run["worker_out"], run["worker_out"]
    final = run["final"]
    assert run["at_stop"] < trials <= sum(1 for t in final if t.state == TrialState.COMPLETE)
    assert not [t for t in final if t.state == TrialState.RUNNING]


def test_detach_needs_a_storage(tiny_tokenizer, tmp_path):
    with pytest.raises(hfsqueeze.RecipeError, match="detach=True: only with storage="):
        hfsqueeze.tune(tiny_llama(), tiny_tokenizer, budget="size=0.5", trials=1, output=tmp_path / "out",
                       settings=SETTINGS, evaluation=EVALUATION, detach=True)


# ---- resume, refusals ----------------------------------------------------------------------------------------
@pytest.fixture
def finished(db_url, tmp_path, tiny_tokenizer):
    """A finished 3-trial run in an RDB study ``s`` (heartbeat 1 s)."""
    model = tiny_llama()
    hfsqueeze.tune(model, tiny_tokenizer, budget="size=0.5", trials=3, output=tmp_path / "out", settings=SETTINGS,
                   evaluation=EVALUATION, storage=db_url, study_name="s", heartbeat=HEARTBEAT)
    return db_url, model


def test_resume_leaves_a_trial_running_elsewhere_alone_until_its_heartbeat_stops(finished, tmp_path, tiny_tokenizer):
    import optuna

    from hfsqueeze.tune.storage import rdb_storage

    url, model = finished
    storage = rdb_storage(url)
    study = optuna.load_study(study_name="s", storage=storage)
    before = {t.number: t.values for t in study.get_trials() if t.state.name == "COMPLETE"}
    elsewhere = study.ask()  # a trial running on another machine, beating right now
    storage.record_heartbeat(elsewhere._trial_id)
    result = hfsqueeze.tune(model, tiny_tokenizer, budget="size=0.5", trials=5, output=tmp_path / "out",
                            resume=True, settings=SETTINGS, evaluation=EVALUATION, storage=url, study_name="s",
                            heartbeat=HEARTBEAT)
    final = {t.number: t for t in optuna.load_study(study_name="s", storage=storage).get_trials()}
    # Not declared dead on resume (the journal's "every RUNNING trial is dead"), but once it stopped beating.
    assert "interrupted" not in final[elsewhere.number].user_attrs
    assert final[elsewhere.number].state.name == "FAIL"
    assert any(t.user_attrs.get("redo_of") == elsewhere.number for t in final.values())
    assert all(final[n].values == v for n, v in before.items())  # finished trials kept, never re-run
    assert sum(1 for r in result.trials if r["state"] == "COMPLETE") == 5


def test_tune_worker_refuses_another_model_in_one_line(finished, tmp_path, tiny_tokenizer, capsys):
    url, _ = finished
    other = tiny_llama()
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    code = cli_main(["tune-worker", "--storage", url, "--study", "s", "--model",
                     str(_save(other, tiny_tokenizer, tmp_path / "other"))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "is not the one study 's'" in err and "Traceback" not in err


def test_tune_worker_refuses_another_hfsqueeze_version_in_one_line(finished, tmp_path, tiny_tokenizer, capsys,
                                                                   monkeypatch):
    from hfsqueeze.tune import worker

    url, model = finished
    monkeypatch.setattr(worker, "hfsqueeze_version", lambda: "0.0.1")
    code = cli_main(["tune-worker", "--storage", url, "--study", "s", "--model",
                     str(_save(model, tiny_tokenizer, tmp_path / "m"))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"started by hfsqueeze {hfsqueeze.__version__}, this is hfsqueeze 0.0.1" in err


def test_tune_worker_refuses_an_unknown_study_in_one_line(db_url, tmp_path, capsys):
    code = cli_main(["tune-worker", "--storage", db_url, "--study", "nope", "--model", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "there is no study 'nope'" in err


def test_tune_worker_waits_for_a_study_to_appear_then_says_how_long(db_url, tmp_path, capsys):
    start = time.monotonic()
    code = cli_main(["tune-worker", "--storage", db_url, "--study", "later", "--model", str(tmp_path), "--wait", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "there is no study 'later'" in err and "(waited 2s)" in err
    assert time.monotonic() - start >= 2


def test_tune_refuses_an_existing_study_without_resume_and_writes_nothing(finished, tmp_path, tiny_tokenizer,
                                                                          capsys):
    url, model = finished
    path = _save(model, tiny_tokenizer, tmp_path / "m")
    code = cli_main(["tune", "--model", str(path), "--budget", "size=0.5", "--output", str(tmp_path / "new"),
                     "--storage", url, "--study", "s"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "study 's' already exists" in err and "--resume" in err
    assert not (tmp_path / "new").exists() and len(_trials(url)) >= 3


def test_an_unreachable_storage_is_one_line(tmp_path, capsys):
    url = PG_URL.rsplit("@", 1)[0] + "@127.0.0.1:1/postgres"
    code = cli_main(["tune", "--model", str(tmp_path), "--budget", "size=0.5", "--output", str(tmp_path / "o"),
                     "--storage", url])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot connect" in err
