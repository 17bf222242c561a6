"""Structural surgery on Transformers models: remove attention heads, FFN neurons and whole layers, in place.

This module imports nothing but torch and transformers, on purpose: hfsqueeze copies its source into pruned
artifacts as ``modeling_hfsqueeze_pruned.py`` so that ``AutoModel*.from_pretrained(path, trust_remote_code=True)``
rebuilds the pruned shapes without hfsqueeze installed. The pruning plan (head counts and FFN width per layer) lives
in ``config.hfsqueeze_pruning``; the class built by `pruned_class` applies it right after the stock ``__init__``,
before the weights are loaded.

Supported families and the modules each one changes:

- Llama family (llama, mistral, qwen2, qwen3, gemma, gemma3_text): ``self_attn.{q,k,v,o}_proj`` and
  ``num_key_value_groups``; ``mlp.{gate,up,down}_proj``; ``model.layers``, ``config.layer_types``.
- GPT-2: the fused ``attn.c_attn`` (Conv1D, q|k|v columns), ``attn.c_proj``, ``num_heads``, ``split_size``;
  ``mlp.c_fc``/``mlp.c_proj``; ``transformer.h``.
- BERT family (bert, roberta, xlm-roberta): ``attention.self.{query,key,value}``, ``attention.output.dense``,
  ``num_attention_heads``, ``all_head_size``; ``intermediate.dense``/``output.dense``; ``encoder.layer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PLAN_KEY = "hfsqueeze_pruning"
PLAN_VERSION = 1

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text")
GPT2_FAMILY = ("gpt2",)
BERT_FAMILY = ("bert", "roberta", "xlm-roberta")
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + GPT2_FAMILY + BERT_FAMILY


def family_of(config: Any) -> str | None:
    """``"llama"``, ``"gpt2"`` or ``"bert"`` for a supported ``config.model_type``, else ``None``."""
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_FAMILY:
        return "llama"
    if model_type in GPT2_FAMILY:
        return "gpt2"
    if model_type in BERT_FAMILY:
        return "bert"
    return None


def base_of(model: nn.Module) -> nn.Module:
    """The backbone (``LlamaModel``, ``GPT2Model``, ``BertModel``) of a model with or without a task head."""
    return getattr(model, "base_model", model)


def layer_list(family: str, model: nn.Module) -> nn.ModuleList:
    base = base_of(model)
    if family == "llama":
        return base.layers
    if family == "gpt2":
        return base.h
    return base.encoder.layer


def _set_layer_list(family: str, model: nn.Module, layers: nn.ModuleList) -> None:
    base = base_of(model)
    if family == "llama":
        base.layers = layers
    elif family == "gpt2":
        base.h = layers
    else:
        base.encoder.layer = layers


def attention_of(family: str, layer: nn.Module) -> nn.Module:
    if family == "llama":
        return layer.self_attn
    if family == "gpt2":
        return layer.attn
    return layer.attention.self


def head_output_proj(family: str, layer: nn.Module) -> nn.Module:
    """The projection whose input is the concatenated per-head attention outputs."""
    if family == "llama":
        return layer.self_attn.o_proj
    if family == "gpt2":
        return layer.attn.c_proj
    return layer.attention.output.dense


def ffn_output_proj(family: str, layer: nn.Module) -> nn.Module:
    """The projection whose input is the FFN's intermediate activations (one column per neuron)."""
    if family == "llama":
        return layer.mlp.down_proj
    if family == "gpt2":
        return layer.mlp.c_proj
    return layer.output.dense


def ffn_input_projs(family: str, layer: nn.Module) -> list[nn.Module]:
    """The projections producing the FFN's intermediate activations (one output row per neuron)."""
    if family == "llama":
        return [layer.mlp.gate_proj, layer.mlp.up_proj]
    if family == "gpt2":
        return [layer.mlp.c_fc]
    return [layer.intermediate.dense]


def head_dim_of(family: str, layer: nn.Module) -> int:
    attn = attention_of(family, layer)
    return int(attn.attention_head_size if family == "bert" else attn.head_dim)


def attention_shape(family: str, layer: nn.Module) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head_dim)`` of one layer, read from the weights (the truth)."""
    head_dim = head_dim_of(family, layer)
    n_q = in_features(head_output_proj(family, layer)) // head_dim
    if family == "llama":
        n_kv = out_features(layer.self_attn.k_proj) // head_dim
    else:
        n_kv = n_q
    return n_q, n_kv, head_dim


def ffn_width(family: str, layer: nn.Module) -> int:
    return in_features(ffn_output_proj(family, layer))


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def in_features(module: nn.Module) -> int:
    return int(module.nx if is_conv1d(module) else module.in_features)


def out_features(module: nn.Module) -> int:
    return int(module.nf if is_conv1d(module) else module.out_features)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (Conv1D stores it transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _param(old: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.contiguous(), requires_grad=old.requires_grad)


def select_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the output features ``index`` of a Linear or Conv1D (weight rows and bias entries)."""
    index = index.to(module.weight.device)
    dim = 1 if is_conv1d(module) else 0
    module.weight = _param(module.weight, module.weight.index_select(dim, index))
    if getattr(module, "bias", None) is not None:
        module.bias = _param(module.bias, module.bias.index_select(0, index))
    if is_conv1d(module):
        module.nf = int(index.numel())
    else:
        module.out_features = int(index.numel())


def select_inputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the input features ``index`` of a Linear or Conv1D (weight columns; the bias is unchanged)."""
    index = index.to(module.weight.device)
    dim = 0 if is_conv1d(module) else 1
    module.weight = _param(module.weight, module.weight.index_select(dim, index))
    if is_conv1d(module):
        module.nx = int(index.numel())
    else:
        module.in_features = int(index.numel())


def _head_index(heads: list[int], head_dim: int, offset: int = 0) -> torch.Tensor:
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(offset + h * head_dim, offset + (h + 1) * head_dim) for h in heads])


def _select_heads(family: str, layer: nn.Module, keep_q: list[int], keep_kv: list[int]) -> None:
    """Keep query heads ``keep_q`` and key/value heads ``keep_kv`` and update the module attributes."""
    n_q, n_kv, head_dim = attention_shape(family, layer)
    attn = attention_of(family, layer)
    q_index = _head_index(keep_q, head_dim)
    if family == "llama":
        select_outputs(attn.q_proj, q_index)
        kv_index = _head_index(keep_kv, head_dim)
        select_outputs(attn.k_proj, kv_index)
        select_outputs(attn.v_proj, kv_index)
        select_inputs(attn.o_proj, q_index)
        attn.num_key_value_groups = len(keep_q) // len(keep_kv)
        # Some variants keep these as attributes; the forward reads the shapes from the weights.
        for name, value in (("num_heads", len(keep_q)), ("num_attention_heads", len(keep_q)),
                            ("num_key_value_heads", len(keep_kv))):
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, value)
    elif family == "gpt2":
        split = attn.split_size
        fused = torch.cat([_head_index(keep_q, head_dim, offset=part * split) for part in range(3)])
        select_outputs(attn.c_attn, fused)
        select_inputs(attn.c_proj, q_index)
        attn.num_heads = len(keep_q)
        attn.split_size = len(keep_q) * head_dim
    else:
        for proj in (attn.query, attn.key, attn.value):
            select_outputs(proj, q_index)
        select_inputs(layer.attention.output.dense, q_index)
        attn.num_attention_heads = len(keep_q)
        attn.all_head_size = len(keep_q) * head_dim


def prune_heads(family: str, layer: nn.Module, keep_q: list[int], keep_kv: list[int] | None = None) -> None:
    """Keep the query heads ``keep_q`` (and, for grouped-query attention, the key/value heads ``keep_kv``).

    Every kept key/value head must keep the same number of its query heads, and no kept query head may belong to a
    removed key/value head: that is what ``repeat_kv`` (eager) and ``enable_gqa`` (sdpa) assume.
    """
    n_q, n_kv, _ = attention_shape(family, layer)
    keep_q = sorted(int(h) for h in keep_q)
    keep_kv = sorted(int(h) for h in (keep_kv if keep_kv is not None else range(n_kv)))
    if family != "llama":  # multi-head attention: a key/value head per query head
        keep_kv = keep_q
    if not keep_q or not keep_kv:
        raise ValueError("a layer must keep at least one attention head")
    if len(set(keep_q)) != len(keep_q) or keep_q[0] < 0 or keep_q[-1] >= n_q or keep_kv[-1] >= n_kv:
        raise ValueError(f"head indices out of range: keep_q={keep_q} of {n_q}, keep_kv={keep_kv} of {n_kv}")
    group = n_q // n_kv
    per_kv = {kv: 0 for kv in keep_kv}
    for h in keep_q:
        if h // group not in per_kv:
            raise ValueError(f"query head {h} belongs to key/value head {h // group}, which is being removed")
        per_kv[h // group] += 1
    if len(set(per_kv.values())) != 1:
        raise ValueError(f"every kept key/value head must keep the same number of query heads, got {per_kv}")
    _select_heads(family, layer, keep_q, keep_kv)


def prune_ffn(family: str, layer: nn.Module, keep: list[int]) -> None:
    """Keep only the FFN intermediate neurons ``keep``."""
    index = torch.tensor(sorted(int(i) for i in keep), dtype=torch.long)
    if index.numel() == 0:
        raise ValueError("a layer must keep at least one FFN neuron")
    for proj in ffn_input_projs(family, layer):
        select_outputs(proj, index)
    select_inputs(ffn_output_proj(family, layer), index)
    if family == "llama" and isinstance(getattr(layer.mlp, "intermediate_size", None), int):
        layer.mlp.intermediate_size = int(index.numel())


def drop_layers(family: str, model: nn.Module, keep: list[int]) -> None:
    """Keep only the layers ``keep`` (in order) and renumber them, so the KV cache and ``layer_types`` line up."""
    config = model.config
    layers = layer_list(family, model)
    keep = sorted(int(i) for i in keep)
    if not keep or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"layer indices out of range: {keep} of {len(layers)}")
    scaled_by_index = family == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False)
    if scaled_by_index and keep != list(range(len(keep))):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=True scales attention by the layer index; "
                         "removing layers would change the kept layers' outputs")
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    _set_layer_list(family, model, new_layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == len(layers):
        config.layer_types = [layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)


# ---- the plan: the pruned shapes, stored in the config -------------------------------------------------------------
def current_plan(family: str, model: nn.Module) -> dict[str, Any]:
    """The per-layer shapes of ``model``: query heads, key/value heads and FFN width per layer."""
    layers = layer_list(family, model)
    shapes = [attention_shape(family, layer) for layer in layers]
    return {
        "version": PLAN_VERSION,
        "num_attention_heads": [s[0] for s in shapes],
        "num_key_value_heads": [s[1] for s in shapes],
        "intermediate_size": [ffn_width(family, layer) for layer in layers],
    }


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> None:
    """Resize a freshly built (usually meta-device) model to the shapes in ``plan``; the weights come after.

    A plan that cannot describe this model raises `ValueError` naming the config field (an edited config.json).
    """
    family = family_of(model.config)
    if family is None:
        raise ValueError(f"model type {model.config.model_type!r} cannot carry a pruning plan")
    field = f"config.json field '{PLAN_KEY}'"
    if not isinstance(plan, dict):
        raise ValueError(f"{field} must be a mapping of per-layer lists; got {type(plan).__name__} {plan!r:.80}")
    version = plan.get("version", PLAN_VERSION)
    if not isinstance(version, int) or version > PLAN_VERSION:
        raise ValueError(f"{field}: version {version!r} is not one this loader reads (up to {PLAN_VERSION})")
    layers = layer_list(family, model)
    n_layers = len(layers)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        values = plan.get(key)
        if not isinstance(values, list) or len(values) != n_layers or \
                not all(type(v) is int and v >= 1 for v in values):
            raise ValueError(f"{field}: '{key}' must list {n_layers} positive integers (one per layer); got "
                             f"{values!r:.80}")
    for i, layer in enumerate(layers):
        n_q, n_kv, _ = attention_shape(family, layer)
        want_q, want_kv = plan["num_attention_heads"][i], plan["num_key_value_heads"][i]
        fits = want_q <= n_q and want_kv <= n_kv and want_q % want_kv == 0 and want_q // want_kv <= n_q // n_kv
        if not fits or (family != "llama" and want_q != want_kv):
            raise ValueError(f"{field}: layer {i} lists {want_q} query and {want_kv} key/value heads, which this "
                             f"model ({n_q} query, {n_kv} key/value heads per layer) cannot have")
        if (want_q, want_kv) != (n_q, n_kv):
            _select_heads(family, layer, list(range(want_q)), list(range(want_kv)))
        width = plan["intermediate_size"][i]
        if width > ffn_width(family, layer):
            raise ValueError(f"{field}: layer {i} lists intermediate_size {width}, more than the model's "
                             f"{ffn_width(family, layer)}")
        if width != ffn_width(family, layer):
            prune_ffn(family, layer, list(range(width)))


def pruned_class(base: type) -> type:
    """A subclass of the Transformers class ``base`` that applies ``config.hfsqueeze_pruning`` after ``__init__``."""

    class Pruned(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            plan = getattr(config, PLAN_KEY, None)
            if plan:
                apply_plan(self, plan)

    Pruned.__name__ = Pruned.__qualname__ = f"Pruned{base.__name__}"
    Pruned.__doc__ = f"`{base.__name__}` with per-layer attention heads and FFN widths from `config.{PLAN_KEY}`."
    return Pruned
