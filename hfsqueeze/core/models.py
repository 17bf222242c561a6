"""Loading a model with stock Transformers (any local directory or Hub id; ``None`` or ``"builtin"``: the built-in
default, see `hfsqueeze.builtin.models`), and where it goes (``--device``, ``--dtype``)."""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..builtin.models import resolve_model_path
from .errors import RecipeError
from .hf import is_causal_lm, strip_gguf
from .loading import check_model_source, load_errors
from .memory import unmap_weights

logger = logging.getLogger("hfsqueeze")


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
    return load_stock(source, config, trust_remote_code=trust_remote_code, **kwargs)


def load_stock(source: str, config: Any, *, trust_remote_code: bool = False, **kwargs: Any) -> tuple[Any, Any]:
    """`load_pretrained` for a ``source`` already resolved and checked, whose ``config`` is loaded: what
    `hfsqueeze.models.load_model` calls after its own checks, so a path is resolved and checked once."""
    hub = {"revision": kwargs["revision"]} if kwargs.get("revision") else {}
    with load_errors(source):
        auto = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
        model = auto.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    return prepared(model), load_tokenizer(source, trust_remote_code=trust_remote_code, **hub)


def prepared(model: Any) -> Any:
    """A freshly loaded model, ready to compress: GGUF origin forgotten, weights in memory of their own (not in the
    checkpoint's memory mapping, which would keep every page a forward touched resident however many weights a stage
    frees: see `hfsqueeze.core.memory`), eval mode."""
    strip_gguf(model)
    unmap_weights(model)
    return model.eval()


def load_tokenizer(source: str | os.PathLike, *, trust_remote_code: bool = False, **hub: Any) -> Any:
    """The tokenizer saved with a model, or ``None`` (with a warning) when there is none; ``hub``: ``revision``."""
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, TypeError):
        logger.warning("no tokenizer found at %s; data-driven stages and perplexity will be unavailable", source)
        return None
