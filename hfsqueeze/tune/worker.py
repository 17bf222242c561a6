"""Worker processes of `hfsqueeze.tune`.

- ``python -m hfsqueeze.tune.worker TUNING_DIR INDEX`` (``--workers N`` starts N - 1 of these next to the main
  process) loads the original model named in ``TUNING_DIR/workers.json``, checks that it is the model the study was
  started with, and runs trials on the shared study until the trial budget or the deadline is reached. Sensitivities
  come from ``TUNING_DIR/sensitivity.json`` (the main process scored them).
- `join` (``hfsqueeze tune-worker --storage URL --study NAME --model PATH``) needs nothing else: on any machine, in
  any directory, it reads the run, the calibration text and the sensitivities from the study (an RDB study started by
  ``hfsqueeze tune --storage URL``) and runs trials until the coordinator's budget is used or it is told to stop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..artifact.load import load_model
from ..core.errors import RecipeError
from ..core.utils import quiet_transformers_progress
from .prepare import CALIBRATION_FILE, RUN_FILE, SENSITIVITY_FILE, STORAGE_ENV, make_context
from .sensitivity import fingerprint, tokens_hash
from .storage import StudyStorage, hfsqueeze_version, published, stop_reason
from .study import Objective, counted, open_study, optimize, optuna_module

logger = logging.getLogger("hfsqueeze")


def main(argv: list[str] | None = None) -> int:
    tuning, index = Path(sys.argv[1] if argv is None else argv[0]), int(sys.argv[2] if argv is None else argv[1])
    logging.basicConfig(level=logging.INFO, format=f"[worker {index}] %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    quiet_transformers_progress()
    spec = json.loads((tuning / RUN_FILE).read_text())
    job = json.loads((tuning / "workers.json").read_text())
    # The device the main process chose for this worker (its own GPU when there are several); a study started
    # before workers had one runs on the CPU.
    where = (job.get("device_map") or {}).get(str(index))
    model, tokenizer = load_model(job["model_path"], dtype=getattr(torch, spec["dtype"]),
                                  **({"device_map": where} if where else {}))
    if fingerprint(model) != spec["fingerprint"]:
        logger.error("the model at %s is not the one this study was started with", job["model_path"])
        return 2
    tctx = make_context(model, tokenizer, spec, tuning)
    location = StudyStorage(os.environ.get(STORAGE_ENV), job.get("study", StudyStorage.name),
                            job.get("heartbeat", StudyStorage.heartbeat))
    study = open_study(tuning, tctx.budget, spec["seed"], worker=index, storage=location)
    try:
        optimize(study, Objective(tctx, job["trials"], tuning, job["deadline"]), deadline=job["deadline"],
                 callbacks=[_stopper(job["trials"])])
    except KeyboardInterrupt:
        logger.info("interrupted")
        return 130
    return 0


def _stopper(trials: int):
    """Stop after a trial once the study's trials are done, or the coordinator announced a stop (Ctrl-C)."""

    def callback(study, trial) -> None:
        if counted(study)[0] >= trials or stop_reason(study):
            study.stop()

    return callback


def _published_study(location: StudyStorage, study_name: str, where: str, wait: float):
    """The study and the run its coordinator published, waiting up to ``wait`` seconds for either to appear."""
    optuna = optuna_module()
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        try:
            try:
                study = optuna.load_study(study_name=study_name, storage=location.open())
            except KeyError:
                raise RecipeError(f"there is no study {where}; start it with hfsqueeze tune --storage URL --study "
                                  "NAME (or check --study)") from None
            return (study, *published(study, where))
        except RecipeError as exc:
            if time.monotonic() >= deadline:
                raise RecipeError(f"{exc} (waited {wait:g}s)" if wait > 0 else str(exc)) from None
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def join(storage: str, study_name: str, model_path: str, *, placement: dict[str, Any] | None = None,
         workdir: str | os.PathLike | None = None, trust_remote_code: bool = False, wait: float = 0.0
         ) -> dict[str, Any]:
    """Join the RDB study ``study_name`` at ``storage`` and run its trials on the model at ``model_path`` until its
    trial budget is used, its deadline passes or its coordinator stops it.

    Refuses, in one line, a study that hfsqueeze tune did not start, another hfsqueeze version, and a model (or
    tokenizer) other than the one the study was started with. ``placement`` holds ``device_map``/``dtype`` (the
    CLI's ``--device``/``--dtype``; the dtype defaults to the study's). ``workdir`` keeps the calibration text,
    sensitivities and this worker's ``trials.jsonl`` (default: a temporary directory, removed at the end).
    ``wait``: seconds to wait for a study that does not exist yet or has not published its run (a worker started
    before its coordinator has scored the sensitivities).

    Returns: ``{"study", "trials_here", "done", "trials", "stopped"}``.
    """
    location = StudyStorage(storage, study_name)
    where = f"{study_name!r} in {location.describe()}"
    study, run, files = _published_study(location, study_name, where, wait)
    if run.get("version") != hfsqueeze_version():
        raise RecipeError(f"study {where} was started by hfsqueeze {run.get('version')}, this is hfsqueeze "
                          f"{hfsqueeze_version()}: install the same version on every machine")
    spec = run["spec"]
    location = StudyStorage(storage, study_name, run.get("heartbeat", location.heartbeat))
    kwargs = {"dtype": getattr(torch, spec["dtype"]), **(placement or {})}
    model, tokenizer = load_model(model_path, **kwargs, **({"trust_remote_code": True} if trust_remote_code else {}))
    if fingerprint(model) != spec["fingerprint"]:
        raise RecipeError(f"the model at {model_path} is not the one study {where} was started with (its config or "
                          "weights differ); give every worker the coordinator's --model")
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="hfsqueeze-worker-") if own else workdir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name in (CALIBRATION_FILE, SENSITIVITY_FILE):
            if name in files:
                (work / name).write_text(files[name])
        tctx = make_context(model, tokenizer, spec, work, deadline=run["deadline"])
        if tokens_hash(tctx.blocks) != spec["calibration_hash"]:
            raise RecipeError(f"the tokenizer at {model_path} reads the calibration text of study {where} into "
                              "other tokens; give every worker the coordinator's --model")
        # A seed of its own (seed + worker index on one machine; here the process id keeps workers apart).
        worker_seed = 1000 + os.getpid() % 100_000
        study = open_study(work, tctx.budget, spec["seed"], worker=worker_seed, storage=location)
        before = _mine(study)
        logger.info("tune-worker: joined study %s (%d of %d trials done)", where, counted(study)[0], run["trials"])
        try:
            optimize(study, Objective(tctx, run["trials"], work, run["deadline"]), deadline=run["deadline"],
                     callbacks=[_stopper(run["trials"])])
            reason = stop_reason(study)
            stopped = f"stopped by the coordinator ({reason})" if reason else "done"
        except KeyboardInterrupt:
            stopped = "interrupted"
        return {"study": study_name, "trials_here": _mine(study) - before, "done": counted(study)[0],
                "trials": run["trials"], "stopped": stopped}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _mine(study) -> int:
    """Trials this process ran (finished or failed) in ``study``."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
               if t.user_attrs.get("worker") == os.getpid())


if __name__ == "__main__":
    sys.exit(main())
