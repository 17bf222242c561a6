"""A worker process of `hfsqueeze.tune` (``--workers N`` starts N - 1 of these next to the main process).

``python -m hfsqueeze.tune.worker TUNING_DIR INDEX`` loads the original model named in ``TUNING_DIR/workers.json``,
checks that it is the model the study was started with, and runs trials on the shared study until the trial budget or
the deadline is reached. Sensitivities come from ``TUNING_DIR/sensitivity.json`` (the main process scored them).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from ..artifact.load import load_model
from ..core.utils import quiet_transformers_progress
from .sensitivity import fingerprint
from .study import Objective, counted, open_study, optimize
from .tuner import RUN_FILE, make_context

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
    study = open_study(tuning, tctx.budget, spec["seed"], worker=index)
    try:
        optimize(study, Objective(tctx, job["trials"], tuning), deadline=job["deadline"], callbacks=[_stopper(job)])
    except KeyboardInterrupt:
        logger.info("interrupted")
        return 130
    return 0


def _stopper(job):
    def callback(study, trial) -> None:
        if counted(study)[0] >= job["trials"]:
            study.stop()

    return callback


if __name__ == "__main__":
    sys.exit(main())
