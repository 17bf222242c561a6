"""Saving compressed models as standard Transformers artifacts, and loading them back.

`save_compressed` writes through `save_pretrained` (so bnb quantization lives in ``config.quantization_config`` and
reloads with no plugin) plus side files: ``recipe.yaml``, ``report.json``, the stages' artifacts (plots), the parity
outputs and the model card. Everything is written into a temporary sibling directory that is renamed into place at the
end, so a failure never leaves a half-written artifact behind.

A stage whose artifacts need more than stock Transformers writes them in its `Stage.on_save` hook; loading them back
is `hfsqueeze.artifact.load`'s job.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError

from ..compat.bnb import check_not_repacked, saveable
from ..core.errors import ArtifactError
from ..core.stage import save_weights
from ..core.utils import default_permissions, quiet_transformers_progress
from ..registry import stages
from .card import write_model_card
from .files import ARTIFACT_FILES
from .parity import PARITY_FILE, is_parity_file, record_parity

logger = logging.getLogger("hfsqueeze")

# Our temporary and backup directories next to a target: ``.NAME.tmp-PID-RANDOM`` and ``.NAME.old-PID``.
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)(-[0-9a-f]+)?$")


def _protected_dirs() -> set[Path]:
    cwd = Path.cwd().resolve()
    return {cwd, *cwd.parents, Path.home().resolve(), Path("/").resolve()}


def is_artifact_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory `save_compressed` wrote: it holds our parity or report file and nothing but
    files of the kinds we write."""
    root = Path(path)
    ours = is_parity_file(root / PARITY_FILE) or _is_report(root / "report.json")
    return ours and _foreign_entry(root) is None


def _is_report(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("schema") == "hfsqueeze.report"
    except (OSError, ValueError, AttributeError):
        return False


def _foreign_entry(root: Path) -> str | None:
    """The first entry of ``root`` that `save_compressed` would not have written (a folder or another file)."""
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() or not entry.is_file() or not ARTIFACT_FILES.match(entry.name):
            return entry.name + ("/" if entry.is_dir() else "")
    return None


def check_output_dir(out: str | os.PathLike, overwrite: bool, *, probe: bool = False,
                     contents: bool = True) -> Path:
    """Refuse an output directory that saving could damage; return it resolved.

    The current directory, its ancestors, the home directory and ``/`` are always refused. An existing directory is
    replaced only with ``overwrite`` and only when it is empty or a previous hfsqueeze artifact (`is_artifact_dir`).
    This is the one output policy of ``compress`` and ``tune`` (which checks what its own run left there itself and
    passes ``contents=False``); both call it before loading a model.

    Args:
        probe (`bool`, defaults to `False`): also check that the directory a save writes into can be written
            (`check_writable`): a read-only or missing parent fails here, not after the work.
        contents (`bool`, defaults to `True`): check what an existing directory holds.
    """
    given = out
    out = Path(out).expanduser().resolve()
    if out in _protected_dirs():
        raise ArtifactError(f"refusing to save into {out}: it is the current directory, one of its parents, the home "
                            "directory or /; choose a new directory, e.g. --output out/model")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a directory; choose another --output")
    if probe:
        check_writable(out, given)
    if contents and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ArtifactError(f"output directory {out} is not empty; pass overwrite=True (CLI: --overwrite) to "
                                "replace it, or choose another directory")
        if not (is_parity_file(out / PARITY_FILE) or _is_report(out / "report.json")):
            raise ArtifactError(f"refusing to overwrite {out}: it is not an hfsqueeze artifact (no parity.safetensors "
                                "or report.json of ours); --overwrite only replaces an empty directory or a previous "
                                "artifact, so choose another --output")
        foreign = _foreign_entry(out)
        if foreign is not None:
            raise ArtifactError(f"refusing to overwrite {out}: it holds {foreign!r}, which hfsqueeze did not write; "
                                "move it away or choose another --output")
    return out


def check_writable(path: str | os.PathLike, given: str | os.PathLike | None = None) -> None:
    """Fail in one line when nothing can be created in the directory that holds ``path``: the nearest existing
    directory above it is probed with a temporary sibling, the way `save_compressed` writes (a temporary directory,
    renamed into place). ``given`` is the output as the user wrote it, for the message."""
    shown = given if given is not None else path
    parent = Path(path).expanduser().absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"--output {shown}: {parent} is a file, not a directory; choose another --output")
    try:
        Path(tempfile.mkdtemp(prefix=".hfsqueeze-probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise ArtifactError(f"--output {shown}: cannot write in {parent} ({exc.strerror or exc}); choose a "
                            "writable directory") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove our own temporary/backup directories next to ``out`` left by a killed save (their process is gone).

    Only directories named like ours (``.NAME.tmp-PID-...``, ``.NAME.old-PID``) for this very ``out`` and holding
    nothing but artifact files are removed; anything else is left alone.
    """
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        match = _TEMP_DIR.match(entry.name)
        if not entry.is_dir() or entry.is_symlink() or not match or match.group("name") != out.name:
            continue
        if not _pid_alive(int(match.group("pid"))) and _foreign_entry(entry) is None:
            shutil.rmtree(entry, ignore_errors=True)
            logger.info("removed %s, left by an interrupted save", entry)
            removed.append(entry)
    return removed


def save_compressed(
    model,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    report: Any = None,
    overwrite: bool = False,
    card: bool = True,
) -> Path:
    """Save a (compressed) model as a standard artifact plus ``recipe.yaml``, ``report.json`` and a model card.

    Args:
        model (`PreTrainedModel`): the model, usually after `compress`.
        out_dir (`str` or `os.PathLike`): the directory to create.
        tokenizer (*optional*): saved alongside, so the directory is self-contained.
        report (`CompressionReport`, *optional*): defaults to the one `compress` attached to the model.
        overwrite (`bool`, defaults to `False`): replace a non-empty ``out_dir``.
        card (`bool`, defaults to `True`): write the model card (``README.md``).

    Returns:
        `Path`: the artifact directory.

    Example:

    ```python
    report = model.compress("int8", tokenizer=tok)
    hfsqueeze.save_compressed(model, "out/smollm2-int8", tokenizer=tok)
    ```
    """
    quiet_transformers_progress()
    out = check_output_dir(out_dir, overwrite)
    report = report if report is not None else getattr(model, "hfsqueeze_report", None)
    check_not_repacked(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(mode=0o755)
        with saveable(model):
            save_weights(model, tmp, stages(), side_files=False)  # each stage's on_save below writes its own
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for stage in stages():
            stage.on_save(model, tmp)
        # Outputs on a fixed input, so a later reload (e.g. the Hub parity gate) can prove it matches this model.
        record_parity(model, tmp)
        if report is not None:
            _write_report_files(report, tmp)
        if card:
            write_model_card(model.config, report, tmp, path_or_repo=str(out))
        default_permissions(tmp)  # safetensors writes weights 0600; an artifact is for others to read too
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, SafetensorError):  # safetensors' I/O failures are not OSError: make them one
            raise _as_os_error(exc) from None
        raise
    logger.info("saved %s", out)
    return out


def _as_os_error(exc: BaseException) -> OSError:
    """The `OSError` a safetensors write failure stands for (``... No space left on device (os error 28)``), so a
    full disk reads the same whichever library was writing."""
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return OSError(errno.EIO, f"writing the weights failed: {exc}")


def weights_bytes(path: str | os.PathLike) -> int:
    """Total size of the safetensors weight files in an artifact directory."""
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors") if p.name != PARITY_FILE)


def _write_report_files(report, tmp: Path) -> None:
    data = report.to_dict()
    # The saved artifact's true weight size (the report measured an identical save; keep them consistent).
    if data.get("final") is not None:
        data["final"]["disk_bytes"] = weights_bytes(tmp)
        if report.final is not None:
            report.final.disk_bytes = data["final"]["disk_bytes"]
    artifacts = []
    for stage in data.get("stages", []):
        for src in (stage.get("details") or {}).get("artifacts", []) or []:
            src_path = Path(src)
            if src_path.is_file():
                shutil.copy2(src_path, tmp / src_path.name)
                artifacts.append(src_path.name)
    if artifacts:
        data["artifacts"] = artifacts
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(data["recipe"], sort_keys=False))
    (tmp / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
