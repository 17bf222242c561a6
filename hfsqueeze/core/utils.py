"""Small shared helpers: progress bars that an environment variable turns off, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any, Iterable

PROGRESS_ENV = "HFSQUEEZE_DISABLE_PROGRESS"


def progress_disabled() -> bool:
    return os.environ.get(PROGRESS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def progress(iterable: Iterable, *, desc: str, total: int | None = None) -> Iterable:
    """A tqdm bar over ``iterable``, off when ``HFSQUEEZE_DISABLE_PROGRESS=1``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=progress_disabled(), leave=False)


def quiet_transformers_progress() -> None:
    """Apply ``HFSQUEEZE_DISABLE_PROGRESS`` to Transformers' own bars (save/load shards) too."""
    if progress_disabled():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pkg in ("hfsqueeze", "torch", "transformers", "bitsandbytes", "accelerate", "peft", "huggingface_hub",
                "safetensors", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
