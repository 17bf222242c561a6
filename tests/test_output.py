"""Honest output: ``--json`` prints one JSON document, the footer and card claim only what was measured, latency
ratios carry their spread and an "unreliable" flag when the machine was busy or the runs disagreed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SMALL_EVAL, make_tiny

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny-llama"
    make_tiny("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HFSQUEEZE_DISABLE_PROGRESS", None)  # progress on: bars and Trainer's log lines must not reach stdout
    return subprocess.run([sys.executable, "-m", "hfsqueeze", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


# ---- --json: one document on stdout ------------------------------------------------------------------------------
def test_compress_json_with_distill_prints_exactly_one_json_document(model_dir, tmp_path):
    recipe = {
        "stages": [{"method": "distill", "student": {"keep": 0.5}, "block_size": 32,
                    "data": {"text": "builtin", "max_tokens": 2000, "eval_tokens": 256},
                    "training_args": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1}}],
        "evaluation": {**SMALL_EVAL, "disk_size": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    proc = _run_cli("compress", "--model", str(model_dir), "--recipe", "recipe.yaml", "--json", "--output", str(out),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # the whole of stdout, nothing before or after
    assert report["schema"] == "hfsqueeze.report" and report["stages"][0]["method"] == "distill"
    assert "saved to" in proc.stderr and "loss" in proc.stderr  # moved, not lost
    assert (out / "report.json").is_file()

    proc = _run_cli("eval", str(out), "--json", "--set", "evaluation.latency=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["stages"][0]["method"] == "eval"
