"""Compress a model with a recipe and save the artifact; runnable as is or under ``accelerate launch``.

    python scripts/compress.py --model builtin --recipe recipes/prune-distill-int8.yaml --output out/
    accelerate launch --multi_gpu --num_processes 2 scripts/compress.py --model ... --recipe ... --output out/

Under a distributed launcher every process runs the recipe (training stages split their batches across processes
through the Trainer); only the main process writes the artifact and prints the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="builtin", help="model directory, Hub id, or 'builtin' (SmolLM2-135M-Instruct)")
    p.add_argument("--recipe", required=True, help="YAML recipe path or built-in recipe name")
    p.add_argument("--output", default=None, help="directory for the compressed artifact")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. distill.training_args.max_steps=50 or stages.2.bits=4")
    p.add_argument("--calibration", default="builtin", help="calibration/training text: 'builtin' or a local file")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--report-json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--no-quality", action="store_true", help="skip perplexity/KL measurements (sizes only)")
    return p


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run(args: argparse.Namespace, require_method: str | None = None):
    import hfsqueeze
    from hfsqueeze.models import load_model
    from hfsqueeze.recipe import Recipe

    recipe = Recipe.load(args.recipe, args.overrides)
    if require_method and not any(s.method == require_method for s in recipe.stages) \
            and getattr(recipe, "recover", None) is None \
            and not any(getattr(s, "recover", None) for s in recipe.stages):
        raise hfsqueeze.RecipeError(f"recipe {args.recipe} has no '{require_method}' stage and no 'recover' option; "
                                    f"methods found: {', '.join(s.method for s in recipe.stages)}")
    model, tokenizer = load_model(args.model)
    report = hfsqueeze.compress(model, recipe, tokenizer=tokenizer, calibration=args.calibration,
                                measure_quality=not args.no_quality, command=" ".join(sys.argv))
    if is_main_process():
        if args.output:
            hfsqueeze.save_compressed(model, args.output, tokenizer=tokenizer, overwrite=args.overwrite)
        if args.report_json:
            Path(args.report_json).write_text(json.dumps(report.to_dict(), indent=2, default=str))
        print(report.to_markdown())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    from hfsqueeze import HfSqueezeError

    try:
        run(args)
    except HfSqueezeError as exc:
        print(f"compress.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
