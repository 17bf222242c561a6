"""Which files an artifact holds: the names `save_compressed` writes, and what `push_to_hub` may upload.

One list serves both: `save_compressed --overwrite` replaces only a directory holding nothing else, and a push
uploads only these files. Anything else in an artifact is the user's (a note, a data file, a link to a secret) and
goes to the Hub only when the user names it (``include``); ``tuning/`` (the calibration text, study journal and run
files `hfsqueeze.tune` writes) is ours but private, so it stays local unless named; pickle files run code when
loaded with ``torch.load`` and are never uploaded.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import ArtifactError

logger = logging.getLogger("hfsqueeze")

# Files `save_compressed` writes at the top of an artifact: weights (a kept LoRA adapter's included), config,
# tokenizer, side files, stage plots and prune's modeling code.
ARTIFACT_FILES = re.compile(
    r"^(config\.json|generation_config\.json|adapter_config\.json|.*\.safetensors|.*\.safetensors\.index\.json"
    r"|recipe\.yaml|report\.json"
    r"|README\.md|.*\.png|modeling_hfsqueeze_pruned\.py|tokenizer.*|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.(json|txt)|merges\.txt|.*\.model|chat_template\.(jinja|json))$"
)
# The folder `hfsqueeze.tune` keeps its run in (calibration text, study journal, trials): never published unasked.
TUNING_DIR = "tuning"
# Formats that execute code when loaded (torch.load / pickle): refused even when ``include`` names them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _walk(root: Path) -> list[str]:
    """Every file under ``root`` (relative posix paths); `ArtifactError` on the first symlink, file or folder."""
    found = []
    for folder, dirs, files in os.walk(root):  # os.walk never descends into a linked folder; it is refused below
        for name in sorted(dirs) + sorted(files):
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                raise ArtifactError(f"{root} contains a symbolic link, {rel} -> {os.readlink(path)}; refusing to "
                                    "upload anything (it could publish a file from outside the artifact): replace "
                                    "it with the file itself or remove it")
            if name in files:
                found.append(rel)
    return sorted(found)


def _pattern(pattern: str) -> str:
    # "tuning/" means the folder's files, as in huggingface_hub's allow_patterns.
    return pattern + "*" if pattern.endswith("/") else pattern


def upload_files(root: str | os.PathLike, include: Sequence[str] = (), *, log: bool = True) -> list[str]:
    """The files of the artifact ``root`` that a push uploads, as relative posix paths.

    Uploaded: the files `save_compressed` writes (`ARTIFACT_FILES`, top level) and any file ``include`` names (glob
    patterns on the relative path, ``*`` crossing folders, as in huggingface_hub's ``allow_patterns``; ``"tuning/"``
    means ``"tuning/*"``). Left out: ``tuning/`` unless included, and hidden files and folders (``.git``,
    ``.cache``). Refused with `ArtifactError`, before anything runs or is uploaded: a symbolic link anywhere, a
    pickle file (`PICKLE_SUFFIXES`) that would be uploaded, any other file, and a pattern that matches nothing.

    Args:
        root (`str` or `os.PathLike`): the artifact directory.
        include (`Sequence[str]`, *optional*): patterns of extra files to upload.
        log (`bool`, defaults to `True`): log at INFO what stays local.

    Returns:
        `list[str]`: the files to upload, sorted.
    """
    root = Path(root)
    patterns = [_pattern(p) for p in include]
    files, kept_local, pickles, foreign, matched = [], [], [], [], set()
    for rel in _walk(root):
        named = [p for p in patterns if fnmatch.fnmatchcase(rel, p)]
        matched.update(named)
        local = _hidden(rel) or _is_tuning(rel)
        ours = "/" not in rel and ARTIFACT_FILES.match(rel)
        if rel.lower().endswith(PICKLE_SUFFIXES) and (named or ours or not local):
            pickles.append(rel)
        elif named or ours:
            files.append(rel)
        elif local:
            kept_local.append(rel)
        else:
            foreign.append(rel)
    # The gravest problem first: a pickle cannot be fixed with include, a foreign file can.
    if pickles:
        kinds = ", ".join("*" + suffix for suffix in PICKLE_SUFFIXES)
        raise ArtifactError(f"refusing to upload {pickles[0]}: pickle files ({kinds}) run code when loaded and are "
                            "never uploaded, even with include; save weights as safetensors, or move the file out of "
                            "the artifact")
    if foreign:
        rel = foreign[0]
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ArtifactError(f"{root} contains {rel}{more}, a file hfsqueeze does not write; refusing to push it "
                            f"unasked: pass include=[{rel!r}] (CLI: --include {shlex.quote(rel)}) to upload it, or "
                            "move it out of the artifact")
    unmatched = [p for p in include if _pattern(p) not in matched]
    if unmatched:
        raise ArtifactError(f"include pattern {unmatched[0]!r} matches no file in {root}; patterns are globs on the "
                            f"path inside the artifact, e.g. '{TUNING_DIR}/*' or 'extra/data.csv'")
    tuning = [rel for rel in kept_local if _is_tuning(rel)]
    if log and tuning:
        logger.info("%s/ (%d files: the tuning run, its calibration text included) stays local; pass "
                    "include=['%s/*'] (CLI: --include '%s/*') to upload it", TUNING_DIR, len(tuning), TUNING_DIR,
                    TUNING_DIR)
    return files


def _is_tuning(rel: str) -> bool:
    return rel.startswith(TUNING_DIR + "/")


__all__ = ["ARTIFACT_FILES", "PICKLE_SUFFIXES", "TUNING_DIR", "upload_files"]
