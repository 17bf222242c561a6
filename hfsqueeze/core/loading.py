"""Checks around loading a model directory, so that a bad ``--model`` or artifact is one line naming what is wrong.

- `check_model_source` runs before anything is loaded: a path that is clearly local but missing (no Hub retries for
  it), a directory without ``config.json``, a ``config.json`` that is not JSON, no weight files, a truncated
  safetensors file, a ``quantization_config`` that does not describe the weights.
- `load_errors` turns what Transformers raises while loading (size mismatches, custom code that was not allowed, an
  unknown model type, a bad pruning plan) into `ArtifactError` / `UnsupportedModelError`.
- `guarded_load` wraps a loader function with both.

This module imports nothing heavy at import time (Transformers and huggingface_hub only inside the checks).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ArtifactError, BackendMissingError, HfSqueezeError, UnsupportedModelError

# The per-layer pruning plan of hfsqueeze's pruned artifacts (`hfsqueeze.methods.prune.surgery.PLAN_KEY`; not
# imported, so that loading never imports the methods).
PLAN_FIELD = "hfsqueeze_pruning"
# Written next to the weights by hfsqueeze (`hfsqueeze.artifact.parity.PARITY_FILE`); reference outputs, not weights.
_PARITY_FILE = "parity.safetensors"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def is_local_path(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a local path rather than a Hub repo id: it exists, it cannot be a repo id
    (``./x``, ``/x``, ``~/x``, ``a/b/c``), or its first component is a local directory (``out/model``)."""
    text = str(source)
    if Path(text).expanduser().exists():
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return "/" in text and Path(text.split("/")[0]).is_dir()


def check_model_source(source: str | os.PathLike) -> None:
    """Fail with one line, before loading, when a local model directory cannot load; Hub ids pass unchecked."""
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        if is_local_path(text):
            raise ArtifactError(f"model path not found: {text} (no such directory; a Hub id looks like owner/name)")
        return
    if not path.is_dir():
        raise ArtifactError(f"model path {text} is a file; give the model's directory (config.json and weights)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ArtifactError(f"{text} is not a model directory: it has no config.json")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{config_path} is not UTF-8 text; the file is damaged (restore or re-download it)") \
            from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{config_path} is not valid JSON ({exc.msg} on line {exc.lineno}, column {exc.colno}); "
                            "the file is damaged (restore or re-download it)") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{config_path} is not a JSON object; the file is damaged (restore or re-download it)")
    _check_weight_files(path, config)


def _check_weight_files(path: Path, config: dict[str, Any]) -> None:
    files = [p for pattern in _WEIGHT_PATTERNS for p in sorted(path.glob(pattern)) if p.name != _PARITY_FILE]
    if not files:
        raise ArtifactError(f"{path} has no weight files (model.safetensors or pytorch_model.bin); the save or "
                            "download was incomplete")
    keys: list[str] = []
    for file in (f for f in files if f.suffix == ".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as handle:
                keys += list(handle.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every damage
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ArtifactError(f"{file} is damaged or truncated ({first}); re-save or re-download it") from None
    _check_quantization_label(path, config, keys)


def _check_quantization_label(path: Path, config: dict[str, Any], keys: list[str]) -> None:
    """A bitsandbytes ``quantization_config`` must describe the weights' format (an edited one loads garbage)."""
    qc = config.get("quantization_config")
    if not keys or not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
        return
    int8 = any(k.endswith(".SCB") for k in keys)
    four = {k.rsplit("bitsandbytes__", 1)[1] for k in keys if ".quant_state.bitsandbytes__" in k}
    says_8, says_4 = bool(qc.get("load_in_8bit")), bool(qc.get("load_in_4bit"))
    where = f"{path}/config.json field 'quantization_config'"
    if says_4 and int8 and not four:
        raise ArtifactError(f"{where} says 4-bit (load_in_4bit) but the weights are int8 (LLM.int8 .SCB scales); "
                            "config.json was edited: restore it")
    if says_8 and four and not int8:
        raise ArtifactError(f"{where} says 8-bit (load_in_8bit) but the weights are 4-bit ({', '.join(sorted(four))}); "
                            "config.json was edited: restore it")
    quant_type = qc.get("bnb_4bit_quant_type")
    if says_4 and four and quant_type not in four:
        raise ArtifactError(f"{where}: bnb_4bit_quant_type is {quant_type!r} but the weights are "
                            f"{', '.join(sorted(four))}; config.json was edited: restore it")


class _HeldRecords(logging.Filter):
    """Holds Transformers' load report while a load runs: parsed on failure, passed on after a success."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


@contextlib.contextmanager
def load_errors(source: str | os.PathLike) -> Iterator[None]:
    """Turn any failure while loading ``source`` into one line (`ArtifactError`, `UnsupportedModelError`, ...)."""
    logger = logging.getLogger("transformers.modeling_utils")
    outer = next((f for f in logger.filters if isinstance(f, _HeldRecords)), None)  # nested: the outer one holds
    held = outer or _HeldRecords()
    if outer is None:
        logger.addFilter(held)
    failed = True
    try:
        yield
        failed = False
    except HfSqueezeError:
        raise
    except ImportError as exc:
        raise BackendMissingError(f"cannot load {source}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - whatever a damaged model makes Transformers raise, say it in one line
        raise _describe(source, exc, held.records) from None
    finally:
        if outer is None:
            logger.removeFilter(held)
            for record in held.records if not failed else []:
                logger.handle(record)


def guarded_load(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``fn(path, **kwargs)`` so it checks ``path`` first, fails in one line, and runs no remote code
    unless ``trust_remote_code=True`` is passed (never Transformers' interactive prompt)."""

    @functools.wraps(fn)
    def wrapper(path: str | os.PathLike, **kwargs: Any) -> Any:
        check_model_source(path)
        kwargs["trust_remote_code"] = bool(kwargs.get("trust_remote_code", False))
        with load_errors(path):
            return fn(path, **kwargs)

    return wrapper


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _config_fields(source: str | os.PathLike) -> dict[str, Any]:
    try:
        data = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(source: str | os.PathLike, exc: Exception, records: list[logging.LogRecord]) -> HfSqueezeError:
    message = str(exc)
    if "contains custom code" in message:
        return ArtifactError(f"{source} contains custom modeling code (config.json auto_map); hfsqueeze runs no code "
                             "from a model unless asked: pass --trust-remote-code (Python: trust_remote_code=True) "
                             "if you trust it")
    found = re.search(r"has model type `([^`]*)` but Transformers does not recognize", message)
    if found:
        import transformers

        return UnsupportedModelError(f"{source}: model type {found.group(1)!r} in config.json is not known to "
                                     f"Transformers {transformers.__version__}; upgrade transformers, or check the "
                                     "file")
    if "ignore_mismatched_sizes" in message or "size mismatch" in message:
        return ArtifactError(_mismatch_message(source, records))
    if PLAN_FIELD in message:  # the plan checks of the pruned-model class name the field themselves
        return ArtifactError(f"{source}: {_first_line(exc)}")
    if type(exc).__name__ == "SafetensorError":
        return ArtifactError(f"a weight file in {source} is damaged or truncated ({_first_line(exc)}); re-save or "
                             "re-download it")
    if isinstance(exc, OSError) and not Path(str(source)).exists():
        return ArtifactError(f"cannot load {source}: not a local directory, and the Hub has no such model or is not "
                             f"reachable ({_first_line(exc)})")
    return ArtifactError(f"cannot load a model from {source} ({type(exc).__name__}: {_first_line(exc)})")


def _mismatch_message(source: str | os.PathLike, records: list[logging.LogRecord]) -> str:
    """Name a tensor whose shape differs (the first by name), from the load report Transformers logged."""
    rows = []
    for record in records:
        for line in _ANSI.sub("", record.getMessage()).splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) >= 2 and cells[1] == "MISMATCH":
                rows.append((cells[0], line))
    detail = ""
    if rows:
        key, line = min(rows)
        shapes = re.search(r"ckpt: torch\.Size\((\[[^\]]*\])\) vs model: ?torch\.Size\((\[[^\]]*\])\)", line)
        detail = (f": {key} is {shapes.group(1)} in the weights but {shapes.group(2)} by the config" if shapes
                  else f": {key} has another shape in the weights")
    fields = _config_fields(source)
    field = f"config.json field '{PLAN_FIELD}'" if PLAN_FIELD in fields else "config.json"
    return (f"the weights in {source} do not have the shapes {field} describes{detail}; config.json was edited or "
            "belongs to another model: restore it")
