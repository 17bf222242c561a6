"""Small shared helpers: progress bars that an environment variable turns off, library versions, temp dirs."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import platform
import secrets
from pathlib import Path
from typing import Any, Iterable

PROGRESS_ENV = "HFSQUEEZE_DISABLE_PROGRESS"


def progress_disabled() -> bool:
    return os.environ.get(PROGRESS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def progress(iterable: Iterable, *, desc: str, total: int | None = None) -> Iterable:
    """A tqdm bar over ``iterable``, off when ``HFSQUEEZE_DISABLE_PROGRESS=1``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=progress_disabled(), leave=False)


def progress_bar(*, desc: str, total: int | None = None):
    """A tqdm bar to ``update()`` by hand (for work that is not one loop), off like `progress`."""
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, disable=progress_disabled(), leave=False)


def new_private_name(name: str, tag: str) -> str:
    """A hidden, unique sibling name for staging ``name`` before an atomic rename: ``.NAME.TAG-PID-RANDOM``."""
    return f".{name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def sibling_temp_dir(target: Path, tag: str) -> Path:
    """Create an empty staging directory next to ``target`` (same filesystem, so it can be renamed into place).

    Unlike `tempfile.mkdtemp` (always mode 0700), it gets the permissions of any new directory (0777 minus the
    umask), which the directory keeps once renamed to ``target``.
    """
    path = target.parent / new_private_name(target.name, tag)
    path.mkdir()
    return path


def cache_dir() -> Path:
    """hfsqueeze's cache: ``$HFSQUEEZE_CACHE``, default ``~/.cache/hfsqueeze`` (built-in models and texts, tune's
    sensitivity scores)."""
    return Path(os.environ.get("HFSQUEEZE_CACHE", Path.home() / ".cache" / "hfsqueeze"))


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a hidden sibling temporary file and a rename: readers (another worker, a
    resumed run) see the old file or the new one, never half of one; a crash leaves at most the hidden file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_permissions(root: Path) -> None:
    """Give the files under ``root`` the mode of any new file (0666 minus the umask).

    safetensors writes weights through a private temporary file, so they arrive as 0600: readable by their owner
    only, in a cache or an artifact that others may need to read.
    """
    umask = os.umask(0o022)  # the only portable way to read the umask is to set it
    os.umask(umask)
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)


def quiet_transformers_progress() -> None:
    """Apply ``HFSQUEEZE_DISABLE_PROGRESS`` to Transformers' own bars (save/load shards) too."""
    if progress_disabled():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Harmless bitsandbytes messages, dropped by exact prefix on the logger that emits them (other bnb messages pass).
_BNB_NOISE = {
    # At import, on CPUs with AVX512-BF16, when the optional `kernels` package (which would fetch a kernel from the
    # Hub) is absent; bnb then uses its own CPU kernel.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # The same import with `kernels` installed (Transformers requires it) and the Hub offline: `kernels` says it
    # cannot check the publisher of the kernel it then does not find; bnb falls back to its own CPU kernel.
    "kernels._internals.hf_hub": ("Skipping publisher trust check for 'kernels-community/",),
    # On every int8 matmul with fp32 inputs: LLM.int8 quantizes activations through fp16 by design.
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast",),
}


def silence_bnb_noise() -> None:
    """Drop bitsandbytes' import-time "kernels-community" line and its per-matmul MatMul8bitLt warning.

    Works before bitsandbytes is imported (the filters sit on the loggers bnb will use); idempotent.
    """
    for name, prefixes in _BNB_NOISE.items():
        bnb_logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in bnb_logger.filters):
            bnb_logger.addFilter(_DropMessages(prefixes))


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
