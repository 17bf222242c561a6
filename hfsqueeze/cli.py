"""The ``hfsqueeze`` command line: a thin layer over the Python API.

User mistakes (bad recipe, missing file, unsupported model, missing backend, non-empty output) print one line on
stderr and exit 2, before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import ArtifactError, HfSqueezeError, HfSqueezeWarning

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
        self.exit(EXIT_USER_ERROR, f"hfsqueeze: error: {message} (see '{self.prog} --help')\n")


def _add_common_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. quantize.threshold=5.0, stages.2.bits=4, evaluation.max_tokens=512")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hfsqueeze", description="Compress Hugging Face Transformers models with recipes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--version", action="version", version=f"hfsqueeze {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a model with a recipe, print the report, optionally save it")
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
    _add_hub_args(c)

    v = sub.add_parser("validate", help="check a recipe and print it in canonical form")
    v.add_argument("recipe", help="YAML recipe path or built-in name")
    _add_common_recipe_args(v)

    e = sub.add_parser("eval", help="re-measure a saved artifact and print the same table")
    e.add_argument("artifact", help="directory written by 'hfsqueeze compress --output' or save_compressed")
    e.add_argument("--base", default=None,
                   help="the uncompressed model to compare with (default: the report's base model if it is local)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="evaluation.KEY=VALUE",
                   help=f"override an evaluation setting; KEY is one of: {', '.join(_evaluation_keys())}")
    e.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modeling code when loading the artifact and --base")

    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.set_defaults(command="recipes")
    _add_push_parser(sub)
    return parser


def _evaluation_keys() -> list[str]:
    from .recipe import EvaluationConfig

    return EvaluationConfig.allowed_keys()


def _add_hub_args(p: argparse.ArgumentParser) -> None:
    try:
        from .hub import add_push_options
    except ImportError:
        return
    add_push_options(p)


def _add_push_parser(sub) -> None:
    try:
        from .hub import add_push_parser
    except ImportError:
        return
    add_push_parser(sub)


def _cmd_validate(args) -> int:
    from .recipe import Recipe

    recipe = Recipe.load(args.recipe, args.overrides)
    recipe.validate()  # what compress would refuse without a model: order, recover, training_args, data files
    sys.stdout.write(recipe.to_yaml())
    return 0


def _cmd_recipes(args) -> int:
    from .recipe import RECIPES_DIR, Recipe

    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        recipe = Recipe.load(path)
        print(f"{path.stem:24s} {recipe.description or ''}")
    return 0


def _check_output_writable(output: str) -> None:
    """Fail before any compute when ``--output`` cannot be written: probe the directory the save will write into
    (the nearest existing parent), the way `save_compressed` does (a temporary sibling, renamed into place)."""
    path = Path(output).expanduser().absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"--output {output}: {parent} is a file, not a directory; choose another --output")
    try:
        Path(tempfile.mkdtemp(prefix=".hfsqueeze-probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise ArtifactError(f"--output {output}: cannot write in {parent} ({exc.strerror or exc}); choose a "
                            "writable directory") from None


def _cmd_compress(args) -> int:
    from .api import compress
    from .models import load_model
    from .recipe import Recipe
    from .save import check_output_dir, save_compressed

    recipe = Recipe.load(args.recipe, args.overrides)  # validate before any heavy work
    recipe.validate()
    if args.output:
        check_output_dir(args.output, args.overwrite)
        _check_output_writable(args.output)
    pre_push = getattr(args, "push_to_hub", None)
    if pre_push:
        from .hub import check_push_args

        check_push_args(args)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    command = "hfsqueeze " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
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
    if pre_push:
        from .hub import push_from_cli

        push_from_cli(args, model=model, tokenizer=tokenizer, artifact=args.output)
    return 0


def _override_evaluation(evaluation, overrides: list[str]):
    import yaml

    from .errors import RecipeError
    from .recipe import EvaluationConfig

    data = evaluation.to_dict()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("evaluation.") or key.count(".") != 1:
            raise RecipeError(f"eval --set {item!r}: only evaluation.KEY=VALUE applies here; keys: "
                              f"{', '.join(EvaluationConfig.allowed_keys())}")
        data[key.split(".", 1)[1]] = yaml.safe_load(value)
    return EvaluationConfig.from_dict(data, where="evaluation")


def _cmd_eval(args) -> int:
    from .measure import measure, measure_baseline, remeasure_latency_interleaved
    from .models import load_model
    from .recipe import EvaluationConfig
    from .report import CompressionReport, StageResult
    from .save import load_compressed, weights_bytes
    import torch

    from .utils import cpu_name, quiet_transformers_progress, versions

    quiet_transformers_progress()
    path = Path(args.artifact)
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path} is not a saved model directory (no config.json)")
    if args.base is not None:
        from .loading import check_model_source

        check_model_source(args.base)  # a --base that cannot load fails now, not after the artifact is measured
    saved = CompressionReport.load(path) if (path / "report.json").is_file() else None
    evaluation = EvaluationConfig()
    if saved is not None:
        evaluation = EvaluationConfig.from_dict(saved.recipe.get("evaluation") or {}, where="evaluation")
    if args.overrides:
        evaluation = _override_evaluation(evaluation, args.overrides)
    base = args.base or (saved.model.get("name_or_path") if saved else None)
    base_is_local = args.base is not None or (base is not None and (Path(base) / "config.json").is_file())
    trust = {"trust_remote_code": args.trust_remote_code}

    logger.info("loading the artifact %s", path)
    model = load_compressed(path, **trust)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **trust) if (path / "tokenizer_config.json").is_file() else None
    baseline, reference, base_model = None, None, None
    if base_is_local:
        logger.info("loading the base model %s to re-measure it", base)
        base_model, _ = load_model(base, **trust)
        baseline, reference = measure_baseline(base_model, tokenizer, evaluation, time_latency=False)
    elif saved is not None:
        baseline = saved.baseline
    logger.info("measuring the artifact")
    metrics = measure(model, tokenizer, evaluation, reference, with_disk=False, time_latency=base_model is None)
    if base_model is not None and evaluation.latency and reference is not None:
        remeasure_latency_interleaved(base_model, model, [baseline, metrics], reference, evaluation)
    del base_model
    metrics.disk_bytes = weights_bytes(path)
    report = CompressionReport(
        model=saved.model if saved else {"name_or_path": str(path), "model_type": model.config.model_type,
                                         "architecture": type(model).__name__},
        recipe=saved.recipe if saved else {},
        environment={**versions(), "cpu": cpu_name(), "threads": torch.get_num_threads(), "device": "cpu"},
        evaluation={**evaluation.to_dict(), "eval_tokens": metrics.eval_tokens},
        baseline=baseline,
        stages=[StageResult(1, "eval", {"artifact": str(path)}, {"format": "re-measured"}, 0.0, metrics)],
        final=metrics,
        latency_interleaved=base_is_local and evaluation.latency and reference is not None,
    )
    print(report.to_json() if args.json else report.to_markdown(), file=args.stdout)
    if saved is not None and not base_is_local:
        print("\n(original column: from the saved report.json; pass --base PATH to re-measure it and the KL)")
    return 0


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
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    handlers = {"compress": _cmd_compress, "validate": _cmd_validate, "eval": _cmd_eval, "recipes": _cmd_recipes}
    if args.command == "push":
        from .hub import run_push

        handlers["push"] = run_push
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
        print(f"hfsqueeze: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as exc:
        print(f"hfsqueeze: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hfsqueeze: interrupted", file=sys.stderr)
        return 130
    finally:
        _on_sigterm(previous)


if __name__ == "__main__":
    sys.exit(main())
