"""``hfsqueeze compress``: load a model, run a recipe, print the report, save the artifact, say what comes next."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError, HfSqueezeError
from .common import add_placement_args, add_recipe_overrides, placement, recorded_command
from .push import add_push_options, check_push_args, push_from_cli


def add_parser(sub: Any) -> None:
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
    add_recipe_overrides(c)
    c.add_argument("--output", default=None, help="save the compressed artifact to this directory")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    c.add_argument("--eval-text", default=None, help="evaluation text: 'builtin', a local file or a datasets name")
    c.add_argument("--calibration", default="builtin", help="calibration/training text for data-driven stages")
    c.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    c.add_argument("--trust-remote-code", action="store_true", help="allow custom modeling code when loading")
    c.add_argument("--revision", default=None,
                   help="the branch, tag or commit of a Hub --model to load (default: its main branch)")
    add_placement_args(c)
    add_push_options(c)


def run(args: Any) -> int:
    from ..api import compress
    from ..artifact.save import check_output_dir, save_compressed
    from ..models import load_model
    from ..recipe import Recipe

    recipe = Recipe.load(args.recipe, args.overrides)  # validate before any heavy work
    recipe.validate()
    if args.output:
        check_output_dir(args.output, args.overwrite, probe=True)
    pre_push = getattr(args, "push_to_hub", None)
    where = placement(args)  # a bad --device/--dtype fails here, before the model loads
    if pre_push:
        check_push_args(args)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, **where,
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
    from ..artifact.load import load_snippet

    code = load_snippet(config, output)
    load = next(line for line in code.splitlines() if ".from_pretrained(" in line).split("=", 1)[1].strip()
    auto = load.split(".", 1)[0]
    first = "" if auto == "hfsqueeze" else f"from transformers import {auto}; "
    return ("\nNext steps:\n"
            f"  load it:     {first}model = {load}\n"
            f"               (the model card's 'How to load' has the complete code)\n"
            f"  model card:  {Path(output) / 'README.md'}\n"
            f"  push it:     hfsqueeze push {shlex.quote(output)} --repo <your-username>/{Path(output).name}")


__all__ = ["add_parser", "next_steps", "run"]
