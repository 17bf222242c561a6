"""``hfsqueeze tune-worker``: run trials of a tune study kept in a database, from any machine."""

from __future__ import annotations

from typing import Any

from .common import add_placement_args, placement


def add_parser(sub: Any) -> None:
    w = sub.add_parser("tune-worker", help="join a tune study kept in a database (hfsqueeze tune --storage)",
                       description="Run trials of the study NAME at URL, started by `hfsqueeze tune --storage URL "
                                   "--study NAME`: the run's settings, calibration text and sensitivities come from "
                                   "the study (the model loads in the study's dtype unless --dtype says otherwise). "
                                   "Exits when its trials are done or its coordinator stops.")
    w.add_argument("--storage", required=True, metavar="URL", help="the optuna RDB URL the coordinator was given")
    w.add_argument("--study", default="hfsqueeze-tune", metavar="NAME", help="the study's name")
    w.add_argument("--model", required=True, help="the coordinator's model (directory or Hub id); checked")
    w.add_argument("--workdir", default=None,
                   help="keep this worker's files here (default: a temporary directory, removed at the end)")
    w.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code when loading")
    w.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the study to exist and its coordinator to publish the run (it does "
                        "after the sensitivity pass); default: refuse at once")
    add_placement_args(w)


def run(args: Any) -> int:
    from ..models import resolve_model_path
    from ..tune.worker import join

    where = placement(args)  # a bad --device/--dtype fails here, before the study is opened
    done = join(args.storage, args.study, resolve_model_path(args.model), workdir=args.workdir,
                placement={k: v for k, v in where.items() if v is not None},
                trust_remote_code=args.trust_remote_code, wait=args.wait)
    print(f"tune-worker: {done['trials_here']} trial(s) run here; study {done['study']}: {done['done']}/"
          f"{done['trials']} trials done ({done['stopped']})", file=args.stdout)
    return 130 if done["stopped"] == "interrupted" else 0


__all__ = ["add_parser", "run"]
