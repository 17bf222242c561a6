"""Loading saved artifacts back: `load_compressed`, `load_snippet` (the code a user runs without hfsqueeze) and
`check_artifact_code` (no Python file runs or is uploaded unless hfsqueeze generated it, or the user trusts it).

Stock artifacts load with the Transformers auto class of their architecture; a stage whose artifacts need more
(a pruned model with per-layer sizes) answers through its `Stage.load`, `Stage.load_snippet` and
`Stage.verify_code` hooks.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig

from ..compat.bnb import guard_bnb_cpu_repack
from ..core.errors import ArtifactError, BackendMissingError
from ..core.hf import auto_class_name
from ..core.loading import check_model_source, guarded_load, load_errors
from ..builtin.models import resolve_model_path
from ..core.models import load_stock, load_tokenizer, prepared
from ..core.utils import quiet_transformers_progress
from ..registry import stages
from .parity import check_parity_files, check_saved_parity

logger = logging.getLogger("hfsqueeze")


def load_snippet(config, path_or_repo: str) -> str:
    """The exact Python code a user runs to load the artifact at ``path_or_repo`` (it defines ``model``)."""
    for stage in stages():
        code = stage.load_snippet(config, path_or_repo)
        if code:
            return code
    auto = auto_class_name(config)
    return f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{path_or_repo}")\n'


_DTYPE_KWARGS = ("dtype", "torch_dtype", "quantization_config")


@guarded_load  # one-line errors for damaged or edited artifacts; no remote code unless trust_remote_code=True
def load_compressed(path: str | os.PathLike, *, check_parity: bool = True, **kwargs: Any):
    """Load any artifact `save_compressed` wrote (stock Transformers ones and those a stage's loader handles).

    No code from the artifact runs: stages load their own formats with the installed hfsqueeze, and
    ``trust_remote_code`` is only passed on when you pass it. Every `save_compressed` writes ``parity.safetensors``;
    the loaded model is run on the recorded input and must reproduce the recorded outputs, so an artifact whose
    config or weights were changed after saving fails here with one line instead of giving wrong numbers later.
    Before anything loads, an hfsqueeze artifact (``report.json`` of ours) without that file is refused, and a kept
    LoRA adapter must be there, byte for byte as saved (`hfsqueeze.artifact.parity.check_parity_files`).

    Args:
        path (`str` or `os.PathLike`): an artifact directory, or a Hub repository id (downloaded first).
        check_parity (`bool`, defaults to `True`): the checks above; `False` loads an incomplete or edited artifact
            to inspect it. A plain Transformers directory (no ``report.json`` of ours) has nothing to check.
        kwargs: passed to ``from_pretrained`` (``dtype`` and ``quantization_config`` skip the outputs comparison,
            since they change the outputs on purpose; the file checks still run).

    Example:

    ```python
    model = hfsqueeze.load_compressed("out/")
    ```
    """
    path = _local_artifact(path)
    if check_parity:
        check_parity_files(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=bool(kwargs.get("trust_remote_code", False)))
    _check_side_files_loadable(path)
    model = _stage_load(path, config, kwargs)
    if model is None:
        model = getattr(transformers, auto_class_name(config)).from_pretrained(path, **kwargs)
    return _checked(model, path, check_parity, kwargs)


def load_model(path: str | os.PathLike | None, **kwargs: Any) -> tuple[Any, Any]:
    """Load a model and its tokenizer from a directory or Hub id (``None`` or ``"builtin"``: the built-in default).

    Stock models load like `hfsqueeze.core.models.load_pretrained` (causal LM if the config says so, else
    AutoModel); hfsqueeze's own artifacts that need a stage to load them (a pruned model with per-layer sizes) load
    through that stage, as in `load_compressed`. A bad directory fails in one line before anything heavy.
    """
    quiet_transformers_progress()
    source = resolve_model_path(path)
    trust = bool(kwargs.pop("trust_remote_code", False))
    hub = {"revision": kwargs["revision"]} if kwargs.get("revision") else {}  # a Hub id's branch, tag or commit
    check_model_source(source)
    with load_errors(source):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust, **hub)
        model = _stage_load(source, config, {**kwargs, "trust_remote_code": trust})
    if model is None:
        return load_stock(source, config, trust_remote_code=trust, **kwargs)
    with load_errors(source):
        model = _checked(model, source, True, kwargs)
    return prepared(model), load_tokenizer(source, trust_remote_code=trust, **hub)


def _check_side_files_loadable(directory: str | os.PathLike) -> None:
    """Refuse, in one line, an artifact holding a stage's side files (`Stage.side_files`: a LoRA adapter) when the
    package that loads them is missing: Transformers would silently load the model without them."""
    for stage in stages():
        declared = stage.side_files()
        if declared is None or declared.backend is None or importlib.util.find_spec(declared.backend) is not None:
            continue
        if any((Path(directory) / name).is_file() for name in declared.names):
            raise BackendMissingError(f"{directory} holds a {declared.name} ({declared.why}); loading it needs "
                                      f"{declared.backend}: pip install {declared.backend}")


def _stage_load(path: str, config: Any, kwargs: dict[str, Any]) -> Any:
    """The model as the first stage that claims the artifact loads it, or ``None`` (a stock artifact)."""
    return next((m for m in (stage.load(path, config, **kwargs) for stage in stages()) if m is not None), None)


def _checked(model: Any, path: str, check_parity: bool, kwargs: dict[str, Any]) -> Any:
    """Guard bitsandbytes, eval mode, and (unless the load changed the outputs on purpose) the parity check."""
    guard_bnb_cpu_repack(model).eval()
    # dtype="auto" is the checkpoint's own dtype (Transformers' default): it changes nothing.
    if check_parity and not any(k in kwargs and kwargs[k] != "auto" for k in _DTYPE_KWARGS):
        check_saved_parity(model, path)
    return model


def _local_artifact(path: str | os.PathLike) -> str:
    """``path`` itself when it is a local directory; a Hub repository id is downloaded (cached) first."""
    local = Path(path)
    if local.is_dir():
        return str(local)
    if local.exists() or os.path.sep in str(path).rstrip("/").split("/", 1)[-1] or str(path).startswith((".", "/")):
        raise ArtifactError(f"artifact not found: {path} is not a directory")
    from huggingface_hub import snapshot_download  # the Hub client only when a repository id is given

    return snapshot_download(str(path))


def check_artifact_code(path: str | os.PathLike, config: Any, *, trust_remote_code: bool = False) -> list[str]:
    """Refuse an artifact whose Python files hfsqueeze did not generate, unless ``trust_remote_code``.

    Every ``*.py`` file must be claimed by a stage (`Stage.verify_code` compares it byte for byte with what this
    version of hfsqueeze generates), and ``auto_map`` may only point into those files. Returns the checked files.
    """
    root = Path(path)
    files = sorted(p for p in root.rglob("*.py") if p.is_file())
    verified = []
    for file in files:
        try:
            ok = any(stage.verify_code(file, config) for stage in stages())
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


__all__ = ["check_artifact_code", "load_compressed", "load_model", "load_snippet"]
