"""``hfsqueeze push DIR --repo ID`` and ``compress --push-to-hub REPO``: upload an artifact behind the parity gate."""

from __future__ import annotations

import os
import sys
from typing import Any

from ..core.errors import HubError


def _push_flags(parser: Any) -> None:
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--commit-message", default=None, help="Hub commit message")
    parser.add_argument("--no-parity-check", dest="check_parity", action="store_false",
                        help="skip the reload parity check before uploading")
    if not any("--trust-remote-code" in a.option_strings for a in parser._actions):
        parser.add_argument("--trust-remote-code", action="store_true",
                            help="allow Python code in the artifact that hfsqueeze did not generate, and run the "
                                 "card's own load code for the parity check")


def add_parser(subparsers: Any) -> Any:
    """Add ``hfsqueeze push DIR --repo ID`` to an argparse ``subparsers``; its handler is `run`."""
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
    from ..hub import check_access

    check_access()


def run(args: Any) -> int:
    """Handler of ``hfsqueeze push``: push ``args.artifact`` to ``args.repo``; returns the exit code."""
    from ..hub import push_to_hub

    info = push_to_hub(args.artifact, args.repo, private=args.private, commit_message=args.commit_message,
                       check_parity=args.check_parity, trust_remote_code=args.trust_remote_code,
                       include=args.include)
    sys.stdout.write(f"pushed {info.commit_url}\n")
    return 0


def push_from_cli(args: Any, *, model: Any, tokenizer: Any = None, artifact: str | os.PathLike | None = None) -> Any:
    """After ``hfsqueeze compress --push-to-hub REPO``: push the saved ``artifact``, or the model in memory."""
    if not getattr(args, "push_to_hub", None):
        return None
    from ..hub import push_to_hub

    source = artifact if artifact else model
    info = push_to_hub(source, args.push_to_hub, tokenizer=None if artifact else tokenizer, private=args.private,
                       commit_message=args.commit_message, check_parity=args.check_parity,
                       trust_remote_code=getattr(args, "trust_remote_code", False))
    sys.stdout.write(f"pushed {info.commit_url}\n")
    return info


__all__ = ["add_parser", "add_push_options", "check_push_args", "push_from_cli", "run"]
