"""The ``hfsqueeze`` command line: a thin layer over the Python API, one module per command.

Each command module has ``add_parser(subparsers)`` and ``run(args) -> exit code``; `COMMANDS` lists them in the
order ``--help`` shows. User mistakes (bad recipe, missing file, unsupported model, missing backend, non-empty
output) print one line on stderr and exit 2, before anything is written.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Sequence

# Only light imports here: `hfsqueeze --help` must answer without torch; each command imports what it runs.
from .. import __version__
from ..core.errors import HfSqueezeError, HfSqueezeWarning
from . import compress, evaluate, push, recipes, tune, tune_worker, validate
from .common import (EXIT_TERMINATED, EXIT_USER_ERROR, Parser, Terminated, cli_words, on_sigterm, one_line_warnings,
                     raise_terminated, recorded_command, result_stdout, token_flag, verbose_flag)
from .compress import next_steps
from .push import add_push_options, check_push_args, push_from_cli
from .recipes import recipes_table

COMMANDS = {"compress": compress, "validate": validate, "eval": evaluate, "tune": tune, "tune-worker": tune_worker,
            "recipes": recipes, "push": push}
_HUB_COMMANDS = ("compress", "eval", "tune", "tune-worker", "push")  # they take --token


def build_parser() -> Parser:
    parser = Parser(prog="hfsqueeze", description="Compress Hugging Face Transformers models with recipes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--version", action="version", version=f"hfsqueeze {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    for name, command in sub.choices.items():
        verbose_flag(command)
        if name in _HUB_COMMANDS:
            token_flag(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # what the report records
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    previous_token = os.environ.get("HF_TOKEN")
    if getattr(args, "token", None):
        # Every Hub call of this command (loading, pushing, tune's workers) reads HF_TOKEN, as huggingface_hub does.
        os.environ["HF_TOKEN"] = args.token
    previous = on_sigterm(raise_terminated)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", HfSqueezeWarning)
            warnings.showwarning = one_line_warnings(warnings.showwarning)
            with result_stdout(getattr(args, "json", False)) as args.stdout:
                return COMMANDS[args.command].run(args)
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
        on_sigterm(previous)
        if getattr(args, "token", None) and previous_token is None:  # the token was for this command only
            os.environ.pop("HF_TOKEN", None)
        elif getattr(args, "token", None):
            os.environ["HF_TOKEN"] = previous_token


__all__ = ["COMMANDS", "EXIT_TERMINATED", "EXIT_USER_ERROR", "add_push_options", "build_parser", "check_push_args",
           "main", "next_steps", "push_from_cli", "recipes_table", "recorded_command"]
