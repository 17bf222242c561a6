"""Activation-aware per-channel scales folded into the weights (SmoothQuant / AWQ style), architecture unchanged.

For a Linear fed by a normalization layer, ``y = W (g * x_hat)`` equals ``(W diag(s)) ((g / s) * x_hat)``: dividing the
norm's weight by ``s`` and multiplying the input columns of every Linear it feeds by ``s`` changes nothing in exact
arithmetic, but moves activation magnitude into the weights. SmoothQuant's scale,
``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)``, evens out activation outliers (what LLM.int8's W8A8 path quantizes
per token) at the cost of wider weight columns. The same works between two Linears with only linear maps between
them: ``v_proj -> o_proj`` (attention mixes tokens, not channels; with grouped KV heads each value channel feeds one
``o_proj`` column per query head of its group) and ``up_proj -> down_proj`` (``act(gate) * up`` is linear in ``up``).
Only weights change, so the artifact stays a stock checkpoint. Families are data (`FAMILIES`), not branches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

# Per model type: (norm, [Linears it feeds]) pairs and (producer, consumer) Linear pairs, relative to a decoder
# layer. `one_plus` norms multiply by (1 + weight) (Gemma). Encoders (BERT) put a residual after their LayerNorms:
# a scale folded there would change the residual stream, so they have no entry.
_LLAMA = {
    "norms": (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    "pairs": (("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj")),
    "one_plus": False,
}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma3_text": {**_LLAMA, "norms": (_LLAMA["norms"][0],
                                        ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
                    "one_plus": True},
}
SMOOTH_MODEL_TYPES = tuple(FAMILIES)


@dataclasses.dataclass
class SmoothGroup:
    """One place a scale is folded: ``source`` (a norm or a producing Linear) divides, ``targets`` multiply."""

    source: str
    targets: tuple[str, ...]
    is_norm: bool


def groups(model_type: str) -> list[SmoothGroup]:
    family = FAMILIES[model_type]
    return ([SmoothGroup(norm, targets, True) for norm, targets in family["norms"]]
            + [SmoothGroup(src, (dst,), False) for src, dst in family["pairs"]])


def _kv_map(layer: nn.Module, width: int) -> torch.Tensor | None:
    """For ``v_proj -> o_proj`` with grouped KV heads: the value channel behind each ``o_proj`` input column."""
    attn = getattr(layer, "self_attn", None)
    head_dim = getattr(attn, "head_dim", None)
    groups_ = getattr(attn, "num_key_value_groups", 1)
    if head_dim is None:
        return None
    kv_heads = width // (head_dim * groups_)
    heads = torch.arange(kv_heads).repeat_interleave(groups_)  # query head h reads value head h // groups
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def channel_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's ``max|X_j|^alpha / max|W_:,j|^(1-alpha)`` over every Linear fed (columns ``j``), kept positive."""
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
    scales = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return scales.clamp(min=1e-5)


def fold(layer: nn.Module, group: SmoothGroup, scales: torch.Tensor, one_plus: bool) -> None:
    """Fold ``scales`` (one per input channel of the targets) into ``layer``: the targets' input columns times ``s``,
    the source's output divided by ``s`` (the function the layer computes stays the same). The parameters get new
    tensors, nothing is written into: a copy sharing the original's tensors (`core.hf.sharing_copy`) leaves the
    original as it was."""
    source = layer.get_submodule(group.source)
    with torch.no_grad():
        if group.is_norm:
            w = source.weight
            s = scales.to(w.device)
            if one_plus:  # Gemma: y = x_hat * (1 + w)  ->  (1 + w) / s = 1 + w'
                w.data = ((1.0 + w.float()) / s - 1.0).to(w.dtype)
            else:
                w.data = (w.float() / s).to(w.dtype)
            if getattr(source, "bias", None) is not None:
                source.bias.data = (source.bias.float() / s).to(source.bias.dtype)
            column_scales = s
        else:
            target = layer.get_submodule(group.targets[0])
            in_width = target.weight.shape[1]
            out_scales = scales
            column_scales = scales
            if in_width != source.weight.shape[0]:  # grouped KV heads: o_proj is wider than v_proj's output
                index = _kv_map(layer, in_width)
                column_scales = scales[index.to(scales.device)]
            s_out = out_scales.to(source.weight.device)
            source.weight.data = (source.weight.float() / s_out[:, None]).to(source.weight.dtype)
            if getattr(source, "bias", None) is not None:
                source.bias.data = (source.bias.float() / s_out).to(source.bias.dtype)
        for name in group.targets:
            target = layer.get_submodule(name)
            cs = column_scales.to(target.weight.device)
            target.weight.data = (target.weight.float() * cs[None, :]).to(target.weight.dtype)


def producer_channel_max(layer: nn.Module, group: SmoothGroup, consumer_max: torch.Tensor) -> torch.Tensor:
    """For a Linear pair, the per-output-channel activation max of the producer as the consumer sees it: with grouped
    KV heads, the max over the ``o_proj`` columns each value channel feeds."""
    source = layer.get_submodule(group.source)
    width = source.weight.shape[0]
    if consumer_max.numel() == width:
        return consumer_max
    index = _kv_map(layer, consumer_max.numel()).to(consumer_max.device)
    out = torch.zeros(width, dtype=consumer_max.dtype, device=consumer_max.device)
    return out.scatter_reduce(0, index, consumer_max, reduce="amax")


def smooth_layer(layer: nn.Module, model_type: str, act_max: dict[str, torch.Tensor],
                 alpha: float | dict[str, float | None]) -> int:
    """Fold SmoothQuant scales into one decoder layer from ``act_max`` (per-channel max-abs of each target's input,
    by target name, measured before any folding); ``alpha``: one strength, or one per group (by the group's
    ``source``; ``None`` or a missing group: not folded). Returns the number of groups folded."""
    family = FAMILIES[model_type]
    folded = 0
    for group in groups(model_type):
        first = group.targets[0]
        strength = alpha.get(group.source) if isinstance(alpha, dict) else alpha
        if first not in act_max or strength is None:
            continue
        targets = [layer.get_submodule(name).weight for name in group.targets]
        amax = act_max[first]
        if not group.is_norm:
            amax = producer_channel_max(layer, group, amax)
            consumer = targets[0]
            index = None if consumer.shape[1] == amax.numel() else _kv_map(layer, consumer.shape[1])
            w_cols = consumer.detach().float().abs()
            if index is not None:  # max over every o_proj column a value channel feeds
                w_cols = torch.zeros(consumer.shape[0], amax.numel(), device=consumer.device).scatter_reduce(
                    1, index.to(consumer.device).expand(consumer.shape[0], -1), w_cols, reduce="amax")
            targets = [w_cols]
        fold(layer, group, channel_scales(amax, targets, strength), family["one_plus"])
        folded += 1
    return folded


def smoothed_inputs(model_type: str) -> list[str]:
    """The Linears (relative to a layer) whose inputs `smooth_layer` needs the max-abs of."""
    return [g.targets[0] for g in groups(model_type)]


__all__ = ["FAMILIES", "SMOOTH_MODEL_TYPES", "SmoothGroup", "channel_scales", "fold", "groups", "smooth_layer",
           "smoothed_inputs"]
