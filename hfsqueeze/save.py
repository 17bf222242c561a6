"""Saving compressed models as standard Transformers artifacts, and loading them back.

`save_compressed` writes through `save_pretrained` (so bnb quantization lives in ``config.quantization_config`` and
reloads with no plugin) plus side files: ``recipe.yaml``, ``report.json``, the stages' artifacts (plots) and the model
card. Everything is written into a temporary sibling directory that is renamed into place at the end, so a failure
never leaves a half-written artifact behind.

Stages whose artifacts need more than stock Transformers extend three hooks: `register_save_hook` (write extra files),
`register_loader` (used by `load_compressed`) and `register_load_snippet` (the exact code users run to load).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .adapters import ADAPTER_CONFIG, save_pretrained_with_adapter
from .errors import ArtifactError, BackendMissingError
from .loading import guarded_load
from .utils import default_permissions

logger = logging.getLogger("hfsqueeze")

SaveHook = Callable[[Any, Path], None]
Loader = Callable[..., Any]
SnippetFn = Callable[[Any, str], "str | None"]
CodeCheck = Callable[[Path, Any], "bool | None"]

_SAVE_HOOKS: list[SaveHook] = []
_LOADERS: list[Loader] = []
_SNIPPETS: list[SnippetFn] = []
_CODE_CHECKS: list[CodeCheck] = []

# Files `save_compressed` writes (weights, config, tokenizer, side files, stage plots and modeling code). A directory
# holding anything else is not ours to replace.
_ARTIFACT_FILES = re.compile(
    r"^(config\.json|generation_config\.json|adapter_config\.json|.*\.safetensors|.*\.safetensors\.index\.json"
    r"|recipe\.yaml|report\.json"
    r"|README\.md|.*\.png|modeling_hfsqueeze_pruned\.py|tokenizer.*|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.(json|txt)|merges\.txt|.*\.model|chat_template\.(jinja|json))$"
)
# Our temporary and backup directories next to a target: ``.NAME.tmp-PID-RANDOM`` and ``.NAME.old-PID``.
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)(-[0-9a-f]+)?$")
# Temporary directories written by hfsqueeze 0.1.0 (``tempfile.mkdtemp`` suffix, no pid): stale after this long.
_LEGACY_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$")
_LEGACY_STALE_SECONDS = 3600

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


def register_code_check(fn: CodeCheck) -> CodeCheck:
    """``fn(py_file, config) -> True | None``: True when the stage generated ``py_file`` and its bytes are exactly
    what this hfsqueeze would generate for ``config``; raise `ArtifactError` when it is the stage's file but altered."""
    if fn not in _CODE_CHECKS:
        _CODE_CHECKS.append(fn)
    return fn


def check_artifact_code(path: str | os.PathLike, config: Any, *, trust_remote_code: bool = False) -> list[str]:
    """Refuse an artifact whose Python files hfsqueeze did not generate, unless ``trust_remote_code``.

    Every ``*.py`` file must be claimed by a stage's code check (which compares it byte for byte with what this
    version of hfsqueeze generates), and ``auto_map`` may only point into those files. Returns the checked files.
    """
    from . import methods  # noqa: F401  (stages register their code checks on import)

    root = Path(path)
    files = sorted(p for p in root.rglob("*.py") if p.is_file())
    verified = []
    for file in files:
        try:
            ok = any(fn(file, config) for fn in _CODE_CHECKS)
        except ArtifactError:
            if trust_remote_code:
                logger.warning("%s differs from the file hfsqueeze generates; trusted because trust_remote_code=True",
                               file.name)
                continue
            raise
        if not ok and not trust_remote_code:
            raise ArtifactError(f"{root} contains {file.relative_to(root)}, Python code hfsqueeze did not generate; "
                                "refusing to run or upload it (pass trust_remote_code=True, CLI: --trust-remote-code, "
                                "if you wrote it and trust it)")
        verified.append(file.relative_to(root).as_posix())
    auto_map = _config_value(config, "auto_map") or {}
    modules = {Path(f).stem for f in verified}
    for auto, target in (auto_map.items() if isinstance(auto_map, dict) else []):
        ref = target[0] if isinstance(target, (list, tuple)) else target
        module = str(ref).split("--")[-1].rsplit(".", 1)[0]
        if module not in modules and not trust_remote_code:
            raise ArtifactError(f"{root}/config.json: auto_map.{auto} points to {ref!r}, code hfsqueeze did not "
                                "generate; refusing to run or upload it (pass trust_remote_code=True, CLI: "
                                "--trust-remote-code, if you trust it)")
    return verified


def _config_value(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


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


_DTYPE_KWARGS = ("dtype", "torch_dtype", "quantization_config")


@guarded_load  # one-line errors for damaged or edited artifacts; no remote code unless trust_remote_code=True
def load_compressed(path: str | os.PathLike, *, check_parity: bool = True, **kwargs: Any):
    """Load any artifact `save_compressed` wrote (stock Transformers ones and those a stage's loader handles).

    No code from the artifact runs: stages load their own formats with the installed hfsqueeze, and
    ``trust_remote_code`` is only passed on when you pass it. When the artifact holds ``parity.safetensors`` (every
    `save_compressed` writes one), the loaded model is run on the recorded input and must reproduce the recorded
    outputs, so an artifact whose config or weights were changed after saving fails here with one line instead of
    giving wrong numbers later.

    Args:
        path (`str` or `os.PathLike`): an artifact directory, or a Hub repository id (downloaded first).
        check_parity (`bool`, defaults to `True`): compare with ``parity.safetensors`` when present.
        kwargs: passed to ``from_pretrained`` (``dtype`` and ``quantization_config`` turn the parity check off,
            since they change the outputs on purpose).

    Example:

    ```python
    model = hfsqueeze.load_compressed("out/")
    ```
    """
    import transformers
    from transformers import AutoConfig

    from . import methods  # noqa: F401
    from .methods.quantize import guard_bnb_cpu_repack

    path = _local_artifact(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=bool(kwargs.get("trust_remote_code", False)))
    if (Path(path) / ADAPTER_CONFIG).is_file() and importlib.util.find_spec("peft") is None:
        # Without peft, Transformers would silently load the base model and drop the recovery adapter.
        raise BackendMissingError(f"{path} holds a LoRA adapter (recovery kept unmerged on a quantized model); "
                                  "loading it needs peft: pip install peft")
    model = None
    for fn in _LOADERS:
        model = fn(path, config, **kwargs)
        if model is not None:
            break
    if model is None:
        model = getattr(transformers, auto_class_name(config)).from_pretrained(path, **kwargs)
        guard_bnb_cpu_repack(model)
    model.eval()
    if check_parity and not any(k in kwargs for k in _DTYPE_KWARGS):
        from .hub import check_saved_parity

        check_saved_parity(model, path)
    return model


def _local_artifact(path: str | os.PathLike) -> str:
    """``path`` itself when it is a local directory; a Hub repository id is downloaded (cached) first."""
    local = Path(path)
    if local.is_dir():
        return str(local)
    if local.exists() or os.path.sep in str(path).rstrip("/").split("/", 1)[-1] or str(path).startswith((".", "/")):
        raise ArtifactError(f"artifact not found: {path} is not a directory")
    from huggingface_hub import snapshot_download

    return snapshot_download(str(path))


def _protected_dirs() -> set[Path]:
    cwd = Path.cwd().resolve()
    return {cwd, *cwd.parents, Path.home().resolve(), Path("/").resolve()}


def is_artifact_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory `save_compressed` wrote: it holds our parity or report file and nothing but
    files of the kinds we write."""
    from .hub import PARITY_FILE, is_parity_file

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
        if entry.is_symlink() or not entry.is_file() or not _ARTIFACT_FILES.match(entry.name):
            return entry.name + ("/" if entry.is_dir() else "")
    return None


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output directory that saving could damage; return it resolved.

    The current directory, its ancestors, the home directory and ``/`` are always refused. An existing directory is
    replaced only with ``overwrite`` and only when it is empty or a previous hfsqueeze artifact (`is_artifact_dir`).
    """
    out = Path(out).expanduser().resolve()
    if out in _protected_dirs():
        raise ArtifactError(f"refusing to save into {out}: it is the current directory, one of its parents, the home "
                            "directory or /; choose a new directory, e.g. --output out/model")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a directory; choose another --output")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ArtifactError(f"output directory {out} is not empty; pass overwrite=True (CLI: --overwrite) to "
                                "replace it, or choose another directory")
        from .hub import PARITY_FILE, is_parity_file

        if not (is_parity_file(out / PARITY_FILE) or _is_report(out / "report.json")):
            raise ArtifactError(f"refusing to overwrite {out}: it is not an hfsqueeze artifact (no parity.safetensors "
                                "or report.json of ours); --overwrite only replaces an empty directory or a previous "
                                "artifact, so choose another --output")
        foreign = _foreign_entry(out)
        if foreign is not None:
            raise ArtifactError(f"refusing to overwrite {out}: it holds {foreign!r}, which hfsqueeze did not write; "
                                "move it away or choose another --output")
    return out


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
    now = time.time()
    for entry in out.parent.iterdir():
        match = _TEMP_DIR.match(entry.name)
        legacy = _LEGACY_TEMP_DIR.match(entry.name)
        if not entry.is_dir() or entry.is_symlink() or not (match or legacy):
            continue
        if (match or legacy).group("name") != out.name:
            continue
        stale = (not _pid_alive(int(match.group("pid")))) if match else \
            now - entry.stat().st_mtime > _LEGACY_STALE_SECONDS
        if stale and _foreign_entry(entry) is None:
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
    from . import methods  # noqa: F401
    from .card import write_model_card
    from .hub import record_parity
    from .methods.quantize import guard_bnb_cpu_repack
    from .methods.quantize.apply import has_repacked_4bit, saveable
    from .utils import quiet_transformers_progress

    quiet_transformers_progress()
    out = check_output_dir(out_dir, overwrite)
    report = report if report is not None else getattr(model, "hfsqueeze_report", None)
    if has_repacked_4bit(model):
        raise ArtifactError("this 4-bit model already ran bitsandbytes' CPU weight repacking, after which saving "
                            "writes corrupt weights (bnb 0.50.2); save it before inference, or reload and call "
                            "hfsqueeze.methods.quantize.guard_bnb_cpu_repack(model) first")
    guard_bnb_cpu_repack(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(mode=0o755)
        with saveable(model):
            save_pretrained_with_adapter(model, tmp)
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
        default_permissions(tmp)  # safetensors writes weights 0600; an artifact is for others to read too
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
