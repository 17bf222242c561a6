"""Install: the subpackages and dependencies pyproject.toml lists, the built-in recipes shipped in the wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import SMALL_EVAL

from installkit import REPO, _env


# ---- package data: the built-in recipes in a wheel -----------------------------------------------------------------
def test_pyproject_lists_every_subpackage():
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "hfsqueeze").rglob("__init__.py")}
    assert set(tool["packages"]) == on_disk | {"hfsqueeze.recipes"}
    assert tool["package-dir"] == {"hfsqueeze.recipes": "recipes"}


def test_optuna_is_a_dependency_and_the_tune_extra_still_resolves():
    """`hfsqueeze tune` works after a plain install; `pip install 'hfsqueeze[tune]'` from older instructions too."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "optuna>=5.0" in project["dependencies"]
    assert project["optional-dependencies"]["tune"] == ["optuna>=5.0"]


@pytest.mark.slow
def test_wheel_ships_the_builtin_recipes(tmp_path, model_dir):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("hfsqueeze", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # With a recent enough setuptools here, build offline; else pip fetches the build-system requirement.
    offline = ["--no-build-isolation"] if _setuptools_version() >= (68,) else []
    run = {"capture_output": True, "text": True, "timeout": 600, "check": False}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", str(src),
                            "-w", str(tmp_path / "dist")], **run)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("hfsqueeze-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert {"hfsqueeze/recipes/int8.yaml", "hfsqueeze/recipes/README.md",
                "hfsqueeze/builtin/generated_en.jsonl",  # builtin:generated
                "hfsqueeze/artifact/card/template.md"} <= set(zf.namelist())  # the card's template
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], **run)
    assert installed.returncode == 0, installed.stderr
    # Only the installed wheel is importable as hfsqueeze (the working tree is not on the path; an editable install
    # of it comes after PYTHONPATH), and the current directory has no recipes/ folder.
    env = _env(PYTHONPATH=str(site))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = subprocess.run([sys.executable, "-c", "import hfsqueeze.recipe as r; print(r.__file__, r.RECIPES_DIR)"],
                           cwd=cwd, env=env, **run)
    assert where.stdout.split() == [str(site / "hfsqueeze" / "recipe.py"), str(site / "hfsqueeze" / "recipes")]
    listed = subprocess.run([sys.executable, "-m", "hfsqueeze", "recipes"], cwd=cwd, env=env, **run)
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert listed.returncode == 0 and {"int8", "nf4", "prune-heads", "distill-half-depth"} <= set(names)
    small = [x for k, v in {**SMALL_EVAL, "latency": False}.items() for x in ("--set", f"evaluation.{k}={v}")]
    compressed = subprocess.run([sys.executable, "-m", "hfsqueeze", "compress", "--model", str(model_dir),
                                 "--output", "out", *small], cwd=cwd, env=env, **run)
    assert compressed.returncode == 0, compressed.stderr
    assert json.loads((cwd / "out" / "report.json").read_text())["recipe"]["name"] == "int8"


def _setuptools_version() -> tuple[int, ...]:
    import importlib.metadata

    try:
        return tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2] if p.isdigit())
    except importlib.metadata.PackageNotFoundError:
        return ()
