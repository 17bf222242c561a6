"""The layers of hfsqueeze/ARCHITECTURE.md, checked on the source: every row of its layer table (imports inside
functions count too), no import cycle, and no method name as a string literal above the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hfsqueeze"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the hfsqueeze modules it imports, wherever the import statement stands."""
    modules = {_module(path) for path in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        mod, is_pkg = _module(path), path.name == "__init__.py"
        found = edges.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "hfsqueeze"}
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    base = node.module or ""
                else:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                if base.split(".")[0] == "hfsqueeze":
                    subs = {f"{base}.{a.name}" for a in node.names} & modules  # `from . import surgery`
                    found |= subs or {base}
    return edges


EDGES = _imports()


def _within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer, allowed", [
    ("hfsqueeze.core", ("hfsqueeze.core", "hfsqueeze.builtin")),
    ("hfsqueeze.builtin", ("hfsqueeze.builtin", "hfsqueeze.core.errors", "hfsqueeze.core.utils", "hfsqueeze.core.hf")),
    ("hfsqueeze.compat", ("hfsqueeze.core", "hfsqueeze.compat")),
])
def test_lower_layers_import_nothing_above_them(layer, allowed):
    bad = {m: sorted(t for t in targets if not _within(t, *allowed))
           for m, targets in EDGES.items() if _within(m, layer)}
    assert not {m: t for m, t in bad.items() if t}


def test_a_method_imports_only_core_compat_and_itself():
    for module, targets in EDGES.items():
        if not _within(module, "hfsqueeze.methods") or module == "hfsqueeze.methods":
            continue
        own = ".".join(module.split(".")[:3])
        bad = [t for t in targets if not _within(t, "hfsqueeze.core", "hfsqueeze.builtin", "hfsqueeze.compat", own)]
        assert not bad, (module, bad)


def test_only_the_registry_imports_the_methods():
    importers = {m for m, targets in EDGES.items() for t in targets
                 if _within(t, "hfsqueeze.methods") and not _within(m, "hfsqueeze.methods")}
    assert importers == {"hfsqueeze.registry"}


def test_in_core_only_data_and_models_resolve_builtin_names():
    """The ground floor is two packages: core's machinery and the built-in models and texts; inside core only the
    text sources and model loading know the built-in names."""
    importers = {m for m, targets in EDGES.items() for t in targets
                 if _within(t, "hfsqueeze.builtin") and _within(m, "hfsqueeze.core")}
    assert importers <= {"hfsqueeze.core.data", "hfsqueeze.core.models"}


def test_surgery_stays_copyable_into_artifacts():
    """The prune artifact's modeling file is surgery.py's source: it may import nothing of hfsqueeze."""
    assert EDGES["hfsqueeze.methods.prune.surgery"] == set()


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(EDGES.get(module, ())):
            target = target if target in EDGES else target.rsplit(".", 1)[0]
            if target == module or target not in EDGES:
                continue
            assert state.get(target) != 1, " -> ".join(path + [module, target])
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(EDGES):
        if module not in state:
            visit(module, [])


# The layer table's rows, bottom to top, each with the rows it may import (besides itself). The top row's members
# are ordered as the picture draws them (artifact/ lowest, cli.py highest): each imports only what is below it.
# `hfsqueeze/__init__.py`, `__main__.py` and `models.py` are the public faces of the package, above everything.
LAYERS = [
    # The ground floor is two packages: core's machinery and the built-in models and texts (builtin uses core's leaf
    # modules; core's text sources and model loading resolve the built-in names, see the test above).
    ("core", ("hfsqueeze.core",), ("builtin",)),
    ("builtin", ("hfsqueeze.builtin",), ("core",)),
    ("compat", ("hfsqueeze.compat",), ("core",)),
    ("methods", ("hfsqueeze.methods",), ("core", "builtin", "compat")),
    ("registry", ("hfsqueeze.registry",), ("core", "methods")),
    ("evaluation", ("hfsqueeze.evaluation",), ("core", "builtin", "compat")),
    ("recipe", ("hfsqueeze.recipe",), ("core", "builtin", "compat", "registry", "evaluation")),
    ("artifact", ("hfsqueeze.artifact",), ("core", "builtin", "compat", "registry", "evaluation", "recipe")),
    ("hub", ("hfsqueeze.hub",), ("core", "builtin", "compat", "registry", "evaluation", "recipe", "artifact")),
    ("api", ("hfsqueeze.api",),
     ("core", "builtin", "compat", "registry", "evaluation", "recipe", "artifact", "hub")),
    ("tune", ("hfsqueeze.tune",),
     ("core", "builtin", "compat", "registry", "evaluation", "recipe", "artifact", "hub", "api")),
    ("cli", ("hfsqueeze.cli",),
     ("core", "builtin", "compat", "registry", "evaluation", "recipe", "artifact", "hub", "api", "tune", "faces")),
    ("faces", ("hfsqueeze", "hfsqueeze.__main__", "hfsqueeze.models"), None),  # None: anything
]
_PREFIXES = {name: prefixes for name, prefixes, _ in LAYERS}


def _layer(module: str) -> str:
    # The longest matching prefix: `hfsqueeze` (the package) must not swallow its subpackages.
    matches = [(len(p), name) for name, prefixes, _ in LAYERS for p in prefixes
               if module == p or (p != "hfsqueeze" and module.startswith(p + "."))]
    assert matches, f"{module} belongs to no row of the layer table (add it to ARCHITECTURE.md and LAYERS)"
    return max(matches)[1]


def test_every_module_sits_in_a_row_of_the_layer_table():
    assert {_layer(m) for m in EDGES} == {name for name, _, _ in LAYERS}


@pytest.mark.parametrize("name, allowed", [(name, allowed) for name, _, allowed in LAYERS if allowed is not None])
def test_each_row_imports_only_the_rows_below_it(name, allowed):
    bad = {}
    for module, targets in EDGES.items():
        if _layer(module) != name:
            continue
        wrong = sorted(t for t in targets if _layer(t) not in (name, *allowed))
        if wrong:
            bad[module] = wrong
    assert not bad


# ---- method names above the registry -------------------------------------------------------------------------------
# What code above the registry must not spell: the built-in methods' names, and distill's report details that other
# code used to read (`route`, `kept`). It asks the stages instead (`Stage` hooks, `find_stage`, `stages`).
METHOD_WORDS = {"quantize", "prune", "distill", "route", "kept"}
BELOW_THE_REGISTRY = ("core", "builtin", "compat", "methods", "registry")
# Explicit exceptions, each with its reason. Keys: (module, literal).
ALLOWED: dict[tuple[str, str], str] = {}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def method_literals(source: str) -> list[tuple[int, str]]:
    """(line, literal) for each string constant in ``source`` that is a method word; docstrings do not count."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in METHOD_WORDS
            and id(node) not in skip]


def test_the_method_name_check_sees_code_and_ignores_docstrings():
    source = '''"""Module: 'quantize' here is prose."""
def f(stage):
    """The prune stage, in prose."""
    if stage == "prune":
        return {"route": 1}
    return f"{stage}-kept"
'''
    assert sorted(method_literals(source)) == [(4, "prune"), (5, "route")]


def test_no_method_name_above_the_registry():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module(path)
        if _layer(module) in BELOW_THE_REGISTRY:
            continue
        for line, word in method_literals(path.read_text()):
            if (module, word) not in ALLOWED:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {word!r}")
    assert not found, "method names above the registry (ask the stage's hooks instead): " + "; ".join(found)


def test_every_allowed_method_name_is_still_used():
    """An exception that is no longer needed goes (so the list only shrinks)."""
    used = {(_module(p), word) for p in PACKAGE.rglob("*.py") for _, word in method_literals(p.read_text())}
    assert set(ALLOWED) <= used, sorted(set(ALLOWED) - used)
