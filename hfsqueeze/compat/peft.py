"""LoRA adapters kept unmerged on a bitsandbytes-quantized model, saved the way Transformers loads them back.

Merging LoRA into 4-bit or 8-bit weights re-quantizes them: the update is mostly smaller than half a quantization step,
so it is rounded away (measured on SmolLM2-135M nf4: adapter live KL 0.184 to the original on held-out text, after
merging 0.290, the same as nf4 without recovery). So recovery of a quantized model keeps its adapter: the artifact
holds the quantized base (``config.json``, ``model.safetensors``) and the adapter (``adapter_config.json``,
``adapter_model.safetensors``) side by side, and plain ``AutoModelForCausalLM.from_pretrained(dir)`` loads both
(Transformers' PEFT integration, with ``peft`` installed).

The live model is the Transformers model with peft's LoRA layers injected in place (no `PeftModel` wrapper). Saving
writes the base with the LoRA layers swapped out for the duration (`adapter_removed`), then the adapter files
(`write_adapter`). Transformers 5.24 wants peft >= 0.22 for its own adapter *saving* API while PyPI has 0.21, so the
adapter files are written with peft's functions directly; its *loading* path works with 0.21.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import require_backend

if TYPE_CHECKING:  # the Hub push imports this module and must not pay for torch
    from torch import nn

logger = logging.getLogger("hfsqueeze")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "get_base_layer") and hasattr(m, "lora_A")]


def has_adapter(model: nn.Module) -> bool:
    """True when ``model`` carries injected LoRA layers (a recovery adapter kept unmerged, or one loaded from disk)."""
    return bool(_tuner_layers(model))


def keep_adapter(peft_model: nn.Module) -> nn.Module:
    """Return the Transformers model inside ``peft_model`` with its LoRA layers still injected (no `PeftModel`)."""
    model = peft_model.get_base_model()
    config = peft_model.peft_config[ADAPTER_NAME]
    model.peft_config = {ADAPTER_NAME: config}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
    return model


def drop_adapter(model: nn.Module) -> int:
    """Remove every LoRA layer (no merge): the model is exactly as it was before the adapter. Returns the count."""
    layers = _tuner_layers(model)
    for name, module in layers:
        model.set_submodule(name, module.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.peft_config
    return len(layers)


@contextlib.contextmanager
def adapter_removed(model: nn.Module) -> Iterator[nn.Module]:
    """Swap the LoRA layers for their base layers while the block runs, so ``save_pretrained`` writes the plain base."""
    layers = _tuner_layers(model)
    config = model.__dict__.pop("peft_config", None)
    for name, module in layers:
        model.set_submodule(name, module.get_base_layer())
    try:
        yield model
    finally:
        for name, module in layers:
            model.set_submodule(name, module)
        if config is not None:
            model.peft_config = config


def write_adapter(model: nn.Module, directory: str | Path) -> list[Path]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (peft's own format) into ``directory``."""
    if not has_adapter(model):
        return []
    peft = require_backend("peft")
    from safetensors.torch import save_file

    config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        raise ValueError("the model has LoRA layers but no peft_config; cannot describe its adapter")
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    directory = Path(directory)
    # Transformers loads the base from this directory (it holds config.json); on the Hub the base is the same repo.
    config.base_model_name_or_path = None
    config.save_pretrained(str(directory))
    weights = directory / ADAPTER_WEIGHTS
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    return [directory / ADAPTER_CONFIG, weights]


def adapter_summary(model: nn.Module) -> dict[str, Any] | None:
    """Rank, target modules and parameter count of the kept adapter, for the report."""
    if not has_adapter(model):
        return None
    config = model.peft_config[ADAPTER_NAME]
    count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    targets = config.target_modules
    return {"r": config.r, "alpha": config.lora_alpha, "parameters": count,
            "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets}


def hub_adapter_config(path: str | Path, repo_id: str) -> bytes:
    """``adapter_config.json`` as uploaded to ``repo_id``: its base points at the repository itself.

    Loading an adapter repository from the Hub, Transformers reads the base model from ``base_model_name_or_path``
    (locally it uses the directory, which holds the base too); here base and adapter live in the same repository.
    """
    data = json.loads(Path(path).read_text())
    data["base_model_name_or_path"] = repo_id
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
