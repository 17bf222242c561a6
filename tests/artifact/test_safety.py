"""Safe by default: saving never deletes what is not ours, killed saves leave no debris, tampered artifacts fail."""

from __future__ import annotations

import json
import os
import shutil
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


# ---- the parity check cannot be deleted away (issue 18, item 9) -----------------------------------------------------
def test_an_hfsqueeze_artifact_without_its_parity_file_is_refused(tmp_path, tiny_tokenizer, capsys):
    _, out = _int8_artifact(tmp_path, tiny_tokenizer)
    weights = load_file(str(out / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.down_proj.SCB"))
    weights[name] = weights[name] * 3  # an edited weight that the parity outputs would have caught
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "parity.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"no parity\.safetensors,.*check_parity=False"):
        hfsqueeze.load_compressed(out)
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "parity.safetensors" in captured.err and "--no-parity-check" in captured.err
    hfsqueeze.load_compressed(out, check_parity=False)  # still inspectable on request
    assert main(["eval", str(out), "--json", "--no-parity-check", "--set", "evaluation.latency=false"]) == 0
    assert json.loads(capsys.readouterr().out)["final"]["perplexity"] > 0
    # A plain Transformers directory (no report.json of ours) never had a parity file: it loads as before.
    plain = tmp_path / "plain"
    make_tiny("llama").save_pretrained(plain)
    hfsqueeze.load_compressed(plain)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def weak_adapter_artifact(tmp_path_factory, tiny_tokenizer) -> Path:
    """int8 plus a LoRA recovery kept unmerged, trained 3 small steps: it moves the logits by less than the parity
    tolerance, so comparing outputs alone cannot tell it from no adapter at all."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    model = make_tiny("llama")
    recipe = {"evaluation": {**SMALL_EVAL, "latency": False, "disk_size": False}, "stages": [
        {"method": "quantize", "bits": 8},
        {"method": "distill", "teacher": "original", "guard": False, "block_size": 64,
         "data": {"text": "builtin", "max_tokens": 4000, "eval_tokens": 256},
         "training_args": {"max_steps": 3, "learning_rate": 1e-4}}]}
    report = hfsqueeze.compress(model, recipe, tokenizer=tiny_tokenizer)
    assert report.stages[1].details["route"] == "adapter"
    return hfsqueeze.save_compressed(model, tmp_path_factory.mktemp("adapter") / "art", tokenizer=tiny_tokenizer)


def _zero_adapter(out: Path) -> None:
    weights = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def _as_saved_by_the_previous_release(out: Path) -> None:
    """Rewrite parity.safetensors the way hfsqueeze wrote it before it recorded the adapter (version 1)."""
    from safetensors import safe_open

    with safe_open(str(out / "parity.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["hfsqueeze"])
    meta = {k: meta[k] for k in ("schema", "output", "model")} | {"version": 1}
    save_file(load_file(str(out / "parity.safetensors")), str(out / "parity.safetensors"),
              metadata={"hfsqueeze": json.dumps(meta, sort_keys=True)})


@pytest.mark.parametrize("tamper", ["zeroed", "deleted", "deleted, old parity file", "config edited"])
def test_a_zeroed_or_missing_adapter_is_refused(tamper, weak_adapter_artifact, tmp_path):
    from hfsqueeze.artifact.parity import PARITY_FILE, parity_input_ids, parity_problem, verify_parity

    hfsqueeze.load_compressed(weak_adapter_artifact)  # untouched, it loads
    out = Path(shutil.copytree(weak_adapter_artifact, tmp_path / "copy"))
    if tamper == "zeroed":
        _zero_adapter(out)
    elif tamper == "config edited":  # lora_alpha 0 scales the update to nothing
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 0}))
    else:
        for name in ADAPTER_FILES:
            (out / name).unlink()
        if tamper == "deleted, old parity file":
            _as_saved_by_the_previous_release(out)  # then report.json, which says the adapter was kept, is the proof
    loaded = hfsqueeze.load_compressed(out, check_parity=False)
    recorded = load_file(str(out / PARITY_FILE))
    with torch.no_grad():
        got = loaded(input_ids=parity_input_ids(loaded.config)).logits.float()
    # The premise: within the output tolerance, so only the recorded adapter (or report.json) can tell.
    assert parity_problem(recorded["outputs"], got)[0] is None
    needle = "report.json says a LoRA adapter was kept" if tamper.startswith("deleted") else "adapter"
    with pytest.raises(ArtifactError, match=needle) as info:
        hfsqueeze.load_compressed(out)
    assert "\n" not in str(info.value) and "check_parity=False" in str(info.value)
    with pytest.raises(ArtifactError, match="adapter"):
        verify_parity(out)  # the push gate refuses it too, before any reload


def test_an_adapter_added_to_an_artifact_saved_without_one_is_refused(weak_adapter_artifact, tmp_path):
    out = hfsqueeze.save_compressed(make_tiny("llama"), tmp_path / "plain")
    for name in ADAPTER_FILES:
        (out / name).write_bytes((weak_adapter_artifact / name).read_bytes())
    with pytest.raises(ArtifactError, match="saved without a LoRA adapter"):
        hfsqueeze.load_compressed(out)


# ---- eval loads only what the user names (issue 18, item 2) ---------------------------------------------------------
_EVAL_SMALL = ["--set", "evaluation.latency=false", "--set", "evaluation.max_tokens=256"]


def _model_with_code(where: Path, tok, marker: Path) -> Path:
    """A different tiny Llama whose config maps AutoModelForCausalLM to a file that writes ``marker`` when imported."""
    model = make_tiny("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.save_pretrained(where)
    tok.save_pretrained(where)
    (where / "modeling_marker.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\nclass MarkerForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((where / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"}
    (where / "config.json").write_text(json.dumps(config))
    return where


@pytest.fixture
def artifact_naming_other_model(model_dir, tmp_path):
    """A bf16 artifact of ``model_dir`` whose report.json was edited to name a directory with modeling code."""
    from transformers import AutoTokenizer

    out = tmp_path / "art"
    assert main(["compress", "--model", str(model_dir), "--recipe", "bf16", "--output", str(out), *_EVAL_SMALL]) == 0
    marker = tmp_path / "marker"
    other = _model_with_code(tmp_path / "other", AutoTokenizer.from_pretrained(model_dir), marker)
    report = json.loads((out / "report.json").read_text())
    report["model"]["name_or_path"] = str(other)
    (out / "report.json").write_text(json.dumps(report))
    return out, other, marker


@pytest.mark.parametrize("trust", [False, True])
def test_eval_never_loads_the_model_report_json_names(trust, artifact_naming_other_model, capsys):
    out, other, marker = artifact_naming_other_model
    trusting = ["--trust-remote-code"] if trust else []
    capsys.readouterr()
    assert main(["eval", str(out), "--json", *_EVAL_SMALL, *trusting]) == 0
    data = json.loads(capsys.readouterr().out)
    assert not marker.exists(), "code from the directory report.json names ran"
    # The artifact alone: its perplexity, no original column and nothing compared "to the original".
    assert data["baseline"] is None and data["final"]["perplexity"] > 0
    assert data["final"]["kl_divergence"] is None and data["final"]["top1_agreement"] is None
    assert data["stages"][0]["config"]["base"] is None
    assert main(["eval", str(out), *_EVAL_SMALL, *trusting]) == 0
    printed = capsys.readouterr().out
    assert "no base: pass --base to compare" in printed
    assert str(other) not in printed and "KL to original" not in printed and not marker.exists()


def test_eval_with_base_compares_with_the_named_model_and_says_so(artifact_naming_other_model, model_dir, capsys):
    from hfsqueeze.api import evaluate_artifact

    out, other, marker = artifact_naming_other_model
    capsys.readouterr()
    assert main(["eval", str(out), "--base", str(model_dir), *_EVAL_SMALL, "--trust-remote-code"]) == 0
    printed = capsys.readouterr().out
    assert f"compared with --base {model_dir}" in printed and "KL to original" in printed
    assert str(other) not in printed and not marker.exists()
    report = evaluate_artifact(out, base=str(model_dir), overrides=["evaluation.latency=false"])
    assert report.stages[0].config["base"] == str(model_dir)
    assert report.baseline.perplexity > 0 and report.final.kl_divergence is not None


def test_the_hub_copy_of_an_adapter_artifact_still_passes(weak_adapter_artifact, tmp_path):
    """The upload rewrites adapter_config.json's base_model_name_or_path to the repository id: not a change."""
    from hfsqueeze.compat.peft import hub_adapter_config

    out = Path(shutil.copytree(weak_adapter_artifact, tmp_path / "hub-copy"))
    (out / "adapter_config.json").write_bytes(hub_adapter_config(out / "adapter_config.json", "alice/tiny"))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "alice/tiny"
    hfsqueeze.load_compressed(out)
