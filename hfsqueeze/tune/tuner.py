"""`tune`: search compression settings to a budget, per module, and save the best point as a normal artifact.

1. Sensitivity first: each quantizable module's KL cost in each candidate format (cached;
   `hfsqueeze.tune.sensitivity`).
2. Solve, then search: per-module choices are solved under the budget (`hfsqueeze.tune.solve`); optuna searches the
   global knobs (`hfsqueeze.tune.study`), starting from the uniform stock recipes and the solved points.
3. Every trial is a concrete recipe built from a fresh copy of the original and measured for real on the calibration
   split; the chosen point is rebuilt with `hfsqueeze.compress` and re-measured on the held-out evaluation split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


from ..artifact.save import save_compressed
from ..core.errors import RecipeError
from ..core.hf import check_placement, input_device
from ..core.memory import unmap_weights
from ..evaluation.config import EvaluationConfig
from ..evaluation.trials import TrialRecord
from .budget import LATENCY_KEYS, Budget, InfeasibleBudgetError
from .output import PARETO_PNG, TUNING_DIR, install_artifact, plot_pareto, staging_dir, write_trials_jsonl
from .prepare import (
    CALIBRATION_FILE,
    ORIGINAL_COPY,
    RUN_FILE,
    SENSITIVITY_FILE,
    STORAGE_ENV,
    calibration_warning,
    check_args,
    check_output,
    make_context,
    prepare_output,
    setup_run,
)
from .final import FinalBuild
from .resources import check_workers, visible_gpus, worker_placement
from .space import DEFAULT_SPACE, Space, load_space
from .storage import (
    HEARTBEAT_SECONDS,
    STUDY_NAME,
    StudyStorage,
    announce_stop,
    prepare_study,
    publish,
    study_lock,
)
from .study import (
    Objective,
    best_record,
    closest_record,
    counted,
    describe_record,
    enqueue_baselines,
    mark_interrupted,
    open_study,
    optimize,
    optuna_module,
    plan_baselines,
    progress_callback,
    requeue_interrupted,
    study_records,
)
from .trial import TrialContext, TuneSettings

logger = logging.getLogger("hfsqueeze")


@dataclasses.dataclass
class TuneResult:
    """What `tune` found.

    Attributes:
        recipe: the chosen recipe, explicit (what ``out/recipe.yaml`` holds).
        chosen: the chosen trial's record (``stages``, calibration ``metrics``, ``constraints``...).
        pareto: the feasible Pareto set, one record per point (``label``, ``stages``, ``metrics``).
        trials: every finished or failed trial.
        report: the `CompressionReport` of the chosen recipe re-measured on the held-out evaluation text.
        model: the compressed model (the chosen recipe applied to a copy of the original).
        output: the artifact directory, when one was written.
        stopped: ``done``, ``time budget``, ``interrupted`` (Ctrl-C) or ``terminated`` (SIGTERM, where the caller
            handles it by raising a `KeyboardInterrupt` subclass, as the CLI does); the CLI exits 130 / 143 for the
            last two, after saving the best point so far.
    """

    recipe: dict[str, Any] | None
    chosen: dict[str, Any] | None
    pareto: list[dict[str, Any]]
    trials: list[dict[str, Any]]
    report: Any = None
    model: Any = None
    output: Path | None = None
    stopped: str = "done"


def tune(
    model,
    tokenizer=None,
    *,
    budget: str | dict[str, Any] | Budget,
    minimize: str = "kl",
    space: str | os.PathLike | dict[str, Any] | Space = DEFAULT_SPACE,
    trials: int = 30,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
    time_budget: float | None = None,
    seed: int = 0,
    calibration: Any = "builtin",
    eval_text: Any = None,
    evaluation: dict[str, Any] | None = None,
    settings: TuneSettings | dict[str, Any] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    model_path: str | None = None,
    command: str | None = None,
    storage: str | None = None,
    study_name: str = STUDY_NAME,
    heartbeat: int = HEARTBEAT_SECONDS,
    detach: bool = False,
    calibrate: bool = True,
) -> TuneResult:
    """Find the best compressed version of ``model`` within ``budget``; the model itself is not modified.

    Args:
        model (`PreTrainedModel`): the original (fp32 or 16-bit, not quantized).
        tokenizer: its tokenizer (quality is measured as KL to the original on calibration tokens).
        budget (`str` or `dict`): ``"size=0.30"``, ``"size=150MiB,ppl=+1%"``, ``{"bits": 4.5}``... (see `Budget`).
        minimize (`str`, defaults to `"kl"`): ``kl``, or ``size``/``prefill``/``decode`` within a quality budget.
        space (`str`, `dict` or path, defaults to `"quantize"`): ``quantize``, ``prune``, ``all`` or a space YAML.
        trials (`int`, defaults to 30): trials to run in total (baselines included), across workers and resumes.
        output (`str`, *optional*): artifact directory; ``output/tuning/`` holds the study, ``trials.jsonl``,
            ``sensitivity.json`` and ``pareto.png``. Without it nothing is saved (and nothing can be resumed).
        overwrite (`bool`): start over in an ``output`` that holds a previous run or artifact.
        resume (`bool`): continue the study in ``output`` (finished trials are kept, never re-run).
        workers (`int`, defaults to 1): processes sharing the study (the extra ones load the model from
            ``model_path``, or from a copy saved under ``tuning/``).
        time_budget (`float`, *optional*): seconds (from the call, sensitivity pass included) after which no new
            trial starts; the best point so far is saved.
        seed (`int`): seeds the sampler (worker ``i`` uses ``seed + i``).
        calibration: the text tuning sees (built-in: its train split); the evaluation split is only read after the
            search, to re-measure the chosen point.
        eval_text: evaluation text for that final measurement (default: the built-in held-out split).
        evaluation (`dict`, *optional*): settings of that final measurement (the recipe's ``evaluation`` keys:
            ``max_tokens``, ``latency``...); they are written into ``recipe.yaml``.
        settings (`TuneSettings` or `dict`, *optional*): calibration/sensitivity token counts, latency settings.
        progress (`callable`, *optional*): called after each trial with trials done, best so far and ETA.
        model_path (`str`, *optional*): where ``model`` was loaded from (lets workers load it).
        command (`str`, *optional*): the command line, recorded in the report.
        storage (`str`, *optional*): an optuna RDB URL (``postgresql://user:password@host/db``...) holding the study
            instead of ``tuning/study.journal``: workers on other machines join it with ``hfsqueeze tune-worker``
            (the study holds the run, the calibration text and the sensitivities they need).
        study_name (`str`, defaults to `"hfsqueeze-tune"`): the study's name in the storage.
        heartbeat (`int`, defaults to 60): with ``storage``, seconds between a running trial's heartbeats; a trial
            silent for twice that (its process died) is failed and its point run again.
        detach (`bool`, defaults to `False`): with ``storage``, what Ctrl-C (or SIGTERM) here does to the workers
            elsewhere: by default they finish their running trial and stop (the study is marked stopped); detached,
            they go on to the trial budget while this process saves the best point so far and returns.
        calibrate (`bool`, defaults to `True`): build the chosen point a second time calibrated (GPTQ rounding for
            4-bit, folded SmoothQuant scales for int8; same format and size), measure both on the evaluation text
            and keep the better (the report's ``tuning.calibrated`` holds both KLs); costs one calibration
            (minutes for a 135M model on a CPU).

    Example:

    ```python
    result = hfsqueeze.tune(model, tokenizer=tok, budget={"size": 0.30}, trials=30, output="out/tuned")
    result.recipe                       # explicit: hfsqueeze compress --recipe out/tuned/recipe.yaml reproduces it
    [p["label"] for p in result.pareto]
    ```
    """
    started = time.time()
    budget = Budget.parse(budget, minimize)
    space = load_space(space)
    settings = TuneSettings.load(settings)
    if settings.latency is None:  # time latency (trials and the final table) only when the budget asks for it
        asked = set(LATENCY_KEYS) & (set(budget.limits) | {budget.minimize})
        settings = dataclasses.replace(settings, latency=bool(asked))
    evaluation = EvaluationConfig.from_dict({"per_stage": False, "latency": settings.latency, **(evaluation or {})},
                                            where="evaluation").to_dict()
    if tokenizer is None:
        raise RecipeError("tune needs the model's tokenizer: quality is the KL to the original on calibration text")
    check_args(budget, space, settings, trials, workers, time_budget, resume, output)
    location = StudyStorage(storage, study_name, heartbeat)
    if detach and not location.is_rdb:
        raise RecipeError("detach=True: only with storage= (workers elsewhere); without it every worker is this run's")
    check_placement(model)
    check_workers(workers, sum(t.numel() * t.element_size() for t in model.state_dict().values()), loaded=True)
    optuna_module()  # a missing backend fails here, before any work
    if output is not None:
        check_output(output, resume, overwrite)  # before the study is touched: nothing changes on a refusal
    prepare_study(location, resume, overwrite)
    existed = output is not None and Path(output).expanduser().exists()
    out, tuning, temporary = prepare_output(output, resume, overwrite)
    was_training = model.training
    model.eval()
    unmap_weights(model)  # trials share its tensors; in a checkpoint's mapping, no copy of them could be freed
    deadline = started + time_budget if time_budget else None  # the sensitivity pass counts too
    try:
        try:
            tctx, spec = setup_run(model, tokenizer, budget, space, settings, calibration, tuning, seed, resume,
                                progress, deadline, journal=not location.is_rdb)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt) and not temporary and (tuning / RUN_FILE).is_file():
                # Ctrl-C / SIGTERM in the sensitivity pass: what was scored is on disk, module by module.
                logger.warning("tune: interrupted before the search; the sensitivities scored so far are kept in %s: "
                               "continue with --resume", tuning)
            elif not resume:  # nothing was searched yet: leave nothing behind
                shutil.rmtree(tuning if existed else out, ignore_errors=True)
            raise
        study, stopped = _search(tctx, spec, model, tuning, trials, workers, deadline, progress, resume, model_path,
                                 started, location, detach)
        how = FinalBuild(tokenizer, calibration, eval_text, evaluation, command, calibrate, deadline)
        return _finish(model, study, tctx, spec, out if not temporary else None, trials, stopped, how,
                       started)
    finally:
        model.train(was_training)
        # A copy of the original saved for worker processes is not part of the artifact (nor of a push).
        shutil.rmtree(tuning / ORIGINAL_COPY, ignore_errors=True)
        if temporary:
            shutil.rmtree(out, ignore_errors=True)


def _search(tctx: TrialContext, spec: dict[str, Any], model, tuning: Path, trials: int, workers: int,
            deadline: float | None, progress, resume: bool, model_path: str | None, started: float,
            location: StudyStorage, detach: bool = False):
    """Queue the baselines, run trials here and in ``workers - 1`` more processes; return (study, why it stopped)."""
    study = open_study(tuning, tctx.budget, spec["seed"], storage=location)
    if location.is_rdb:  # what `hfsqueeze tune-worker` on another machine reads
        files = {name: (tuning / name).read_text() for name in (CALIBRATION_FILE, SENSITIVITY_FILE)
                 if (tuning / name).is_file()}
        publish(study, {"spec": spec, "trials": trials, "deadline": deadline, "heartbeat": location.heartbeat}, files)
    with study_lock(location, tuning):  # two starters must not both queue what is missing
        if resume and location.is_rdb:
            # Only trials whose heartbeat stopped are dead: others may be running on another machine.
            optuna_module().storages.fail_stale_trials(study)
        elif resume:
            mark_interrupted(study)
        if resume:
            requeue_interrupted(study)
        queued = enqueue_baselines(study, plan_baselines(tctx, trials))
    logger.info("tune: %d baseline trial(s) queued (uniform stock recipes and solved points)", queued)
    objective = Objective(tctx, trials, tuning, deadline)
    callbacks = [progress_callback(tctx.budget, trials, workers, started, progress)]
    procs = _spawn_workers(model, tctx, tuning, workers, trials, deadline, model_path, location)
    stopped = "done"
    with _ctrl_c_stops(study) as interrupted:
        try:
            optimize(study, objective, deadline=deadline, callbacks=callbacks)
            if interrupted:
                raise KeyboardInterrupt
            _wait(procs)
        except KeyboardInterrupt:
            stopped = "terminated" if signal.SIGTERM in interrupted else "interrupted"
            _interrupt(procs)
            if location.is_rdb and not detach:  # workers elsewhere finish their running trial and stop
                announce_stop(study, stopped)
        except BaseException:
            _interrupt(procs)
            raise
    if stopped == "done" and counted(study)[0] < trials:
        stopped = "time budget" if deadline is not None and time.time() >= deadline else "done"
    return study, stopped


@contextlib.contextmanager
def _ctrl_c_stops(study):
    """While searching, Ctrl-C (SIGINT) also stops the study and is remembered (the yielded list gets the signal);
    so is SIGTERM where the caller raises on it (the CLI raises a `KeyboardInterrupt` subclass).

    Python raises KeyboardInterrupt wherever the main thread is, and inside a destructor (a trial frees whole
    models, optuna runs `gc.collect()` after each) it is only printed and dropped: the search then ran on to its last
    trial. With the stop flag and the record the search ends after the current trial even then."""
    interrupted: list[int] = []
    # Only in the main thread, and only where the signal raises: Ctrl-C not ignored (a background job) nor handled
    # otherwise by the caller; SIGTERM when the caller installed a Python handler (by default it kills the process).
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    handlers = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    wrapped = {signum: handler for signum, handler in handlers.items()
               if handler is signal.default_int_handler or (signum == signal.SIGTERM and callable(handler))}

    def on_signal(signum, frame):
        interrupted.append(signum)
        with contextlib.suppress(RuntimeError):  # outside `optimize` there is nothing to stop
            study.stop()
        handlers[signum](signum, frame)
        raise KeyboardInterrupt  # the caller's handler returned without raising

    for signum in wrapped:
        signal.signal(signum, on_signal)
    try:
        yield interrupted
    finally:
        for signum, handler in wrapped.items():
            signal.signal(signum, handler)


def _spawn_workers(model, tctx: TrialContext, tuning: Path, workers: int, trials: int, deadline: float | None,
                   model_path: str | None, location: StudyStorage) -> list[subprocess.Popen]:
    if workers < 2:
        return []
    if model_path is None:
        model_path = str(tuning / ORIGINAL_COPY)
        if not (Path(model_path) / "config.json").is_file():
            model.save_pretrained(model_path)
            tctx.tokenizer.save_pretrained(model_path)
    device = input_device(model)
    spread = len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1
    placement = worker_placement(str(device), spread, workers, visible_gpus() if device.type == "cuda" else [])
    job = {"model_path": model_path, "trials": trials, "deadline": deadline,
           "device_map": {str(i): where for i, (_, where) in enumerate(placement, start=1)},
           "study": location.name, "heartbeat": location.heartbeat}
    (tuning / "workers.json").write_text(json.dumps(job) + "\n")
    threads = max(1, (os.cpu_count() or 1) // workers)
    # The workers import this very hfsqueeze (not another install that happens to come first on their path).
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([root, os.environ["PYTHONPATH"]]) if os.environ.get("PYTHONPATH") else root
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    if location.url is not None:  # in the environment, not in workers.json: the URL may hold a password
        env[STORAGE_ENV] = location.url
    procs = []
    for index, (gpu, _) in enumerate(placement, start=1):
        # A worker with a GPU of its own sees only that one (as its cuda:0).
        own = {**env, "CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else env
        with open(tuning / f"worker-{index}.log", "a") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen([sys.executable, "-m", "hfsqueeze.tune.worker", str(tuning), str(index)],
                                          stdout=log, stderr=subprocess.STDOUT, env=own))
    return procs


def _wait(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.wait()
        if proc.returncode not in (0, None):
            logger.warning("tune: a worker process exited with status %s (see its log in tuning/)", proc.returncode)


def _interrupt(procs: list[subprocess.Popen]) -> None:
    """Ctrl-C: workers get SIGINT too (their running trial is marked failed and they exit)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def tuning_section(tctx: TrialContext, spec: dict[str, Any], records: list[TrialRecord], pareto: list[int],
                   chosen: TrialRecord | None, trials: int, stopped: str, started: float) -> dict[str, Any]:
    """The report's ``tuning`` section: budget, objective, space, every trial, the Pareto set, the choice."""
    return {
        "budget": tctx.budget.to_dict(),
        "objectives": tctx.budget.objectives(),
        "space": tctx.space.to_dict(),
        "settings": tctx.settings.to_dict(),
        "seed": spec["seed"],
        "original": {"disk_bytes": spec["original_bytes"], "parameters": spec["original_params"],
                     "fingerprint": spec["fingerprint"]},
        "calibration": {"file": f"{TUNING_DIR}/{CALIBRATION_FILE}", "tokens": int(tctx.blocks.numel()),
                        "hash": spec["calibration_hash"],
                        **_only_set(warning=calibration_warning(int(tctx.blocks.numel()), tctx.settings))},
        # Scores read from a cache are reported as such (and from where): only ``seconds`` was spent in this run.
        "sensitivity": {k: {"tokens": v["tokens"], "seconds": v["seconds"], "cached": v["cached"],
                            "cached_modules": v["cached_modules"], "cached_from": v["cached_from"],
                            "most_sensitive": sorted(v["scores"], key=v["scores"].get, reverse=True)[:5],
                            **({"unscored": len(v["unscored"])} if v.get("unscored") else {})}
                        for k, v in tctx.sensitivity.items()},
        "trials_requested": trials,
        "stopped": stopped,
        "wall_seconds": round(time.time() - started, 1),
        "trials": [r.to_dict() for r in records],
        "pareto": pareto,
        "chosen": chosen.number if chosen else None,
        "plot": f"{TUNING_DIR}/{PARETO_PNG}",
    }


def _only_set(**items: Any) -> dict[str, Any]:
    return {k: v for k, v in items.items() if v is not None}


def _finish(model, study, tctx: TrialContext, spec: dict[str, Any], out: Path | None, trials: int,
            stopped: str, how: FinalBuild, started: float) -> TuneResult:
    """Write trials.jsonl and the plot; rebuild the chosen point with `compress` (and calibrated, keeping the
    better: `FinalBuild`), re-measure it on the held-out evaluation text and save it (a normal artifact, ``tuning/``
    inside)."""
    tuning = tctx.workdir
    records = study_records(study)
    write_trials_jsonl(tuning, records)
    pareto = sorted(t.number for t in study.best_trials if t.user_attrs.get("duplicate_of") is None)
    chosen = best_record(records, tctx.budget)
    limits = _plot_limits(tctx.budget, spec)
    plot_pareto(tuning / PARETO_PNG, records, pareto, chosen.number if chosen else None,
                tctx.budget.objectives(), limits)
    section = tuning_section(tctx, spec, records, pareto, chosen, trials, stopped, started)
    (tuning / "summary.json").write_text(json.dumps({k: v for k, v in section.items() if k != "trials"}, indent=1,
                                                    default=str) + "\n")
    if chosen is None and not records and stopped == "time budget":
        cut = sum(1 for v in tctx.sensitivity.values() if v.get("unscored"))
        what = "the sensitivity pass cut short" if cut else "sensitivity pass included"
        raise RecipeError(f"--time-budget ran out before any trial finished ({time.time() - started:.0f}s, {what}); "
                          "give a longer time budget")
    if chosen is None:
        raise InfeasibleBudgetError(_infeasible_message(records, tctx.budget))
    logger.info("tune: chosen %s; re-measuring it on the held-out evaluation text", describe_record(chosen))
    description = f"hfsqueeze tune: lowest {tctx.budget.minimize} within {tctx.budget.describe()}"
    final, report = how.build(model, chosen.stages, description)
    final, report, calibrated = how.refine(model, chosen.stages, description, final, report)
    if calibrated is not None:
        section["calibrated"] = calibrated
    section["final_eval"] = report.final.to_dict() if report.final else None
    report.tuning = section
    by_number = {r.number: r.to_dict() for r in records}  # the public result holds plain dicts
    result = TuneResult(recipe=report.recipe, chosen=chosen.to_dict(),
                        pareto=[by_number[n] for n in pareto if n in by_number], trials=list(by_number.values()),
                        report=report, model=final, stopped=stopped)
    if out is not None:
        staged = staging_dir(out)
        save_compressed(final, staged, tokenizer=how.tokenizer, report=report)
        install_artifact(staged, out)
        result.output = out
    return result


def _infeasible_message(records: list[TrialRecord], budget: Budget) -> str:
    measured = [r for r in records if not r.skipped and r.duplicate_of is None]
    skipped = [r for r in records if r.skipped]
    closest = closest_record(records)
    if closest is not None:
        where = f"; closest point found: {describe_record(closest)}"
    elif skipped:
        smallest = min(r.metric("size") for r in skipped)
        where = (f" (no trial finished; {len(skipped)} points were predicted over the size limit, the smallest at "
                 f"{smallest:.3f}x)")
    else:
        where = " (no trial finished)"
    return f"no point within the budget {budget.describe()} after {len(measured)} trials{where}"


def _plot_limits(budget: Budget, spec: dict[str, Any]) -> dict[str, float]:
    limits = {k: v for k, v in budget.limits.items() if k in ("kl", "prefill", "decode")}
    size = budget.size_limit_bytes(spec["original_bytes"], spec["original_params"])
    if size is not None:
        limits["size"] = size / spec["original_bytes"]
    return limits


__all__ = ["TuneResult", "TuneSettings", "make_context", "tune"]
