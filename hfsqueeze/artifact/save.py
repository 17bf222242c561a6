"""Saving compressed models as standard Transformers artifacts, and loading them back.

`save_compressed` writes through `save_pretrained` (so bnb quantization lives in ``config.quantization_config`` and
reloads with no plugin) plus side files: ``recipe.yaml``, ``report.json``, the stages' artifacts (plots), the parity
outputs and the model card. Everything is written into a temporary sibling directory that is renamed into place at the
end, so a failure never leaves a half-written artifact behind.

A stage whose artifacts need more than stock Transformers writes them in its `Stage.on_save` hook; loading them back
is `hfsqueeze.artifact.load`'s job.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..compat.bnb import check_not_repacked, saveable
from ..core.errors import ArtifactError
from ..core.utils import quiet_transformers_progress
from ..registry import stages
from .card import write_model_card
from .parity import PARITY_FILE, record_parity

logger = logging.getLogger("hfsqueeze")


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a directory; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"output directory {out} is not empty; pass overwrite=True (CLI: --overwrite) to "
                            "replace it, or choose another directory")


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
    out = Path(out_dir).resolve()
    check_output_dir(out, overwrite)
    report = report if report is not None else getattr(model, "hfsqueeze_report", None)
    check_not_repacked(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        with saveable(model):
            model.save_pretrained(tmp)
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
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, backup)
            os.replace(tmp, out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s", out)
    return out


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
