"""Safe by default: saving never deletes what is not ours, killed saves leave no debris, tampered artifacts fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hfsqueeze
from hfsqueeze.cli import main
from hfsqueeze.artifact.save import is_artifact_dir
from hfsqueeze.core.errors import ArtifactError

from conftest import SMALL_EVAL, make_tiny, outputs

IDS = torch.tensor([[5, 17, 33, 80, 120, 7, 9, 250]])


def _user_files(root: Path) -> dict[str, bytes]:
    (root / "thesis").mkdir(parents=True)
    (root / "thesis" / "chapter1.tex").write_text("years of work")
    (root / "notes.txt").write_text("do not delete")
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _still_there(root: Path, before: dict[str, bytes]) -> None:
    assert {k: (root / k).read_bytes() for k in before} == before


# ---- --overwrite only replaces what is ours ------------------------------------------------------------------
def test_cli_refuses_to_overwrite_the_current_directory(tmp_path, monkeypatch, capsys, tiny_tokenizer):
    model_dir = tmp_path / "model"
    make_tiny("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    work = tmp_path / "work"
    before = _user_files(work)
    monkeypatch.chdir(work)
    capsys.readouterr()
    code = main(["compress", "--model", str(model_dir), "--recipe", "bf16", "--output", ".", "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "current directory" in err[0], err
    _still_there(work, before)


@pytest.mark.parametrize("where", ["home", "ancestor", "foreign", "artifact-plus-user-file"])
def test_overwrite_refuses_anything_but_our_own_artifact(where, tmp_path, monkeypatch):
    model = make_tiny("llama")
    target = tmp_path / "target"
    if where == "home":
        monkeypatch.setenv("HOME", str(target))
    if where == "ancestor":
        (target / "a" / "b").mkdir(parents=True)
        monkeypatch.chdir(target / "a" / "b")
    if where == "artifact-plus-user-file":
        hfsqueeze.save_compressed(model, target)
    before = _user_files(target)
    with pytest.raises(ArtifactError, match="refusing to"):
        hfsqueeze.save_compressed(model, target, overwrite=True)
    _still_there(target, before)


def test_overwrite_replaces_an_empty_dir_or_a_previous_artifact(tmp_path):
    model = make_tiny("llama")
    (tmp_path / "empty").mkdir()
    hfsqueeze.save_compressed(model, tmp_path / "empty", overwrite=True)
    hfsqueeze.save_compressed(model, tmp_path / "empty", overwrite=True)
    assert is_artifact_dir(tmp_path / "empty")


def test_artifact_files_get_the_default_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        out = hfsqueeze.save_compressed(make_tiny("llama"), tmp_path / "art")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["parity.safetensors"] == modes["config.json"] == 0o644, modes


# ---- interrupted saves -----------------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_dirs_of_a_killed_save_are_cleaned_on_the_next_save(tmp_path):
    model = make_tiny("llama")
    dead = tmp_path / f".art.tmp-{_dead_pid()}-0badc0de"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".art.tmp-{os.getpid()}-00c0ffee"  # a save still running: not ours to touch
    alive.mkdir()
    foreign = tmp_path / f".art.tmp-{_dead_pid()}-12345678"  # named like ours but holding user data
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("mine")
    other = tmp_path / f".other.tmp-{_dead_pid()}-0badc0de"  # another target's
    other.mkdir()
    hfsqueeze.save_compressed(model, tmp_path / "art")
    assert not dead.exists()
    assert alive.is_dir() and (foreign / "thesis.docx").is_file() and other.is_dir()


_SLOW_SAVE = textwrap.dedent('''
    import sys, time, pathlib
    import transformers
    from hfsqueeze.cli import main

    original = transformers.PreTrainedModel.save_pretrained

    def slow(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        if pathlib.Path(path).name.startswith(".art.tmp-"):
            pathlib.Path(sys.argv[2]).write_text(str(path))
            time.sleep(60)

    transformers.PreTrainedModel.save_pretrained = slow
    sys.exit(main(["compress", "--model", sys.argv[1], "--recipe", "bf16", "--output", sys.argv[3],
                   "--set", "evaluation.latency=false", "--set", "evaluation.max_tokens=64"]))
''')


def test_sigterm_during_save_cleans_up_like_ctrl_c(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "model"
    make_tiny("llama").save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    flag, out = tmp_path / "saving", tmp_path / "out" / "art"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(model_dir), str(flag), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert flag.exists(), proc.communicate()[1][-2000:]
    assert Path(flag.read_text()).is_dir()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "terminated" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []


# ---- tampered artifacts fail loudly ----------------------------------------------------------------------------
def _int8_artifact(tmp_path, tok):
    model = make_tiny("llama")
    hfsqueeze.compress(model, {"stages": [{"method": "quantize", "bits": 8}], "evaluation": SMALL_EVAL}, tokenizer=tok)
    return model, hfsqueeze.save_compressed(model, tmp_path / "int8", tokenizer=tok)


def test_load_compressed_refuses_an_artifact_whose_config_was_tampered(tmp_path, tiny_tokenizer, capsys):
    model, out = _int8_artifact(tmp_path, tiny_tokenizer)
    torch.testing.assert_close(outputs(hfsqueeze.load_compressed(out), IDS), outputs(model, IDS))
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]  # the int8 values would now load as plain fp32 weights
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="does not reproduce the outputs recorded when it was saved"):
        hfsqueeze.load_compressed(out)
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "does not reproduce" in captured.err
    hfsqueeze.load_compressed(out, check_parity=False)  # still inspectable on request


def test_load_compressed_refuses_tampered_weights(tmp_path):
    out = hfsqueeze.save_compressed(make_tiny("llama"), tmp_path / "fp32")
    weights = load_file(str(out / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] * 3
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"logits differ .* by up to"):
        hfsqueeze.load_compressed(out)
