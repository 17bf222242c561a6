"""Students built in place from the model being compressed: a subset of its layers, or a model from a config."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from ...core.errors import RecipeError
from ...core.hf import count_parameters, find_layer_stack, num_layers
from .config import StudentConfig

logger = logging.getLogger("hfsqueeze")


def _renumber(layer: nn.Module, index: int) -> None:
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def _set_layer_count(config: Any, kept: list[int]) -> None:
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) > max(kept):
        config.layer_types = [layer_types[i] for i in kept]


def keep_layers(model: nn.Module, layers: list[int]) -> list[int]:
    """Keep only ``layers`` (0-based, in the given order) of the model's layer stack, in place.

    The kept layers keep their weights (DistilBERT initialises its student from every other teacher layer the same
    way); ``config.num_hidden_layers`` and each attention's ``layer_idx`` (used by the KV cache) are updated.
    Returns the kept indices.
    """
    name, stack = find_layer_stack(model)
    total = len(stack)
    bad = [i for i in layers if i >= total]
    if bad:
        raise RecipeError(f"student layers {bad} do not exist; the model has {total} layers (0..{total - 1})")
    kept = [stack[i] for i in layers]
    for new_index, layer in enumerate(kept):
        _renumber(layer, new_index)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.ModuleList(kept))
    _set_layer_count(model.config, list(layers))
    logger.info("student: kept layers %s of %d", layers, total)
    return list(layers)


def uniform_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """``student_layers`` teacher layer indices spread evenly, always including the first and the last."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def student_from_config(model: nn.Module, overrides: dict[str, Any]) -> list[int] | None:
    """Rebuild ``model`` in place as a fresh model of the same class with ``overrides`` applied to its config.

    Tensors whose names and shapes match are copied from the model (the layers of a shallower student from evenly
    spaced layers); the rest keep their random initialisation. Returns the teacher layer each student layer was
    initialised from, or ``None`` when the depth did not shrink.
    """
    config_dict = model.config.to_dict()
    unknown = [k for k in overrides if k not in config_dict and not hasattr(model.config, k)]
    if unknown:
        raise RecipeError(f"student config keys {unknown} are not fields of {type(model.config).__name__}")
    old_n = num_layers(model)
    try:
        new_config = type(model.config).from_dict({**config_dict, **overrides})
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"student config {overrides} is invalid: {str(exc).splitlines()[0]}") from None
    dtype = next(model.parameters()).dtype
    new = type(model)(new_config).to(dtype)
    new_n = new_config.num_hidden_layers
    source_layers = uniform_layers(old_n, new_n) if new_n < old_n else None
    stack_name, _ = find_layer_stack(model)
    pattern = re.compile(rf"^{re.escape(stack_name)}\.(\d+)\.")
    old_state = model.state_dict()
    copied = 0
    with torch.no_grad():
        for key, tensor in new.state_dict().items():
            src = key
            match = pattern.match(key)
            if match and source_layers is not None:
                src = f"{stack_name}.{source_layers[int(match.group(1))]}.{key[match.end():]}"
            if src in old_state and old_state[src].shape == tensor.shape:
                tensor.copy_(old_state[src])
                copied += 1
    logger.info("student from config: %d of %d tensors initialised from the model", copied, len(new.state_dict()))
    new.config._name_or_path = model.config._name_or_path
    new.train(model.training)
    # The stage works in place: the caller's object must become the student, so it takes over the new one's state.
    model.__dict__.clear()
    model.__dict__.update(new.__dict__)
    return source_layers


def build_student(model: nn.Module, config: StudentConfig) -> dict[str, Any]:
    """Apply a `StudentConfig` to ``model`` in place; returns details including ``source_layers`` for layer maps."""
    before = count_parameters(model)
    if config.layers is not None or config.keep is not None:
        layers = config.layers
        if layers is None:
            total = num_layers(model)
            count = config.keep if isinstance(config.keep, int) else max(1, round(config.keep * total))
            if count > total:
                raise RecipeError(f"student keep={config.keep}: the model has only {total} layers")
            layers = uniform_layers(total, count)
        source_layers = keep_layers(model, layers)
        kind = "layers"
    else:
        source_layers = student_from_config(model, config.config or {})
        kind = "config"
    after = count_parameters(model)
    return {"kind": kind, "source_layers": source_layers, "parameters_before": before, "parameters_after": after}
