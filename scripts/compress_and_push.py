#!/usr/bin/env python
"""Compress a model with a recipe, save it with its model card, check that it reloads, and push it to the Hub.

Defaults to the built-in SmolLM2-135M-Instruct and the int8 recipe:

    HF_TOKEN=hf_... python scripts/compress_and_push.py --repo my-name/smollm2-135m-int8

Under `accelerate launch` (e.g. a distillation recipe on several processes) every process runs the recipe; only the
main process saves and pushes, and the others wait for it:

    accelerate launch --multi_gpu --num_processes 2 scripts/compress_and_push.py --recipe my_distill.yaml --repo ...

With ``--output`` and no ``--repo`` the artifact is only saved (with its parity file), which is handy for a dry run;
`hfsqueeze push DIR --repo ID` uploads it later. The token
comes from ``HF_TOKEN`` or ``hf auth login``; it is deliberately not an argument, because the command line is
recorded in the report and the model card.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin", help="model directory or Hub id (default: built-in SmolLM2)")
    parser.add_argument("--recipe", default="int8", help="recipe YAML path or built-in recipe name (default: int8)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set quantize.threshold=5.0 (repeatable)")
    parser.add_argument("--output", default=None, help="artifact directory (default: a temporary directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--repo", default=None, help="Hub repository id to push to (owner/name or name)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--commit-message", default=None, help="Hub commit message")
    args = parser.parse_args(argv)
    if not args.repo and not args.output:
        parser.error("give --repo (push) or --output (save only), or both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    import hfsqueeze
    from hfsqueeze.hub import push_to_hub
    from hfsqueeze.models import load_model

    try:
        from accelerate import PartialState

        state = PartialState()
        is_main, wait = state.is_main_process, state.wait_for_everyone
    except ImportError:
        is_main, wait = True, lambda: None

    command = shlex.join(["python", "scripts/compress_and_push.py", *(argv if argv is not None else sys.argv[1:])])
    model, tokenizer = load_model(args.model)
    report = hfsqueeze.compress(model, args.recipe, tokenizer=tokenizer, overrides=args.overrides, command=command)
    if is_main:
        logging.getLogger("hfsqueeze").info("results:\n%s", report.to_markdown())
        with tempfile.TemporaryDirectory(prefix="hfsqueeze-") as tmp:
            out = Path(args.output) if args.output else Path(tmp) / "artifact"
            saved = hfsqueeze.save_compressed(model, out, tokenizer=tokenizer, report=report,
                                              overwrite=args.overwrite)
            if args.repo:
                info = push_to_hub(saved, args.repo, private=args.private, commit_message=args.commit_message)
                sys.stdout.write(f"pushed {info.commit_url}\n")
            else:
                sys.stdout.write(f"saved {saved} (no --repo given, nothing pushed)\n")
    wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
