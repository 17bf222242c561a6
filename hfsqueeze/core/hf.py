"""Hugging Face helpers every layer shares: what kind of model this is, how big, where its layers are, eval mode.

Each question has one answer here, so the report, the card, the loader and the stages agree.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import UnsupportedModelError

# Class-name suffixes of the heads that predict the next token (``LlamaForCausalLM``, ``GPT2LMHeadModel``).
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")

# Auto classes, most specific first, with the name of the Transformers mapping that lists their architectures.
_AUTO_CLASSES = [
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
]


def is_causal_lm(model_or_config: Any) -> bool:
    """Whether a model (or, before loading, its config) is a causal language model with a next-token head.

    A model is judged by its class (``...ForCausalLM``, ``...LMHeadModel``); a config by the architectures it lists,
    and by whether Transformers has a causal-LM class for its model type.
    """
    if isinstance(model_or_config, nn.Module):
        return type(model_or_config).__name__.endswith(CAUSAL_LM_SUFFIXES)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = model_or_config
    archs = list(getattr(config, "architectures", None) or [])
    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not archs or any(a.endswith(CAUSAL_LM_SUFFIXES) for a in archs)
    )


def auto_class_name(config: Any) -> str:
    """The Transformers auto class that loads ``config``'s architecture (``AutoModel`` when none is more specific)."""
    from transformers.models.auto import modeling_auto

    archs = list(getattr(config, "architectures", None) or [])
    for auto_name, mapping_name in _AUTO_CLASSES:
        names = getattr(modeling_auto, mapping_name, {}).values()
        flat = {n for v in names for n in ((v,) if isinstance(v, str) else v)}
        if any(a in flat for a in archs):
            return auto_name
    return "AutoModel"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode and give it back in the mode it had (also when the block raises)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def input_device(model: nn.Module) -> torch.device:
    """The device a model's inputs go to: that of its input embeddings.

    For a model spread over several devices (``device_map="auto"``) that is its first device, where accelerate's
    hooks expect the inputs; the last parameters (the head) may sit on another. A model without input embeddings
    falls back to its first parameter, and one without parameters to the CPU.
    """
    get = getattr(model, "get_input_embeddings", None)
    try:
        weight = getattr(get(), "weight", None) if callable(get) else None
    except (NotImplementedError, AttributeError):  # a Transformers class that does not define its embeddings
        weight = None
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch: Any, model: nn.Module) -> Any:
    """``batch`` (a tensor, or a dict / list / tuple of them) moved to `input_device` of ``model``; other values
    are returned unchanged. Every forward hfsqueeze runs feeds its inputs through this."""
    device = input_device(model)

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return type(value)((k, move(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        return value

    return move(batch)


def synchronizer(model: nn.Module) -> Callable[[], None]:
    """A callable that waits for the queued work of every CUDA device holding ``model`` (a no-op off CUDA): CUDA
    runs kernels asynchronously, so a timer stopped before it would measure the launches, not the work."""
    devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)

    def synchronize() -> None:
        for device in devices:
            torch.cuda.synchronize(device)

    return synchronize


def offload_problem(model: nn.Module) -> str | None:
    """Why hfsqueeze cannot work on ``model`` where it sits: weights offloaded to disk or held on the ``meta``
    device (accelerate's CPU/disk offload loads them only for the duration of each forward), else ``None``."""
    device_map = getattr(model, "hf_device_map", None) or {}
    disk = sorted(name for name, where in device_map.items() if str(where) == "disk")
    if disk:
        return f"{len(disk)} module(s) are offloaded to disk (hf_device_map: {disk[0]!r} -> 'disk')"
    meta = next((name for name, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        return f"parameter {meta!r} is on the 'meta' device (its weights are offloaded or were never loaded)"
    return None


def check_placement(model: nn.Module) -> None:
    """Refuse, in one line and before any work, a model whose weights are not all in memory (see
    `offload_problem`): quantizing, pruning and training rewrite weights in place and cannot reach offloaded ones."""
    problem = offload_problem(model)
    if problem is not None:
        raise UnsupportedModelError(
            f"{problem}; hfsqueeze compresses models whose weights are all in memory: load it with more memory, in "
            "16-bit (CLI --dtype bfloat16), or with a device_map without offload (e.g. --device cuda)")


def frozen_copy(model: nn.Module, share: bool = False) -> nn.Module:
    """A deep copy of ``model`` in eval mode with gradients off: a teacher or a reference that never trains. With
    ``share``, a `sharing_copy` (no second set of weights) for a model whose tensors nothing writes into."""
    clone = sharing_copy(model) if share else copy.deepcopy(model)
    clone.eval()
    clone.requires_grad_(False)
    return clone


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose modules and `Parameter` objects are new but whose tensors are the original's.

    Replacing a module or rebinding a parameter's ``.data`` (``model.to(dtype)``) on either side leaves the other as
    it is, and the copy costs no weight memory; writing into a tensor in place would change both, so it is only for
    models that nothing writes into (`StageConfig.keeps_tensors`).
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def count_parameters(model: nn.Module) -> int:
    """Logical parameter count, shared tensors once: a bitsandbytes 4-bit weight counts as ``in * out`` even though
    two values share a byte (checked by class name, so no bitsandbytes import is needed)."""
    seen, total = set(), 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if name == "weight" and type(param).__name__ == "Params4bit":
                total += module.in_features * module.out_features
            else:
                total += param.numel()
    return total


def num_layers(model: nn.Module) -> int:
    """``config.num_hidden_layers`` (every Transformers config maps its own name, e.g. GPT-2's ``n_layer``, to it)."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None) if config is not None else None
    if not isinstance(n, int):
        raise UnsupportedModelError(f"{type(model).__name__} has no config.num_hidden_layers; layer students need a "
                                    "Transformers model with a stack of layers")
    return n


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(name, module_list)`` of the transformer layer stack (the ModuleList as long as the layer count)."""
    n = num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0:
            return name, module
    raise UnsupportedModelError(f"could not find the stack of {n} layers in {type(model).__name__}")


def quantization_method(model: nn.Module) -> str | None:
    """The method the model's weights are quantized with (``"bitsandbytes"``, ...), or ``None``.

    GGUF weights are dequantized when loaded, so a GGUF-loaded model counts as not quantized (see `strip_gguf`).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    method = getattr(method, "value", method)
    if method is not None and method != "gguf":
        return str(method)
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False) or any(
        type(m).__module__.startswith("bitsandbytes") for m in model.modules()
    ):
        return "bitsandbytes"
    return None


def strip_gguf(model: nn.Module) -> None:
    """Forget that weights came from a GGUF file (they are already dequantized) so the model can be saved."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) == "gguf":
        quantizer.remove_quantization_config(model)


__all__ = [
    "CAUSAL_LM_SUFFIXES",
    "auto_class_name",
    "check_placement",
    "count_parameters",
    "eval_mode",
    "find_layer_stack",
    "frozen_copy",
    "input_device",
    "is_causal_lm",
    "num_layers",
    "offload_problem",
    "quantization_method",
    "sharing_copy",
    "strip_gguf",
    "synchronizer",
    "to_device",
]
