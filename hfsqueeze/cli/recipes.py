"""``hfsqueeze recipes``: the built-in recipes as a table, read from their YAML files alone (no torch)."""

from __future__ import annotations

import re
import textwrap
from typing import Any

COMBINED = "combined"


def add_parser(sub: Any) -> None:
    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.set_defaults(command="recipes")


def recipes_table(width: int = 100) -> str:
    """The built-in recipes as a table within ``width`` columns, grouped by what they do (one method, or several
    combined) and ordered by stage count, then name. A group per method, the method with the most recipes first;
    the methods come from the files (no method is named here, none is imported). Reads the YAML files only: no
    torch."""
    import yaml

    from ..core.config import builtin_recipes_dir

    rows: dict[str, list[tuple[int, str, str, str, str]]] = {}
    for path in builtin_recipes_dir().glob("*.yaml"):
        data = yaml.safe_load(path.read_text()) or {}
        methods = list(dict.fromkeys(s.get("method") for s in data.get("stages") or [] if isinstance(s, dict)))
        recover = bool(data.get("recover")) or any(isinstance(s, dict) and s.get("recover")
                                                    for s in data.get("stages") or [])
        group = methods[0] if len(methods) == 1 and not recover and isinstance(methods[0], str) else COMBINED
        # The first sentence says what it does; `hfsqueeze validate NAME` prints the whole recipe.
        first = re.split(r"(?<=[.;])\s", " ".join(str(data.get("description") or "").split()), maxsplit=1)[0]
        rows.setdefault(group, []).append((len(data.get("stages") or []), path.stem, str(data.get("models") or ""),
                                           str(data.get("takes") or ""), first.rstrip(".;")))
    order = sorted((g for g in rows if g != COMBINED), key=lambda g: (-len(rows[g]), g))
    groups = [(g, rows[g]) for g in order + ([COMBINED] if COMBINED in rows else [])]
    entries = [entry for _, group in groups for entry in group]
    widths = [max([len(header)] + [len(entry[i]) for entry in entries]) + 2
              for i, header in ((1, "recipe"), (2, "for"), (3, "time"))]
    left = sum(widths) + 2
    lines = [f"  {'recipe':<{widths[0]}}{'for':<{widths[1]}}{'time':<{widths[2]}}what it does"]
    for group, group_entries in groups:
        lines += ["", f"{group}:"]
        for _, name, models, takes, text in sorted(group_entries):
            wrapped = textwrap.wrap(text, width - left) or [""]
            lines.append(f"  {name:<{widths[0]}}{models:<{widths[1]}}{takes:<{widths[2]}}{wrapped[0]}")
            lines += [" " * left + more for more in wrapped[1:]]
    lines += ["", "time: the whole `hfsqueeze compress` on the built-in model, idle 2-core CPU (blank: not measured)",
              "Use one: hfsqueeze compress --recipe NAME; see all of it: hfsqueeze validate NAME"]
    return "\n".join(lines)


def run(args: Any) -> int:
    print(recipes_table())
    return 0


__all__ = ["add_parser", "recipes_table", "run"]
