"""The import directions of hfsqueeze/ARCHITECTURE.md, checked on the source (imports inside functions count too)."""

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
