"""Structural surgery on Transformers models: remove attention heads, FFN neurons and whole layers, in place.

This module imports nothing but torch and transformers, on purpose: hfsqueeze copies its source into pruned
artifacts as ``modeling_hfsqueeze_pruned.py`` so that ``AutoModel*.from_pretrained(path, trust_remote_code=True)``
rebuilds the pruned shapes without hfsqueeze installed. The pruning plan (head counts and FFN width per layer) lives
in ``config.hfsqueeze_pruning``; the class built by `pruned_class` applies it right after the stock ``__init__``,
before the weights are loaded.

What differs between architectures is data, not code: `FAMILIES` holds one row per family (Llama: llama, mistral,
qwen2, qwen3, gemma, gemma3_text; GPT-2 with its fused ``c_attn``; BERT: bert, roberta, xlm-roberta) naming the
modules and attributes that pruning changes, and `MODEL_TYPES` maps Transformers model types to those rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PLAN_KEY = "hfsqueeze_pruning"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Family:
    """Where a family of architectures keeps what pruning changes: attribute paths and attribute names.

    Paths are dotted attribute paths from the backbone (``layers``) or from one layer (the rest). A family has either
    separate ``query``/``key``/``value`` projections or one ``fused_qkv`` projection whose outputs are q | k | v.
    """

    layers: str
    attention: str
    head_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    head_dim: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    fused_qkv: str | None = None
    grouped: bool = False  # key/value heads are counted apart from the query heads (grouped-query attention)
    head_count_attrs: tuple[str, ...] = ()  # attention attributes holding the query-head count
    kv_count_attrs: tuple[str, ...] = ()  # ... the key/value-head count
    head_width_attrs: tuple[str, ...] = ()  # ... query heads x head_dim
    group_attr: str | None = None  # ... query heads per key/value head
    ffn_width_attr: str | None = None  # layer attribute holding the FFN width
    layer_index_scaling: str | None = None  # config flag that makes attention depend on the layer's index
    stock_reload: bool = False  # a uniformly pruned config stays valid for the stock class


FAMILIES = {
    "llama": Family(
        layers="layers", attention="self_attn", head_out="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"),
        ffn_out="mlp.down_proj", head_dim="head_dim", query="self_attn.q_proj", key="self_attn.k_proj",
        value="self_attn.v_proj", grouped=True, head_count_attrs=("num_heads", "num_attention_heads"),
        kv_count_attrs=("num_key_value_heads",), group_attr="num_key_value_groups",
        ffn_width_attr="mlp.intermediate_size", stock_reload=True,
    ),
    "gpt2": Family(
        layers="h", attention="attn", head_out="attn.c_proj", ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj",
        head_dim="head_dim", fused_qkv="attn.c_attn", head_count_attrs=("num_heads",),
        head_width_attrs=("split_size",), layer_index_scaling="scale_attn_by_inverse_layer_idx",
    ),
    "bert": Family(
        layers="encoder.layer", attention="attention.self", head_out="attention.output.dense",
        ffn_in=("intermediate.dense",), ffn_out="output.dense", head_dim="attention_head_size",
        query="attention.self.query", key="attention.self.key", value="attention.self.value",
        head_count_attrs=("num_attention_heads",), head_width_attrs=("all_head_size",),
    ),
}
# Transformers model type -> family.
MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "gemma3_text": "llama", "gpt2": "gpt2", "bert": "bert", "roberta": "bert", "xlm-roberta": "bert",
}
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPES)


def _get(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _set(obj: Any, path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(obj, parent) if parent else obj, name, value)


def _set_ints(module: Any, names: tuple[str, ...], value: int) -> None:
    """Set the integer attributes ``names`` that ``module`` has (variants keep different ones)."""
    for name in names:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, value)


def family_of(config: Any) -> str | None:
    """``"llama"``, ``"gpt2"`` or ``"bert"`` for a supported ``config.model_type``, else ``None``."""
    return MODEL_TYPES.get(getattr(config, "model_type", None))


def base_of(model: nn.Module) -> nn.Module:
    """The backbone (``LlamaModel``, ``GPT2Model``, ``BertModel``) of a model with or without a task head."""
    return getattr(model, "base_model", model)


def layer_list(family: str, model: nn.Module) -> nn.ModuleList:
    return _get(base_of(model), FAMILIES[family].layers)


def attention_of(family: str, layer: nn.Module) -> nn.Module:
    return _get(layer, FAMILIES[family].attention)


def head_output_proj(family: str, layer: nn.Module) -> nn.Module:
    """The projection whose input is the concatenated per-head attention outputs."""
    return _get(layer, FAMILIES[family].head_out)


def ffn_output_proj(family: str, layer: nn.Module) -> nn.Module:
    """The projection whose input is the FFN's intermediate activations (one column per neuron)."""
    return _get(layer, FAMILIES[family].ffn_out)


def ffn_input_projs(family: str, layer: nn.Module) -> list[nn.Module]:
    """The projections producing the FFN's intermediate activations (one output row per neuron)."""
    return [_get(layer, path) for path in FAMILIES[family].ffn_in]


def qkv_weights(family: str, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value weights of one layer, each as ``[out_features, in_features]``."""
    fam = FAMILIES[family]
    if fam.fused_qkv:
        return tuple(weight_out_in(_get(layer, fam.fused_qkv)).chunk(3, dim=0))
    return tuple(weight_out_in(_get(layer, path)) for path in (fam.query, fam.key, fam.value))


def head_dim_of(family: str, layer: nn.Module) -> int:
    return int(getattr(attention_of(family, layer), FAMILIES[family].head_dim))


def attention_shape(family: str, layer: nn.Module) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head_dim)`` of one layer, read from the weights (the truth)."""
    fam = FAMILIES[family]
    head_dim = head_dim_of(family, layer)
    n_q = in_features(head_output_proj(family, layer)) // head_dim
    n_kv = out_features(_get(layer, fam.key)) // head_dim if fam.grouped else n_q
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
    fam = FAMILIES[family]
    n_q, _, head_dim = attention_shape(family, layer)
    q_index, kv_index = _head_index(keep_q, head_dim), _head_index(keep_kv, head_dim)
    if fam.fused_qkv:  # outputs are q | k | v, each n_q * head_dim wide
        width = n_q * head_dim
        select_outputs(_get(layer, fam.fused_qkv), torch.cat([q_index, kv_index + width, kv_index + 2 * width]))
    else:
        select_outputs(_get(layer, fam.query), q_index)
        select_outputs(_get(layer, fam.key), kv_index)
        select_outputs(_get(layer, fam.value), kv_index)
    select_inputs(head_output_proj(family, layer), q_index)
    attn = attention_of(family, layer)
    # The forwards read the shapes from the weights; these attributes must follow for the reshapes and the cache.
    _set_ints(attn, fam.head_count_attrs, len(keep_q))
    _set_ints(attn, fam.kv_count_attrs, len(keep_kv))
    _set_ints(attn, fam.head_width_attrs, len(keep_q) * head_dim)
    if fam.group_attr:
        setattr(attn, fam.group_attr, len(keep_q) // len(keep_kv))


def prune_heads(family: str, layer: nn.Module, keep_q: list[int], keep_kv: list[int] | None = None) -> None:
    """Keep the query heads ``keep_q`` (and, for grouped-query attention, the key/value heads ``keep_kv``).

    Every kept key/value head must keep the same number of its query heads, and no kept query head may belong to a
    removed key/value head: that is what ``repeat_kv`` (eager) and ``enable_gqa`` (sdpa) assume.
    """
    n_q, n_kv, _ = attention_shape(family, layer)
    keep_q = sorted(int(h) for h in keep_q)
    keep_kv = sorted(int(h) for h in (keep_kv if keep_kv is not None else range(n_kv)))
    if not FAMILIES[family].grouped:  # multi-head attention: a key/value head per query head
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
    width_attr = FAMILIES[family].ffn_width_attr
    if width_attr:
        parent, _, name = width_attr.rpartition(".")
        _set_ints(_get(layer, parent) if parent else layer, (name,), int(index.numel()))


def drop_layers(family: str, model: nn.Module, keep: list[int]) -> None:
    """Keep only the layers ``keep`` (in order) and renumber them, so the KV cache and ``layer_types`` line up."""
    config = model.config
    layers = layer_list(family, model)
    keep = sorted(int(i) for i in keep)
    if not keep or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"layer indices out of range: {keep} of {len(layers)}")
    scaling = FAMILIES[family].layer_index_scaling
    if scaling and getattr(config, scaling, False) and keep != list(range(len(keep))):
        raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx=True scales attention by the layer index; "
                         "removing layers would change the kept layers' outputs")
    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    _set(base_of(model), FAMILIES[family].layers, new_layers)
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
        if not fits or (not FAMILIES[family].grouped and want_q != want_kv):
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
