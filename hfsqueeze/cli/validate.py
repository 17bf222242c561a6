"""``hfsqueeze validate RECIPE``: check a recipe without a model and print it in canonical form."""

from __future__ import annotations

import sys
from typing import Any

from .common import add_recipe_overrides


def add_parser(sub: Any) -> None:
    v = sub.add_parser("validate", help="check a recipe and print it in canonical form")
    v.add_argument("recipe", help="YAML recipe path or built-in name")
    add_recipe_overrides(v)


def run(args: Any) -> int:
    from ..recipe import Recipe

    recipe = Recipe.load(args.recipe, args.overrides)
    recipe.validate()  # what compress would refuse without a model: order, recover, training_args, data files
    sys.stdout.write(recipe.to_yaml())
    return 0


__all__ = ["add_parser", "run"]
