"""How many processes a `hfsqueeze.tune` run can share a study with on this machine.

Each worker process loads its own copy of the original model and compresses a copy of it in every trial, so ``N``
workers hold at least ``2 x N`` copies of the model at once; more workers than CPU cores only take turns on them.
Both bounds are checked before a model is loaded (the CLI estimates the model's size from its weight files on disk).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import RecipeError
from .budget import describe_bytes

# Copies of the model one worker holds at once: the original it loaded, and the copy the current trial compresses.
COPIES_PER_WORKER = 2


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory available for new work (``MemAvailable`` of ``/proc/meminfo``, else the free physical pages),
    or ``None`` where neither can be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def weights_on_disk(path: str | os.PathLike | None) -> int | None:
    """Bytes of the ``*.safetensors`` weight files of a local model directory, or ``None`` (a Hub id, no such
    files): an estimate of the model's size in memory before it is loaded."""
    if path is None or not Path(path).is_dir():
        return None
    total = sum(p.stat().st_size for p in Path(path).glob("*.safetensors") if p.is_file())
    return total or None


def max_workers(model_bytes: int | None, *, loaded: bool = False) -> tuple[int, str]:
    """The most worker processes this machine can run, and why no more.

    Args:
        model_bytes (`int`, *optional*): the model's size in memory; without it only the CPU count bounds.
        loaded (`bool`, defaults to `False`): the model is already loaded in this process (one of the copies counted
            is in memory already, so it is not in the available memory any more).
    """
    cpus = usable_cpus()
    best, why = cpus, f"this machine gives this process {cpus} CPU core{'s' if cpus != 1 else ''}"
    available = available_memory()
    if model_bytes and available is not None:
        available += model_bytes if loaded else 0
        per_worker = COPIES_PER_WORKER * model_bytes
        fit = max(1, available // per_worker)
        if fit < best:
            best = int(fit)
            why = (f"each worker holds {COPIES_PER_WORKER} copies of the model (the one it loads and the one a trial "
                   f"compresses), about {describe_bytes(per_worker)}, and {describe_bytes(available)} of memory is "
                   "available")
    return best, why


def check_workers(workers: int, model_bytes: int | None = None, *, loaded: bool = False) -> None:
    """One line when ``workers`` is more than `max_workers` allows (a single worker is never refused)."""
    if workers <= 1:
        return
    most, why = max_workers(model_bytes, loaded=loaded)
    if workers > most:
        raise RecipeError(f"--workers {workers}: at most {most} here: {why}")


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` names them (its entries, or ``0..n-1``)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def worker_placement(device: str, spread: bool, workers: int, visible: list[str]
                     ) -> list[tuple[str | None, str | None]]:
    """Where workers ``1 .. workers-1`` run: per worker, its ``CUDA_VISIBLE_DEVICES`` (``None``: inherited) and the
    ``device_map`` it loads the model with (``None``: the CPU).

    With several GPUs visible, each worker gets one of its own (round robin over those the main process, on
    ``device``, does not use), so trials do not queue on one GPU; with one GPU they share it. A model spread over
    several GPUs (``spread``, ``device_map="auto"``) is loaded the same way by every worker, on all of them.

    Args:
        device (`str`): the main process's model device (``cpu``, ``cuda``, ``cuda:1``).
        spread (`bool`): whether that model is spread over several devices.
        workers (`int`): processes in all, the main one included.
        visible (`list[str]`): `visible_gpus` of the main process.
    """
    extra = max(0, workers - 1)
    if not device.startswith("cuda"):
        return [(None, None)] * extra
    if spread:
        return [(None, "auto")] * extra
    index = int(device.partition(":")[2] or 0)
    others = [gpu for k, gpu in enumerate(visible) if k != index]
    if not others:  # one GPU: every worker shares it
        return [(None, device)] * extra
    return [(others[i % len(others)], "cuda:0") for i in range(extra)]


__all__ = ["available_memory", "check_workers", "max_workers", "usable_cpus", "visible_gpus", "weights_on_disk",
           "worker_placement"]
