"""The ``hfsqueeze`` command line: a thin layer over the Python API.

User mistakes (bad recipe, missing file, unsupported model, missing backend, non-empty output) print one line on
stderr and exit 2, before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

# Only light imports here: `hfsqueeze --help` must answer without torch; each command imports what it runs.
from . import __version__
from .core.config import did_you_mean
from .core.errors import ArtifactError, HfSqueezeError, HfSqueezeWarning, HubError, RecipeError
from .evaluation.config import EvaluationConfig

logger = logging.getLogger("hfsqueeze")

EXIT_USER_ERROR = 2
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every cleanup (``finally``, temporary directories) runs the same way."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM and return the previous one (no-op outside the main thread)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        return None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USER_ERROR, f"hfsqueeze: error: {message}{_did_you_mean(message)} (see '{self.prog} --help')\n")


def _did_you_mean(message: str) -> str:
    """`` (did you mean 'compress'?)`` for argparse's "invalid choice: 'compres' (choose from ...)" messages."""
    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not found:
        return ""
    return did_you_mean(found.group(1), re.findall(r"'?([\w.-]+)'?", found.group(2)))


def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``-v`` after the subcommand too (``hfsqueeze compress -v``); SUPPRESS keeps one given before it."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress at INFO level")


def _token_flag(parser: argparse.ArgumentParser) -> None:
    """``--token`` as huggingface-cli has it: used for every Hub call of the command, never recorded."""
    parser.add_argument("--token", default=None,
                        help="Hugging Face token for the Hub (default: HF_TOKEN or `hf auth login`); it is never "
                             "written to the report, the card or logs")


def recorded_command(argv: Sequence[str]) -> str:
    """The command line as the report records it, with a ``--token`` value masked."""
    masked, hide = [], False
    for arg in argv:
        masked.append("***" if hide else "--token=***" if arg.startswith("--token=") else arg)
        hide = arg == "--token"
    return "hfsqueeze " + " ".join(shlex.quote(a) for a in masked)


def _add_common_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. quantize.threshold=5.0, stages.2.bits=4, evaluation.max_tokens=512")


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the model loads and runs: cpu (default), cuda, cuda:N, or auto (device_map='auto': "
                        "spread over the visible GPUs)")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="dtype the weights load in: auto (the checkpoint's own, the default), float32, bfloat16, "
                        "float16; a model bigger than memory in fp32 compresses from its 16-bit checkpoint")


def _placement(args: Any) -> dict[str, Any]:
    from .core.models import placement_kwargs

    return placement_kwargs(args.device, args.dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hfsqueeze", description="Compress Hugging Face Transformers models with recipes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--version", action="version", version=f"hfsqueeze {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser(
        "compress", help="compress a model with a recipe, print the report, optionally save it",
        description="Compress a model with a recipe (a built-in name from `hfsqueeze recipes`, or a YAML file), "
                    "measure it before and after (size, perplexity, KL to the original), print the report and, with "
                    "--output, save a model that loads with plain Transformers, with its model card.",
        epilog="example:\n  hfsqueeze compress --output out/smollm2-int8 --overwrite\n"
               "  hfsqueeze compress --model HuggingFaceTB/SmolLM2-135M --recipe nf4 --output out/nf4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--model", default=None,
                   help="model directory or Hub id (default: the built-in SmolLM2-135M-Instruct)")
    c.add_argument("--recipe", default="int8", help="YAML recipe path or built-in name (default: int8)")
    _add_common_recipe_args(c)
    c.add_argument("--output", default=None, help="save the compressed artifact to this directory")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    c.add_argument("--eval-text", default=None, help="evaluation text: 'builtin', a local file or a datasets name")
    c.add_argument("--calibration", default="builtin", help="calibration/training text for data-driven stages")
    c.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    c.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code when loading")
    c.add_argument("--revision", default=None,
                   help="the branch, tag or commit of a Hub --model to load (default: its main branch)")
    _add_placement_args(c)
    add_push_options(c)

    v = sub.add_parser("validate", help="check a recipe and print it in canonical form")
    v.add_argument("recipe", help="YAML recipe path or built-in name")
    _add_common_recipe_args(v)

    e = sub.add_parser("eval", help="re-measure a saved artifact and print the same table")
    e.add_argument("artifact", help="directory written by 'hfsqueeze compress --output' or save_compressed")
    e.add_argument("--base", default=None,
                   help="the uncompressed model to compare with (a directory or 'builtin'); without it the artifact "
                        "is measured alone: no path written in the artifact is ever loaded")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="evaluation.KEY=VALUE",
                   help=f"override an evaluation setting; KEY is one of: {', '.join(EvaluationConfig.allowed_keys())}")
    e.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modeling code when loading the artifact and --base")
    e.add_argument("--no-parity-check", dest="check_parity", action="store_false",
                   help="load an artifact whose parity.safetensors or LoRA adapter is missing or was changed "
                        "(to inspect it)")
    _add_placement_args(e)

    _add_tune_parser(sub)

    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.set_defaults(command="recipes")
    add_push_parser(sub)
    for name, command in sub.choices.items():
        _verbose_flag(command)
        if name in ("compress", "eval", "tune", "push"):
            _token_flag(command)
    return parser


# ---- Hub options ------------------------------------------------------------------------------------------------
# ---- CLI ------------------------------------------------------------------------------------------------------
def _push_flags(parser: Any) -> None:
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--commit-message", default=None, help="Hub commit message")
    parser.add_argument("--no-parity-check", dest="check_parity", action="store_false",
                        help="skip the reload parity check before uploading")
    if not any("--trust-remote-code" in a.option_strings for a in parser._actions):
        parser.add_argument("--trust-remote-code", action="store_true",
                            help="allow Python code in the artifact that hfsqueeze did not generate, and run the "
                                 "card's own load code for the parity check")


def add_push_parser(subparsers: Any) -> Any:
    """Add ``hfsqueeze push DIR --repo ID`` to an argparse ``subparsers``; its handler is `run_push`."""
    parser = subparsers.add_parser(
        "push", help="upload a saved artifact with its model card, after a reload parity check",
        description="Upload a saved hfsqueeze artifact to the Hugging Face Hub in one commit. Only the files "
                    "hfsqueeze writes go up (weights, config, tokenizer, recipe, report, card, parity outputs, "
                    "plots); tuning/ (a tune run, calibration text included) stays local, any other file is refused "
                    "unless --include names it, and a symbolic link or a pickle file (*.bin, *.pt, *.pth, *.pkl, "
                    "*.pickle, *.ckpt) is always refused. The token comes from --token, HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("artifact", metavar="DIR", help="artifact directory written by `hfsqueeze compress --output`")
    parser.add_argument("--repo", required=True, metavar="ID", help="Hub repository id (owner/name, or name)")
    parser.add_argument("--include", action="append", default=[], metavar="PATTERN",
                        help="also upload the files matching this glob on the path inside DIR, e.g. 'tuning/*' or "
                             "'extra/data.csv' (repeatable; pickle files are never uploaded)")
    _push_flags(parser)
    return parser


def add_push_options(parser: Any) -> None:
    """Add ``--push-to-hub REPO`` (and ``--private``, ``--commit-message``, ``--no-parity-check``) to ``compress``."""
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="after compressing, push to this Hub repository (owner/name, or name); the token "
                             "comes from --token, HF_TOKEN or `hf auth login`")
    _push_flags(parser)


def check_push_args(args: Any) -> None:
    """Fail before any heavy work when ``--push-to-hub`` cannot succeed: a malformed repo id, no token, a token the
    Hub rejects, or a Hub that cannot be reached (one ``whoami`` call to the endpoint the push will use)."""
    repo = args.push_to_hub
    if repo.count("/") > 1 or not all(part.strip() for part in repo.split("/")):
        raise HubError(f"--push-to-hub {repo!r} is not a repository id; use owner/name or name")
    from .hub import check_access

    check_access()


def run_push(args: Any) -> int:
    """Handler of ``hfsqueeze push``: push ``args.artifact`` to ``args.repo``; returns the exit code."""
    from .hub import push_to_hub

    info = push_to_hub(args.artifact, args.repo, private=args.private, commit_message=args.commit_message,
                       check_parity=args.check_parity, trust_remote_code=args.trust_remote_code,
                       include=args.include)
    sys.stdout.write(f"pushed {info.commit_url}\n")
    return 0


def push_from_cli(args: Any, *, model: Any, tokenizer: Any = None, artifact: str | os.PathLike | None = None) -> Any:
    """After ``hfsqueeze compress --push-to-hub REPO``: push the saved ``artifact``, or the model in memory."""
    if not getattr(args, "push_to_hub", None):
        return None
    from .hub import push_to_hub

    source = artifact if artifact else model
    info = push_to_hub(source, args.push_to_hub, tokenizer=None if artifact else tokenizer, private=args.private,
                       commit_message=args.commit_message, check_parity=args.check_parity,
                       trust_remote_code=getattr(args, "trust_remote_code", False))
    sys.stdout.write(f"pushed {info.commit_url}\n")
    return info


# ---- commands ---------------------------------------------------------------------------------------------------


def _add_tune_parser(sub) -> None:
    t = sub.add_parser("tune", help="search compression settings to a budget; save the best point as an artifact")
    t.add_argument("--model", default=None,
                   help="model directory or Hub id (default: the built-in SmolLM2-135M-Instruct)")
    t.add_argument("--budget", required=True,
                   help="comma-separated limits: size=0.30 (of the original's disk size), size=150MiB, bits=4.5, "
                   "prefill=0.6, decode=0.8 (latency ratios), kl=0.005, ppl=+1%%, top1=0.95")
    t.add_argument("--minimize", default="kl", choices=["kl", "size", "prefill", "decode"],
                   help="objective (default: kl; size/prefill/decode need a quality limit in --budget)")
    t.add_argument("--space", default="quantize",
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
    t.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code when loading")
    t.add_argument("--json", action="store_true", help="print the report (with its tuning section) as JSON")
    t.add_argument("--storage", default=None, metavar="URL",
                   help="keep the study in this optuna RDB (e.g. postgresql://user:password@host:5432/db) instead "
                        "of tuning/study.journal, so `hfsqueeze tune-worker` on other machines joins the search")
    t.add_argument("--study", default="hfsqueeze-tune", metavar="NAME", help="the study's name in --storage")
    t.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                   help="with --storage: a trial silent for twice this long (its worker died) is run again "
                        "(default 60)")
    _add_placement_args(t)

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
    _add_placement_args(w)


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


def _cmd_tune(args) -> int:
    from .models import load_model, resolve_model_path
    from .tune import Budget, TuneSettings, load_space
    from .tune.resources import check_workers, weights_on_disk
    from .tune.study import progress_line
    from .tune.storage import StudyStorage, prepare_study
    from .tune.tuner import check_args, check_output, tune

    budget = Budget.parse(args.budget, args.minimize)  # one-line errors before any heavy work
    space = load_space(args.space)
    time_budget = _parse_duration(args.time_budget)
    check_args(budget, space, TuneSettings.load(None), args.trials, args.workers, time_budget, args.resume,
               args.output)
    check_output(args.output, args.resume, args.overwrite)
    storage = {"storage": args.storage, "study_name": args.study, "heartbeat": args.heartbeat}
    prepare_study(StudyStorage(args.storage, args.study, args.heartbeat), args.resume, args.overwrite)

    def progress(info: dict) -> None:
        if info.get("phase") == "sensitivity":
            print(f"tune: sensitivity {info['format']}: {info['done']}/{info['total']} modules, "
                  f"ETA {info['eta']:.0f}s", file=sys.stderr, flush=True)
        else:
            print(progress_line(info, budget), file=sys.stderr, flush=True)

    kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}
    kwargs.update(_placement(args))  # a bad --device/--dtype fails here, before the model loads
    path = resolve_model_path(args.model)
    check_workers(args.workers, weights_on_disk(path))  # each worker loads its own copy: does it fit?
    model, tokenizer = load_model(path, **kwargs)
    command = recorded_command(args.argv)
    try:
        result = tune(model, tokenizer, budget=budget, space=space, trials=args.trials, output=args.output,
                      overwrite=args.overwrite, resume=args.resume, workers=args.workers, time_budget=time_budget,
                      seed=args.seed, calibration=args.calibration, eval_text=args.eval_text, progress=progress,
                      model_path=path, command=command, **storage)
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




def _cmd_tune_worker(args) -> int:
    from .models import resolve_model_path
    from .tune.worker import join

    placement = _placement(args)  # a bad --device/--dtype fails here, before the study is opened
    done = join(args.storage, args.study, resolve_model_path(args.model), workdir=args.workdir,
                placement={k: v for k, v in placement.items() if v is not None},
                trust_remote_code=args.trust_remote_code)
    print(f"tune-worker: {done['trials_here']} trial(s) run here; study {done['study']}: {done['done']}/"
          f"{done['trials']} trials done ({done['stopped']})", file=args.stdout)
    return 130 if done["stopped"] == "interrupted" else 0


def _cmd_validate(args) -> int:
    from .recipe import Recipe

    recipe = Recipe.load(args.recipe, args.overrides)
    recipe.validate()  # what compress would refuse without a model: order, recover, training_args, data files
    sys.stdout.write(recipe.to_yaml())
    return 0


RECIPE_GROUPS = ("quantize", "prune", "distill", "combined")


def recipes_table(width: int = 100) -> str:
    """The built-in recipes as a table within ``width`` columns, grouped by what they do (one method, or several
    combined) and ordered by stage count, then name. Reads the YAML files only: no torch."""
    import re
    import textwrap

    import yaml

    from .core.config import builtin_recipes_dir

    rows: dict[str, list[tuple[int, str, str, str, str]]] = {group: [] for group in RECIPE_GROUPS}
    for path in builtin_recipes_dir().glob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        methods = list(dict.fromkeys(s.get("method") for s in data.get("stages") or [] if isinstance(s, dict)))
        recover = bool(data.get("recover")) or any(isinstance(s, dict) and s.get("recover")
                                                    for s in data.get("stages") or [])
        group = methods[0] if len(methods) == 1 and not recover and methods[0] in rows else "combined"
        # The first sentence says what it does; `hfsqueeze validate NAME` prints the whole recipe.
        first = re.split(r"(?<=[.;])\s", " ".join(str(data.get("description") or "").split()), maxsplit=1)[0]
        rows[group].append((len(data.get("stages") or []), path.stem, str(data.get("models") or ""),
                            str(data.get("takes") or ""), first.rstrip(".;")))
    entries = [entry for group in rows.values() for entry in group]
    widths = [max([len(header)] + [len(entry[i]) for entry in entries]) + 2
              for i, header in ((1, "recipe"), (2, "for"), (3, "time"))]
    left = sum(widths) + 2
    lines = [f"  {'recipe':<{widths[0]}}{'for':<{widths[1]}}{'time':<{widths[2]}}what it does"]
    for group, group_entries in rows.items():
        if not group_entries:
            continue
        lines += ["", f"{group}:"]
        for _, name, models, takes, text in sorted(group_entries):
            wrapped = textwrap.wrap(text, width - left) or [""]
            lines.append(f"  {name:<{widths[0]}}{models:<{widths[1]}}{takes:<{widths[2]}}{wrapped[0]}")
            lines += [" " * left + more for more in wrapped[1:]]
    lines += ["", "time: the whole `hfsqueeze compress` on the built-in model, idle 2-core CPU (blank: not measured)",
              "Use one: hfsqueeze compress --recipe NAME; see all of it: hfsqueeze validate NAME"]
    return "\n".join(lines)


def _cmd_recipes(args) -> int:
    print(recipes_table())
    return 0


def _cmd_compress(args) -> int:
    from .api import compress
    from .artifact.save import check_output_dir, save_compressed
    from .models import load_model
    from .recipe import Recipe

    recipe = Recipe.load(args.recipe, args.overrides)  # validate before any heavy work
    recipe.validate()
    if args.output:
        check_output_dir(args.output, args.overwrite, probe=True)
    pre_push = getattr(args, "push_to_hub", None)
    placement = _placement(args)  # a bad --device/--dtype fails here, before the model loads
    if pre_push:
        check_push_args(args)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, **placement,
                                  **({"revision": args.revision} if args.revision else {}))
    command = recorded_command(args.argv)
    report = compress(model, recipe, tokenizer=tokenizer, calibration=args.calibration, eval_text=args.eval_text,
                      command=command)
    # The report first: a failed save (disk full, permissions changed) must not lose the measurements.
    print(report.to_json() if args.json else report.to_markdown(), file=args.stdout)
    if args.output:
        try:
            save_compressed(model, args.output, tokenizer=tokenizer, report=report, overwrite=args.overwrite)
        except OSError as exc:
            if isinstance(exc, HfSqueezeError):
                raise
            raise ArtifactError(f"could not save to {args.output} ({exc.strerror or exc}); nothing was saved, the "
                                "report above is all that remains") from None
        print(f"\nsaved to {args.output}")
        if not pre_push:
            print(next_steps(model.config, args.output))
    if pre_push:
        push_from_cli(args, model=model, tokenizer=tokenizer, artifact=args.output)
    return 0


def next_steps(config: Any, output: str) -> str:
    """What to do with a saved artifact, the way Hugging Face CLIs end: load it, read its card, push it."""
    from .artifact.load import load_snippet

    code = load_snippet(config, output)
    load = next(line for line in code.splitlines() if ".from_pretrained(" in line).split("=", 1)[1].strip()
    auto = load.split(".", 1)[0]
    first = "" if auto == "hfsqueeze" else f"from transformers import {auto}; "
    return ("\nNext steps:\n"
            f"  load it:     {first}model = {load}\n"
            f"               (the model card's 'How to load' has the complete code)\n"
            f"  model card:  {Path(output) / 'README.md'}\n"
            f"  push it:     hfsqueeze push {shlex.quote(output)} --repo <your-username>/{Path(output).name}")


def _cmd_eval(args) -> int:
    from .api import evaluate_artifact

    path = Path(args.artifact)
    report = evaluate_artifact(path, base=args.base, overrides=args.overrides,
                               trust_remote_code=args.trust_remote_code, check_parity=args.check_parity,
                               device=args.device, dtype=args.dtype)
    if args.json:  # the report's eval stage says it: config.base
        print(report.to_json(), file=args.stdout)
        return 0
    # The caption: what the numbers were compared with (only ever a model the user named).
    against = f"compared with --base {args.base}" if args.base else \
        "the artifact alone (no base: pass --base to compare)"
    print(f"hfsqueeze eval {path}: {against}\n\n{report.to_markdown()}", file=args.stdout)
    return 0


# The library's errors name Python arguments and add the flag: "pass overwrite=True (CLI: --overwrite)". The command
# line shows the flag alone; the library keeps one message for both audiences.
_CLI_WORDS = [
    (re.compile(r"\b\w+=[^\s,()]+ \(CLI: (--[\w-]+)\)"), r"\1"),  # pass overwrite=True (CLI: --overwrite)
    (re.compile(r"\b\w+=[^\s,()]+, CLI: (--[\w-]+),"), r"\1,"),  # (pass trust_remote_code=True, CLI: --x, if ...)
    (re.compile(r"pass token=\.\.\., "), "pass --token, "),
]


def cli_words(message: str) -> str:
    """A library error message in command-line words (flags instead of Python keyword arguments)."""
    for pattern, replacement in _CLI_WORDS:
        message = pattern.sub(replacement, message)
    return message


def _one_line_warnings(fallback):
    """A ``warnings.showwarning`` printing hfsqueeze's own warnings as ``hfsqueeze: warning: ...`` (no file:line)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, HfSqueezeWarning):
            print(f"hfsqueeze: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


@contextlib.contextmanager
def _result_stdout(result_only: bool):
    """Yield the stream the command's result goes to. With ``result_only`` (``--json``) everything else that would
    reach stdout (Trainer's log dicts, progress, "saved to", prints from C extensions) goes to stderr instead, so
    stdout holds exactly one JSON document."""
    if not result_only:
        yield sys.stdout
        return
    original = sys.stdout
    original.flush()
    try:
        saved_fd = os.dup(original.fileno()) if original.fileno() == 1 else None
    except (AttributeError, OSError, ValueError):  # a test's capture object: no file descriptor to redirect
        saved_fd = None
    result = os.fdopen(os.dup(saved_fd), "w") if saved_fd is not None else original
    if saved_fd is not None:
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield result
    finally:
        sys.stdout = original
        result.flush()
        if saved_fd is not None:
            result.close()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # what the report records
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    previous_token = os.environ.get("HF_TOKEN")
    if getattr(args, "token", None):
        # Every Hub call of this command (loading, pushing, tune's workers) reads HF_TOKEN, as huggingface_hub does.
        os.environ["HF_TOKEN"] = args.token
    handlers = {"compress": _cmd_compress, "validate": _cmd_validate, "eval": _cmd_eval, "recipes": _cmd_recipes,
                "push": run_push, "tune": _cmd_tune, "tune-worker": _cmd_tune_worker}
    previous = _on_sigterm(_raise_terminated)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", HfSqueezeWarning)
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            with _result_stdout(getattr(args, "json", False)) as args.stdout:
                return handlers[args.command](args)
    except Terminated:
        print("hfsqueeze: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except HfSqueezeError as exc:
        print(f"hfsqueeze: error: {cli_words(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as exc:
        print(f"hfsqueeze: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hfsqueeze: interrupted", file=sys.stderr)
        return 130
    finally:
        _on_sigterm(previous)
        if getattr(args, "token", None) and previous_token is None:  # the token was for this command only
            os.environ.pop("HF_TOKEN", None)
        elif getattr(args, "token", None):
            os.environ["HF_TOKEN"] = previous_token


if __name__ == "__main__":
    sys.exit(main())
