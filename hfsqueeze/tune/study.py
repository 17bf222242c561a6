"""The optuna study behind `hfsqueeze.tune`: storage, sampler, baselines, the objective, worker processes.

The study lives in ``tuning/study.journal`` (`optuna.storages.JournalStorage` on a `JournalFileBackend`), which
several local processes can share and which survives Ctrl-C and kill -9: on resume, trials that were running when the
process died are marked failed (``interrupted``), finished ones are kept, and interrupted points are queued again
(`check_journal` first repairs a torn last line, and refuses a journal damaged elsewhere). The sampler is pinned
(multi-objective TPE, seeded per worker), because optuna 5 changed its defaults.
Constraints go through `optuna.trial.Trial.set_constraint`, so ``study.best_trials`` is the feasible Pareto set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError, BackendMissingError
from ..core.utils import atomic_write
from ..evaluation.metrics import TRIAL_COLUMNS, metric_key
from ..evaluation.trials import TrialRecord, normalize_metrics
from ..registry import find_stage
from .budget import Budget, describe_bytes
from .sensitivity import format_key
from .solve import estimate_bytes, solve
from .space import PRUNE, Space, enqueue_params, plan_of, suggest
from .storage import JOURNAL, StudyStorage, retried
from .trial import TrialContext, predict, run_point

logger = logging.getLogger("hfsqueeze")

# A point predicted this far over the size limit is skipped (the size model is exact to about 0.01%).
SKIP_MARGIN = 1.002
# Objective value of what a skipped point did not measure (its constraints already mark it infeasible).
UNMEASURED = 1e6
TRIALS_JSONL = "trials.jsonl"

Q8 = {"quantize.bits": 8, "quantize.threshold": 6.0}
Q4 = {"quantize.bits": 4, "quantize.double_quant": False, "quantize.compute_dtype": "float32"}
# The uniform stock recipes: what one line of Transformers gives, with and without a 16-bit rest.
UNIFORM = [
    ("int8", Q8),
    ("nf4", {**Q4, "quantize.quant_type": "nf4"}),
    ("nf4-dq", {**Q4, "quantize.quant_type": "nf4", "quantize.double_quant": True}),
    ("fp4", {**Q4, "quantize.quant_type": "fp4"}),
]


def optuna_module():
    """optuna, quiet; a `BackendMissingError` with the pip command when it is not installed."""
    try:
        import optuna
    except ImportError as exc:
        raise BackendMissingError("hfsqueeze tune needs optuna, a dependency of hfsqueeze that is missing from "
                                  "this environment; reinstall it with: pip install 'optuna>=5'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_study(tuning_dir: Path | None, budget: Budget, seed: int, worker: int = 0,
               storage: StudyStorage | None = None):
    """Create or load the study (in ``tuning_dir``'s journal, or where ``storage`` says) with a pinned, seeded sampler
    (seed + worker index)."""
    optuna = optuna_module()
    storage = storage or StudyStorage()
    name = storage.name
    storage = storage.open(tuning_dir)
    sampler = optuna.samplers.TPESampler(seed=seed + worker, multivariate=True, group=True, constant_liar=True,
                                         n_startup_trials=8)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                               directions=["minimize"] * len(budget.objectives()), load_if_exists=True)


def _journal_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "op_code" in record


def _finished_trials(tuning_dir: Path) -> int:
    """Trials ``trials.jsonl`` records as finished (lines that do not parse are not counted)."""
    path = Path(tuning_dir) / TRIALS_JSONL
    count = 0
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            count += isinstance(record, dict) and record.get("state") == "COMPLETE"
    return count


def check_journal(tuning_dir: Path) -> None:
    """Before a resume: repair a torn last line of ``study.journal`` (what kill -9 or a full disk leaves), keeping the
    original as a backup; refuse (one line) a journal damaged before its last line, or empty while ``trials.jsonl``
    records finished trials (resuming would silently start over)."""
    path = Path(tuning_dir) / JOURNAL
    data = path.read_bytes() if path.is_file() else b""
    if not data.strip():
        finished = _finished_trials(tuning_dir)
        if finished:
            raise ArtifactError(f"--resume: {path} is {'empty' if path.exists() else 'missing'} but "
                                f"{TRIALS_JSONL} records {finished} finished trial(s); the study cannot be continued, "
                                "start over with --overwrite")
        return
    lines = data.split(b"\n")
    tail = lines.pop()  # empty when the file ends with a newline, as every complete journal does
    records = lines + ([tail] if tail else [])
    bad = [i for i, line in enumerate(records) if not _journal_record(line)]
    if not bad and not tail:
        return
    if bad and bad != [len(records) - 1]:
        raise ArtifactError(f"--resume: {path} is damaged at line {bad[0] + 1} of {len(records)} (not a journal "
                            "record), before its last line: the study cannot be continued, start over with "
                            "--overwrite")
    keep = records if not bad else records[:-1]  # a complete last record that only lost its newline is kept
    backup = path.with_name(f"{JOURNAL}.torn-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.copy2(path, backup)
    atomic_write(path, b"".join(line + b"\n" for line in keep))
    logger.warning("tune: the last line of %s was %s (a killed process or a full disk leaves that); the study resumes "
                   "from the %d records before it, the original is kept as %s", path,
                   "cut off" if not bad else "not a journal record", len(keep), backup.name)


def requeue_interrupted(study) -> int:
    """Queue again the points of search trials that were interrupted and not redone yet (baselines are queued again
    by `enqueue_baselines`); return how many."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    redone = {t.user_attrs.get("redo_of") for t in trials}
    count = 0
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") and \
                trial.user_attrs.get("kind", "search") == "search" and trial.number not in redone and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"kind": "search", "redo_of": trial.number})
            count += 1
    return count


def mark_interrupted(study) -> int:
    """Mark trials left running by a dead process as failed (``interrupted``); return how many."""
    from optuna.trial import TrialState

    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        count += 1
    if count:
        logger.info("resume: %d trial(s) interrupted by the previous run are marked failed and will be redone", count)
    return count


# A trial's user attribute: it only waits for the last running trials to end (`Objective._room_after_waiting`).
WAITING = "waiting_for_others"


def counted(study, exclude: int | None = None, trials: list | None = None) -> tuple[int, int]:
    """(finished trials that count toward ``--trials``, trials running a point now or queued to run one again)
    excluding trial ``exclude``. A queued redo (a dead process's point, `storage.requeue_stale`) holds its slot:
    otherwise a fresh trial asked just before it was queued takes the slot and the dead worker's point never runs."""
    from optuna.trial import TrialState

    done = running = 0
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    lost = retried(trials)  # failed for a lost heartbeat and queued again: interrupted, not done
    for trial in trials:
        if trial.number == exclude or trial.number in lost:
            continue
        if trial.user_attrs.get("skipped") or trial.user_attrs.get("duplicate_of") is not None:
            continue
        if trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL
                                                  and not trial.user_attrs.get("interrupted")):
            done += 1
        elif (trial.state == TrialState.RUNNING and not trial.user_attrs.get(WAITING)) or _queued_redo(trial):
            running += 1
    return done, running


def _queued_redo(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.WAITING and trial.user_attrs.get("redo_of") is not None


# ---- baselines -----------------------------------------------------------------------------------------------
def baseline_points(space: Space) -> list[tuple[str, dict[str, Any]]]:
    """Uniform stock recipes (and their 16-bit-rest variants), then solved points, as full points of ``space``."""
    extra = {f"{PRUNE}.enabled": False} if PRUNE in space.sections else {}
    points = []
    for name, fmt in UNIFORM:
        for rest in ("fp32", "bf16"):
            label = name if rest == "fp32" else f"{name}+bf16-rest"
            points.append((f"uniform:{label}", {**fmt, "quantize.rest_dtype": rest, "quantize.keep": 0.0, **extra}))
    for dtype in ("bf16", "fp16"):
        points.append((f"uniform:{dtype}", {"quantize.bits": 16, "quantize.dtype": dtype, **extra}))
    return points


def solved_points(space: Space, budget: Budget) -> list[tuple[str, dict[str, Any]]]:
    """The solver's own answer per format, with a 16-bit rest (it leaves the most bytes for kept modules); int8 also
    at threshold 1.0, first (measured best for quality on SmolLM2)."""
    extra = {f"{PRUNE}.enabled": False} if PRUNE in space.sections else {}
    keep = 1.0 if budget.size_limit_bytes(1, 1) is not None or budget.quality_kl_target() is None else 0.5
    formats = [("int8-t1", {**Q8, "quantize.threshold": 1.0}), ("int8", Q8)] + UNIFORM[1:]
    points = [(f"solved:{name}+bf16-rest", {**fmt, "quantize.rest_dtype": "bf16", "quantize.keep": keep, **extra})
              for name, fmt in formats]
    # fp16 keeps 3 more mantissa bits than bf16 (SmolLM2: KL 2e-5 vs 1.2e-3 as a plain cast), at the same size.
    points.insert(1, ("solved:int8-t1+fp16-rest", {**points[0][1], "quantize.rest_dtype": "fp16"}))
    return points


def plan_baselines(tctx: TrialContext, limit: int) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """Baselines to enqueue: solved points (best estimated KL first), then uniform ones, each representable in the
    space, predicted to fit the size budget, and distinct as recipes; at most ``limit``."""
    size_limit = tctx.budget.size_limit_bytes(tctx.original_bytes, tctx.original_params)
    seen, solved, uniform = set(), [], []
    for kind, point in solved_points(tctx.space, tctx.budget) + baseline_points(tctx.space):
        params = enqueue_params(tctx.space, point)
        if params is None:
            continue
        plan = plan_of(point)
        if plan.bits in (4, 8):
            scores = tctx.sensitivity.get(format_key(plan.quantize), {}).get("scores", {})
            sol = solve(tctx.original, plan.quantize, plan.rest_dtype, scores, keep=plan.keep, size_limit=size_limit,
                        kl_target=tctx.budget.quality_kl_target(), sizes=tctx.sizes)
            predicted, est_kl, stages = sol.predicted_bytes, sol.predicted_kl, plan.stages(sol.skip_modules)
        else:
            predicted = estimate_bytes(tctx.original, None, plan.quantize["dtype"], sizes=tctx.sizes)
            est_kl, stages = 0.0, plan.stages()
        if size_limit is not None and predicted > size_limit:  # the size model is exact: no budget spent on it
            continue
        key = json.dumps(stages, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        (solved if kind.startswith("solved") else uniform).append((est_kl, kind, params, point))
    ordered = sorted(solved, key=lambda x: x[0]) + sorted(uniform, key=lambda x: x[0])
    if len(ordered) > limit:
        logger.warning("tune: %d baselines (uniform stock recipes and solved points) but only %d trials; the %d with "
                       "the lowest estimated KL run", len(ordered), limit, limit)
    return [(kind, params, point) for _, kind, params, point in ordered[:limit]]


def enqueue_baselines(study, baselines: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> int:
    """Queue the baselines not already in the study (finished, failed on their own, queued or running)."""
    from optuna.trial import TrialState

    present = {t.user_attrs.get("kind") for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.FAIL or not t.user_attrs.get("interrupted")}
    count = 0
    for kind, params, _ in baselines:
        if kind not in present:
            study.enqueue_trial(params, user_attrs={"kind": kind})
            count += 1
    return count


# ---- the objective -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Objective:
    """Draws a point, runs it (`hfsqueeze.tune.trial.run_point`), records it; failures are recorded, not raised
    past optuna (``catch``)."""

    tctx: TrialContext
    trials: int
    tuning_dir: Path
    deadline: float | None = None

    def __call__(self, trial) -> list[float]:
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: not the point's fault. optuna records the trial failed; marked interrupted, it does
            # not count toward --trials and --resume runs its point again.
            with contextlib.suppress(Exception):
                trial.set_user_attr("interrupted", True)
            raise

    def _run(self, trial) -> list[float]:
        optuna = optuna_module()
        done, running = counted(trial.study, exclude=trial.number)
        if done + running >= self.trials:
            # While it waits, this trial runs no point: others must not wait for it (two waiting processes would wait
            # for each other, and a dead worker's point queued again would never run).
            trial.set_user_attr(WAITING, True)
            if not self._room_after_waiting(trial.study, trial.number):
                trial.study.stop()
            raise optuna.TrialPruned("the trial budget is used up")
        trial.set_user_attr("worker", os.getpid())
        trial.set_user_attr("host", socket.gethostname())
        point = suggest(trial, self.tctx.space)
        trial.set_user_attr("point", point)
        skipped = self._over_size(trial, point)
        if skipped is not None:
            return skipped
        repeated = self._repeat(trial, point)
        if repeated is not None:
            return repeated
        try:
            result = run_point(self.tctx, point)
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            append_record(self.tuning_dir, trial_record(trial, "FAIL"))
            logger.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, str(exc)[:200])
            raise
        for key in ("stages", "metrics", "solution", "seconds"):
            trial.set_user_attr(key, result[key])
        for key, value in self.tctx.budget.constraints(result["metrics"]).items():
            trial.set_constraint(key, value)
        values = [float(result["metrics"][metric_key(name)]) for name in self.tctx.budget.objectives()]
        append_record(self.tuning_dir, trial_record(trial, "COMPLETE", values))
        return values


    def _room_after_waiting(self, study, number: int) -> bool:
        """With heartbeats (an RDB study), the last trials may run in processes that die: wait while they run,
        failing those that stop beating (optuna queues their points again, `storage.requeue_stale`). True when a
        point is to be redone (this process runs it next), False when the trials are done or the deadline passed."""
        from optuna.storages import fail_stale_trials

        interval = getattr(study._storage, "get_heartbeat_interval", lambda: None)()
        while interval is not None and (self.deadline is None or time.time() < self.deadline):
            trials = study.get_trials(deepcopy=False)  # read once for both questions
            done, running = counted(study, exclude=number, trials=trials)
            if done >= self.trials:
                return False
            if done + running < self.trials or any(_queued_redo(t) for t in trials):
                return True  # room, or a dead process's point queued again: this process runs it next
            time.sleep(interval)
            fail_stale_trials(study)
        return False

    def _repeat(self, trial, point: dict[str, Any]) -> list[float] | None:
        """A point already measured (the sampler proposes categorical points again) gets that trial's results, marked
        ``duplicate_of``; it is not rebuilt and not counted toward ``--trials``."""
        from optuna.trial import TrialState

        earlier = next((t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                        if t.user_attrs.get("point") == point and not t.user_attrs.get("skipped")
                        and not t.user_attrs.get("duplicate_of")), None)
        if earlier is None:
            return None
        if sum(1 for t in trial.study.get_trials(deepcopy=False) if t.user_attrs.get("duplicate_of") is not None) \
                > 5 * self.trials:
            trial.study.stop()  # the sampler keeps proposing what it has seen: stop rather than spin
        trial.set_user_attr("duplicate_of", earlier.number)
        for key in ("stages", "solution"):
            trial.set_user_attr(key, earlier.user_attrs.get(key))
        trial.set_user_attr("metrics", normalize_metrics(earlier.user_attrs.get("metrics")))
        for key, value in (earlier.constraints or {}).items():
            trial.set_constraint(key, value)
        append_record(self.tuning_dir, trial_record(trial, "COMPLETE", list(earlier.values)))
        return list(earlier.values)

    def _over_size(self, trial, point: dict[str, Any]) -> list[float] | None:
        """Skip a point the exact size model puts over the size limit: recorded as infeasible (so the sampler
        learns), not built, not measured, not counted toward ``--trials``."""
        limit = self.tctx.budget.size_limit_bytes(self.tctx.original_bytes, self.tctx.original_params)
        predicted = predict(self.tctx, point) if limit is not None else None
        if predicted is None or predicted[0] <= limit * SKIP_MARGIN:
            return None
        size, stages = predicted
        if sum(1 for t in trial.study.get_trials(deepcopy=False) if t.user_attrs.get("skipped")) > 5 * self.trials:
            trial.study.stop()  # the space is mostly over the budget: stop rather than spin
        metrics = {"disk_bytes": size, "size": size / self.tctx.original_bytes,
                   "bits": 8 * size / self.tctx.original_params}
        trial.set_user_attr("skipped", f"predicted size {describe_bytes(size)} is over the limit "
                                       f"{describe_bytes(limit)}")
        trial.set_user_attr("stages", stages)
        trial.set_user_attr("metrics", metrics)
        for key, value in self.tctx.budget.constraints(metrics).items():  # what was not measured cannot fit
            trial.set_constraint(key, value)
        values = [float(metrics.get(metric_key(name), UNMEASURED)) for name in self.tctx.budget.objectives()]
        append_record(self.tuning_dir, trial_record(trial, "COMPLETE", values))
        return values


def trial_record(trial, state: str, values: list[float] | None = None) -> TrialRecord:
    """The record of a live `optuna.trial.Trial` or a `FrozenTrial` (a study journal of an earlier version holds
    metrics under older keys: `TrialRecord` reads them in today's)."""
    attrs = dict(trial.user_attrs)
    constraints = dict(trial.constraints or {})
    feasible = (state == "COMPLETE" and not attrs.get("skipped") and attrs.get("duplicate_of") is None
                and all(v <= 0 for v in constraints.values()))
    return TrialRecord(
        number=trial.number, state=state, kind=attrs.get("kind", "search"),
        label=recipe_label(attrs["stages"]) if attrs.get("stages") else None, point=attrs.get("point"),
        stages=attrs.get("stages"), metrics=attrs.get("metrics"), solution=attrs.get("solution"),
        constraints=constraints, feasible=feasible, values=values, seconds=attrs.get("seconds"),
        error=attrs.get("error"), interrupted=bool(attrs.get("interrupted")), worker=attrs.get("worker"),
        skipped=attrs.get("skipped"), duplicate_of=attrs.get("duplicate_of"),
    )


def append_record(tuning_dir: Path, record: TrialRecord) -> None:
    """Append one JSON line under a lock (several workers write the same file)."""
    path = Path(tuning_dir) / TRIALS_JSONL
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(record.to_dict(), default=str) + "\n")
        fh.flush()


def study_records(study) -> list[TrialRecord]:
    """Every finished or failed trial of the study as ``trials.jsonl`` records, in trial order."""
    from optuna.trial import TrialState

    out = []
    trials = study.get_trials(deepcopy=False)
    lost = retried(trials)
    for trial in trials:
        if trial.state in (TrialState.COMPLETE, TrialState.FAIL):
            record = trial_record(trial, trial.state.name, list(trial.values) if trial.values else None)
            if trial.number in lost and not record.interrupted:  # a dead worker's trial, run again elsewhere
                record = dataclasses.replace(record, interrupted=True)
            out.append(record)
    return out


# ---- running ----------------------------------------------------------------------------------------------------
def progress_callback(budget: Budget, trials: int, workers: int, started: float,
                      report: Callable[[dict[str, Any]], None] | None):
    """An optuna callback reporting trials done, the best feasible point so far and an ETA."""

    def callback(study, trial) -> None:
        done, _ = counted(study)
        records = study_records(study)
        best = best_record(records, budget)
        finished = [r.seconds for r in records if r.seconds]
        per_trial = sum(finished) / len(finished) if finished else None
        eta = per_trial * max(0, trials - done) / max(1, workers) if per_trial else None
        info = {"phase": "trial", "done": done, "trials": trials, "elapsed": time.time() - started, "eta": eta,
                "best": best.to_dict() if best else None,
                "last": records[-1].to_dict() if records else None}
        logger.info("%s", progress_line(info, budget))
        if report is not None:
            report(info)
        if done >= trials:
            study.stop()

    return callback


def best_record(records: list[TrialRecord], budget: Budget) -> TrialRecord | None:
    """The feasible record with the lowest objective (ties: the lowest second objective)."""
    names = budget.objectives()
    feasible = [r for r in records if r.feasible and r.metrics]
    if not feasible:
        return None
    return min(feasible, key=lambda r: tuple(r.metric(n) for n in names))


def closest_record(records: list[TrialRecord]) -> TrialRecord | None:
    """The measured record with the smallest total constraint excess (for the infeasible message)."""
    measured = [r for r in records if r.measured]
    if not measured:
        return None
    return min(measured, key=lambda r: sum(max(0.0, v) for v in r.constraints.values()))


def describe_record(record: TrialRecord) -> str:
    """``#12 int8 t=2.0 (bf16 rest, 31 kept): size 0.290x, kl 0.0061, ppl +0.40%, prefill 0.93x``: each metric of
    tune's trial table (`TRIAL_COLUMNS`) that a budget can limit, by its budget word."""
    parts = [f"{row.budget} {row.trial_fmt(record.metric(row.key))}" for row in TRIAL_COLUMNS
             if row.budget and record.metric(row.key) is not None]
    return f"#{record.number} {recipe_label(record.stages or [])}: " + ", ".join(parts)


def recipe_label(stages: list[dict[str, Any]]) -> str:
    """A short name for an explicit recipe (``prune h0.12/f0.10 -> int8 t=2 (bf16 rest, 31 kept)``)."""
    words, rest = [], None
    for stage in stages:
        found = find_stage(stage["method"])
        if found is None:  # a method this installation does not know (a journal from another version)
            words.append(stage["method"])
        elif not found.per_module:
            words.append(found.label(stage))
        elif stage["bits"] == 16 and rest is None and stage is not stages[-1]:
            rest = stage.get("dtype", "bf16")  # tuning's 16-bit rest before the 8/4-bit stage
        else:
            words.append(_quant_label(found, stage, rest))
    return " -> ".join(words) or "original"


def _quant_label(found: Any, stage: dict[str, Any], rest: str | None) -> str:
    label = found.label(stage)
    if stage["bits"] == 16:
        return label
    kept = len([s for s in stage.get("skip_modules") or [] if s != "lm_head"])
    return f"{label} ({rest or 'fp32'} rest{f', {kept} kept' if kept else ''})"


def progress_line(info: dict[str, Any], budget: Budget) -> str:
    best = info.get("best")
    eta = f", ETA {_clock(info['eta'])}" if info.get("eta") is not None else ""
    head = f"tune: {info['done']}/{info['trials']} trials, {_clock(info['elapsed'])}{eta}"
    return head + (f"; best so far {describe_record(TrialRecord.from_dict(best))}" if best
                   else "; no point within the budget yet")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def optimize(study, objective: Objective, *, deadline: float | None, callbacks: list) -> None:
    """Run trials in this process until the trial budget, the deadline or ``study.stop()``."""
    timeout = None if deadline is None else max(0.0, deadline - time.time())
    if timeout is not None and timeout <= 0:
        return
    study.optimize(objective, timeout=timeout, callbacks=callbacks, catch=(Exception,), gc_after_trial=True)


__all__ = ["Objective", "best_record", "check_journal", "closest_record", "counted", "describe_record",
           "enqueue_baselines", "mark_interrupted", "open_study", "optimize", "plan_baselines", "requeue_interrupted",
           "study_records"]
