"""``hfsqueeze eval DIR``: re-measure a saved artifact, alone or against the ``--base`` the user names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..evaluation.config import EvaluationConfig
from .common import add_placement_args


def add_parser(sub: Any) -> None:
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
    add_placement_args(e)


def run(args: Any) -> int:
    from ..api import evaluate_artifact

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


__all__ = ["add_parser", "run"]
