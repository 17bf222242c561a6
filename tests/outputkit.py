"""What the output tests (--json, the footer, latency, CLI conventions) share: the CLI in a subprocess, a card."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def _run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HFSQUEEZE_DISABLE_PROGRESS", None)  # progress on: bars and Trainer's log lines must not reach stdout
    return subprocess.run([sys.executable, "-m", "hfsqueeze", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def _card_text(model, report) -> str:
    from hfsqueeze.artifact.card import render_model_card

    return str(render_model_card(model.config, report, load_code="model = ..."))


BF16 = [{"method": "quantize", "bits": 16}]
