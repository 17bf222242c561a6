"""What every ``hfsqueeze`` command shares: the parser class (one-line usage errors with "did you mean"), common flags,
the recorded command line, SIGTERM as an exception, library messages in flag words, one-line warnings and the
``--json`` stdout discipline. Only light imports: ``hfsqueeze --help`` answers without torch."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import sys
from typing import Any, Sequence

from ..core.config import did_you_mean
from ..core.errors import HfSqueezeWarning

EXIT_USER_ERROR = 2
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every cleanup (``finally``, temporary directories) runs the same way."""


def raise_terminated(signum, frame):
    raise Terminated()


def on_sigterm(handler):
    """Install ``handler`` for SIGTERM and return the previous one (no-op outside the main thread)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        return None


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USER_ERROR, f"hfsqueeze: error: {message}{_did_you_mean(message)} (see '{self.prog} --help')\n")


def _did_you_mean(message: str) -> str:
    """`` (did you mean 'compress'?)`` for argparse's "invalid choice: 'compres' (choose from ...)" messages."""
    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if not found:
        return ""
    return did_you_mean(found.group(1), re.findall(r"'?([\w.-]+)'?", found.group(2)))


def verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``-v`` after the subcommand too (``hfsqueeze compress -v``); SUPPRESS keeps one given before it."""
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress at INFO level")


def token_flag(parser: argparse.ArgumentParser) -> None:
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


def add_recipe_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. quantize.threshold=5.0, stages.2.bits=4, "
                        "evaluation.max_tokens=512")


def add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where the model loads and runs: cpu (default), cuda, cuda:N, or auto (device_map='auto': "
                        "spread over the visible GPUs)")
    p.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="dtype the weights load in: auto (the checkpoint's own, the default), float32, bfloat16, "
                        "float16; a model bigger than memory in fp32 compresses from its 16-bit checkpoint")


def placement(args: Any) -> dict[str, Any]:
    from ..core.models import placement_kwargs

    return placement_kwargs(args.device, args.dtype)



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


def one_line_warnings(fallback):
    """A ``warnings.showwarning`` printing hfsqueeze's own warnings as ``hfsqueeze: warning: ...`` (no file:line)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, HfSqueezeWarning):
            print(f"hfsqueeze: warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


@contextlib.contextmanager
def result_stdout(result_only: bool):
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




__all__ = ["EXIT_TERMINATED", "EXIT_USER_ERROR", "Parser", "Terminated", "add_placement_args", "add_recipe_overrides",
           "cli_words", "on_sigterm", "one_line_warnings", "placement", "raise_terminated", "recorded_command",
           "result_stdout", "token_flag", "verbose_flag"]
