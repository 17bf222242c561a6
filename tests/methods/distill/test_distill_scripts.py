"""The distill script under a real two-process launcher (torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distillkit import tiny_llama
from distillkit import _one_thread  # noqa: F401  (autouse: one torch thread per module)




REPO = Path(__file__).resolve().parents[3]


# ---- scripts under a real two-process launcher ----------------------------------------------------------------------


@pytest.mark.slow
def test_distill_script_runs_two_processes_with_torchrun(tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_llama(2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "evaluation: {max_tokens: 256, seq_len: 128, latency: false, disk_size: false}\n"
        "stages:\n  - method: distill\n    block_size: 64\n"
        "    data: {text: builtin, max_tokens: 12000, eval_tokens: 1024}\n"
        "    training_args: {max_steps: 4, per_device_train_batch_size: 2, learning_rate: 1.0e-3}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HFSQUEEZE_DISABLE_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "scripts" / "distill.py"), "--model", str(model_dir), "--recipe", str(recipe),
           "--output", str(tmp_path / "out"), "--report-json", str(tmp_path / "report.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = json.loads((tmp_path / "report.json").read_text())["stages"][0]["details"]
    assert d["world_size"] == 2 and d["steps"] == 4
    assert d["tokens_seen"] == 4 * 2 * 2 * 64  # steps x per-device batch x processes x block
    assert "world size 2" in proc.stdout
    assert (tmp_path / "out" / "config.json").is_file()
