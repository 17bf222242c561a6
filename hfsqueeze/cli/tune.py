"""``hfsqueeze tune``: search compression settings to a budget and save the best point as an artifact."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError, HfSqueezeError, RecipeError
from .common import EXIT_TERMINATED, add_placement_args, placement, recorded_command


def add_parser(sub: Any) -> None:
    t = sub.add_parser("tune", help="search compression settings to a budget; save the best point as an artifact")
    t.add_argument("--model", default=None,
                   help="model directory or Hub id (default: the built-in SmolLM2-135M-Instruct)")
    t.add_argument("--budget", required=True,
                   help="comma-separated limits: size=0.30 (of the original's disk size), size=150MiB, bits=4.5, "
                   "prefill=0.6, decode=0.8 (latency ratios), kl=0.005, ppl=+1%%, top1=0.95")
    t.add_argument("--minimize", default="kl", choices=["kl", "size", "prefill", "decode"],
                   help="objective (default: kl; size/prefill/decode need a quality limit in --budget)")
    t.add_argument("--space", default=None,  # None: tune's default (quantize), named by the stages
                   help="quantize, prune, all, or a YAML file with choices/ranges in place of values")
    t.add_argument("--trials", type=int, default=30, help="trials in total, baselines included (default 30)")
    t.add_argument("--output", required=True, help="artifact directory (its tuning/ folder holds the study)")
    t.add_argument("--overwrite", action="store_true", help="start over in an --output holding a previous run")
    t.add_argument("--resume", action="store_true", help="continue the study in --output")
    t.add_argument("--workers", type=int, default=1,
                   help="processes sharing the study (default 1); each loads its own copy of the model, so at most "
                        "the CPU cores and what memory holds")
    t.add_argument("--time-budget", default=None,
                   help="stop starting trials after this long: seconds, or 90s / 30m / 2h")
    t.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    t.add_argument("--calibration", default="builtin", help="text the search sees (default: built-in train split)")
    t.add_argument("--eval-text", default=None, help="held-out text for the final measurement (default: built-in)")
    t.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="do not build the chosen point again calibrated (GPTQ for 4-bit, folded scales for int8; by "
                        "default both builds are measured on the evaluation text and the better is kept; a "
                        "calibration costs minutes)")
    t.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code when loading")
    t.add_argument("--json", action="store_true", help="print the report (with its tuning section) as JSON")
    t.add_argument("--storage", default=None, metavar="URL",
                   help="keep the study in this optuna RDB (e.g. postgresql://user:password@host:5432/db) instead "
                        "of tuning/study.journal, so `hfsqueeze tune-worker` on other machines joins the search")
    t.add_argument("--study", default="hfsqueeze-tune", metavar="NAME", help="the study's name in --storage")
    t.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                   help="with --storage: a trial silent for twice this long (its worker died) is run again "
                        "(default 60)")
    t.add_argument("--detach", action="store_true",
                   help="with --storage: Ctrl-C stops this process only (it saves the best point so far); the "
                        "workers go on to --trials (default: they finish their running trial and stop)")
    add_placement_args(t)


def _parse_duration(value: str | None) -> float | None:
    if value is None:
        return None
    text = value.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    number = text[:-1] if scale else text
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RecipeError(f"--time-budget: got {value!r}; give seconds or a duration like 90s, 30m, 2h")
    return seconds


def run(args: Any) -> int:
    from ..models import load_model, resolve_model_path
    from ..tune import Budget, TuneSettings, load_space
    from ..tune.prepare import check_args, check_output
    from ..tune.resources import check_workers, weights_on_disk
    from ..tune.space import DEFAULT_SPACE
    from ..tune.storage import StudyStorage, prepare_study
    from ..tune.study import progress_line
    from ..tune.tuner import tune

    budget = Budget.parse(args.budget, args.minimize)  # one-line errors before any heavy work
    space = load_space(args.space if args.space is not None else DEFAULT_SPACE)
    time_budget = _parse_duration(args.time_budget)
    check_args(budget, space, TuneSettings.load(None), args.trials, args.workers, time_budget, args.resume,
               args.output)
    check_output(args.output, args.resume, args.overwrite)
    if args.detach and not args.storage:
        raise RecipeError("--detach: only with --storage (workers elsewhere); without it every worker is this run's")
    storage = {"storage": args.storage, "study_name": args.study, "heartbeat": args.heartbeat,
               "detach": args.detach}
    prepare_study(StudyStorage(args.storage, args.study, args.heartbeat), args.resume, args.overwrite)

    def progress(info: dict) -> None:
        if info.get("phase") == "sensitivity":
            print(f"tune: sensitivity {info['format']}: {info['done']}/{info['total']} modules, "
                  f"ETA {info['eta']:.0f}s", file=sys.stderr, flush=True)
        else:
            print(progress_line(info, budget), file=sys.stderr, flush=True)

    kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}
    kwargs.update(placement(args))  # a bad --device/--dtype fails here, before the model loads
    path = resolve_model_path(args.model)
    check_workers(args.workers, weights_on_disk(path))  # each worker loads its own copy: does it fit?
    model, tokenizer = load_model(path, **kwargs)
    command = recorded_command(args.argv)
    try:
        result = tune(model, tokenizer, budget=budget, space=space, trials=args.trials, output=args.output,
                      overwrite=args.overwrite, resume=args.resume, workers=args.workers, time_budget=time_budget,
                      seed=args.seed, calibration=args.calibration, eval_text=args.eval_text, progress=progress,
                      model_path=path, command=command, calibrate=args.calibrate, **storage)
    except OSError as exc:  # a full disk, a directory made read-only meanwhile: one line, not a traceback
        if isinstance(exc, HfSqueezeError):
            raise
        kept = Path(args.output, "tuning", "run.json").is_file()
        raise ArtifactError(f"tune failed on {exc.filename or args.output} ({exc.strerror or exc}); "
                            + (f"the trials finished so far are kept in {args.output}/tuning/: make room and "
                               "continue with --resume" if kept else "nothing was saved")) from None
    print(result.report.to_json() if args.json else result.report.to_markdown(), file=args.stdout)
    notes = sys.stderr if args.json else args.stdout
    print(f"\nchosen: {result.chosen['label']} (trial {result.chosen['number']}; stopped: {result.stopped})",
          file=notes)
    print(f"Pareto set ({len(result.pareto)} points) and every trial: {args.output}/tuning/; saved to {args.output}",
          file=notes)
    # Stopped by Ctrl-C or SIGTERM: the best point so far is saved, and the exit status still says so.
    return {"interrupted": 130, "terminated": EXIT_TERMINATED}.get(result.stopped, 0)


__all__ = ["add_parser", "run"]
