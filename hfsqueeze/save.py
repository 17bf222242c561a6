"""Saving compressed models as standard Transformers artifacts, and loading them back.

`save_compressed` writes through `save_pretrained` (so bnb quantization lives in ``config.quantization_config`` and
reloads with no plugin) plus side files: ``recipe.yaml``, ``report.json``, the stages' artifacts (plots) and the model
card. Everything is written into a temporary sibling directory that is renamed into place at the end, so a failure
never leaves a half-written artifact behind.

Stages whose artifacts need more than stock Transformers extend three hooks: `register_save_hook` (write extra files),
`register_loader` (used by `load_compressed`) and `register_load_snippet` (the exact code users run to load).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ArtifactError
from .loading import guarded_load

logger = logging.getLogger("hfsqueeze")

SaveHook = Callable[[Any, Path], None]
Loader = Callable[..., Any]
SnippetFn = Callable[[Any, str], "str | None"]

_SAVE_HOOKS: list[SaveHook] = []
_LOADERS: list[Loader] = []
_SNIPPETS: list[SnippetFn] = []

_AUTO_CLASSES = [
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
]


def register_save_hook(fn: SaveHook) -> SaveHook:
    """``fn(model, tmp_dir)`` runs after `save_pretrained`, inside the not-yet-renamed artifact directory."""
    if fn not in _SAVE_HOOKS:
        _SAVE_HOOKS.append(fn)
    return fn


def register_loader(fn: Loader) -> Loader:
    """``fn(path, config, **kwargs) -> model | None``: the first non-None result wins in `load_compressed`."""
    if fn not in _LOADERS:
        _LOADERS.append(fn)
    return fn


def register_load_snippet(fn: SnippetFn) -> SnippetFn:
    """``fn(config, path_or_repo) -> str | None``: Python code that defines ``model``; the first non-None wins."""
    if fn not in _SNIPPETS:
        _SNIPPETS.append(fn)
    return fn


def auto_class_name(config) -> str:
    """The Transformers auto class that loads ``config``'s architecture (``AutoModel`` when none is more specific)."""
    from transformers.models.auto import modeling_auto

    archs = list(getattr(config, "architectures", None) or [])
    for auto_name, mapping_name in _AUTO_CLASSES:
        names = getattr(modeling_auto, mapping_name, {}).values()
        flat = {n for v in names for n in ((v,) if isinstance(v, str) else v)}
        if any(a in flat for a in archs):
            return auto_name
    return "AutoModel"


def load_snippet(config, path_or_repo: str) -> str:
    """The exact Python code a user runs to load the artifact at ``path_or_repo`` (it defines ``model``)."""
    from . import methods  # noqa: F401  (stages register their snippets on import)

    for fn in _SNIPPETS:
        code = fn(config, path_or_repo)
        if code:
            return code
    auto = auto_class_name(config)
    return f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{path_or_repo}")\n'


@guarded_load  # one-line errors for damaged or edited artifacts; no remote code unless trust_remote_code=True
def load_compressed(path: str | os.PathLike, **kwargs: Any):
    """Load any artifact `save_compressed` wrote (stock Transformers ones and those a stage's loader handles).

    Example:

    ```python
    model = hfsqueeze.load_compressed("out/")
    ```
    """
    import transformers
    from transformers import AutoConfig

    from . import methods  # noqa: F401

    path = str(path)
    config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "trust_remote_code"})
    for fn in _LOADERS:
        model = fn(path, config, **kwargs)
        if model is not None:
            return model
    model = getattr(transformers, auto_class_name(config)).from_pretrained(path, **kwargs)
    from .methods.quantize import guard_bnb_cpu_repack

    guard_bnb_cpu_repack(model)
    return model.eval()


def _check_target(out: Path, overwrite: bool) -> None:
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
    from . import methods  # noqa: F401
    from .card import write_model_card
    from .hub import record_parity
    from .methods.quantize import guard_bnb_cpu_repack
    from .methods.quantize.apply import has_repacked_4bit, saveable
    from .utils import quiet_transformers_progress

    quiet_transformers_progress()
    out = Path(out_dir).resolve()
    _check_target(out, overwrite)
    report = report if report is not None else getattr(model, "hfsqueeze_report", None)
    if has_repacked_4bit(model):
        raise ArtifactError("this 4-bit model already ran bitsandbytes' CPU weight repacking, after which saving "
                            "writes corrupt weights (bnb 0.50.2); save it before inference, or reload and call "
                            "hfsqueeze.methods.quantize.guard_bnb_cpu_repack(model) first")
    guard_bnb_cpu_repack(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        with saveable(model):
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for hook in _SAVE_HOOKS:
            hook(model, tmp)
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
    from .hub import PARITY_FILE

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
