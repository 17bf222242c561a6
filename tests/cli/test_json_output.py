"""``--json`` prints one JSON document on stdout."""

from __future__ import annotations

import json

import yaml
from conftest import SMALL_EVAL

from outputkit import _run_cli


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

    proc = _run_cli("eval", str(out), "--json", "--base", str(model_dir), cwd=tmp_path)  # both loaded: interleaved
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["latency"]["interleaved"] is True
