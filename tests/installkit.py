"""What the install, fetch and first-run tests share: the repository, a subprocess environment."""

from __future__ import annotations

import os
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HFSQUEEZE_DISABLE_PROGRESS": "1"}, **extra)
    return env
