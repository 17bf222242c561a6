"""Per-module choices under a budget: which modules stay unquantized, solved from the sensitivities.

One reloadable bitsandbytes artifact holds one format plus unquantized modules (``skip_modules``), so the per-module
choice is a 0/1 knapsack: each module kept in the rest dtype costs ``delta`` bytes over its quantized form and saves
its sensitivity (KL). The greedy solution by KL saved per byte is what `solve` returns; ``keep`` scales the capacity
it fills, so the search can trade size for quality (or for speed) around the solved point.

The capacity is the size budget's slack over the uniform format; without a size limit but with a quality target it is
twice the bytes that bring the additive KL estimate under the target (so ``keep=0.5`` is the estimate's own answer);
with neither, all quantizable bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .space import default_skip_modules, quantize_targets, quantized_module, rest_torch_dtype

# Safetensors stores a JSON header: per tensor its name, dtype, shape and offsets (this many bytes plus the name).
_HEADER_BYTES_PER_TENSOR = 72
# Aim a little under a size limit (the estimate is within 0.01% on SmolLM2; the trial measures the real file).
SIZE_MARGIN = 0.999


@dataclasses.dataclass
class Solution:
    """The solver's answer for one format: modules kept unquantized and what the estimates say about it."""

    kept: list[str]
    skip_modules: list[str]
    predicted_bytes: int
    predicted_kl: float
    capacity_bytes: int
    used_bytes: int

    def to_dict(self) -> dict[str, Any]:
        # The module lists stay out (``kept_modules`` counts them): the report holds sizes and predictions.
        out = {k: v for k, v in dataclasses.asdict(self).items() if not isinstance(v, list)}
        out["kept_modules"] = len(self.kept)
        return out


class SizeModel:
    """Exact byte counts of quantized modules (one real bnb module built per shape and format), cached."""

    def __init__(self):
        self._cache: dict[tuple, tuple[int, int]] = {}

    def quantized_bytes(self, module: nn.Module, fmt: dict[str, Any], rest: str, name: str = "") -> int:
        """Saved bytes of ``module`` (called ``name`` in the model) quantized to ``fmt``, header entries included."""
        weight = module.weight
        key = (tuple(weight.shape), module.bias is not None, tuple(sorted(fmt.items())), rest)
        if key not in self._cache:
            probe = module
            if module.weight.dtype != torch.float32:  # bnb builds from any float dtype; size does not depend on it
                probe = _float_copy(module)
            new = quantized_module(probe, fmt)
            total, count = 0, 0
            for key_name, tensor in new.state_dict().items():
                size = _itemsize(rest) if key_name == "bias" else tensor.element_size()
                total += tensor.numel() * size + _HEADER_BYTES_PER_TENSOR + len(key_name)
                count += 1
            self._cache[key] = (total, count)
        total, count = self._cache[key]
        return total + count * (len(name) + 1)


def _float_copy(module: nn.Module) -> nn.Module:
    clone = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    clone.weight.data = module.weight.data.float()
    if module.bias is not None:
        clone.bias.data = module.bias.data.float()
    return clone


def _itemsize(rest: str) -> int:
    return torch.empty(0, dtype=rest_torch_dtype(rest)).element_size()


def _dense_bytes(module: nn.Module, rest: str, name: str = "") -> int:
    params = list(module.named_parameters(recurse=False))
    return sum(p.numel() * _itemsize(rest) + _HEADER_BYTES_PER_TENSOR + len(name) + 1 + len(n) for n, p in params)


def _other_bytes(model: nn.Module, target_names: set[str], rest: str) -> int:
    """Bytes of every saved tensor outside the quantized modules (tied tensors once), in the rest dtype."""
    total, seen = 0, set()
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if owner in target_names:
            continue
        ptr = (tensor.data_ptr(), tensor.numel())
        if ptr in seen and tensor.numel() > 0:
            continue
        seen.add(ptr)
        size = _itemsize(rest) if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size + _HEADER_BYTES_PER_TENSOR + len(name)
    return total


def estimate_bytes(model: nn.Module, fmt: dict[str, Any] | None, rest: str, kept: set[str] = frozenset(),
                   sizes: SizeModel | None = None) -> int:
    """Disk bytes of ``model`` saved after quantizing to ``fmt`` with ``kept`` modules in ``rest`` (``fmt=None``: no
    8/4-bit stage, everything in ``rest``)."""
    sizes = sizes or SizeModel()
    targets = quantize_targets(model) if fmt is not None else []
    names = {n for n, _ in targets}
    total = _other_bytes(model, names, rest)
    for name, module in targets:
        total += _dense_bytes(module, rest, name) if name in kept else sizes.quantized_bytes(module, fmt, rest, name)
    return total + 1024  # the header's own JSON framing and metadata


def solve(model: nn.Module, fmt: dict[str, Any], rest: str, scores: dict[str, float], *, keep: float = 1.0,
          size_limit: float | None = None, kl_target: float | None = None,
          name_map: Callable[[str], str] | None = None, sizes: SizeModel | None = None) -> Solution:
    """Choose the modules kept unquantized (greedy by KL saved per byte) within ``keep`` x the capacity.

    Args:
        model: the model about to be quantized (after any pruning).
        fmt: the 8/4-bit quantize stage's keys (``bits``, ``threshold``...).
        rest: ``fp32``, ``bf16`` or ``fp16``: the dtype kept modules (and everything unquantized) end up in.
        scores: module name -> KL when that module alone is quantized (`hfsqueeze.tune.sensitivity`).
        keep: fraction of the capacity to use, in [0, 1].
        size_limit: disk bytes the result must stay under.
        kl_target: a KL the kept modules should bring the additive estimate under (used without a size limit).
        name_map: maps a module name of ``model`` to its name in ``scores`` (after layers were dropped).
    """
    sizes = sizes or SizeModel()
    name_map = name_map or (lambda name: name)
    targets = quantize_targets(model)
    items = []
    for name, module in targets:
        delta = _dense_bytes(module, rest, name) - sizes.quantized_bytes(module, fmt, rest, name)
        items.append((name, float(scores.get(name_map(name), 0.0)), max(delta, 1)))
    base = estimate_bytes(model, fmt, rest, set(), sizes)
    total_kl = sum(s for _, s, _ in items)
    order = sorted(items, key=lambda item: item[1] / item[2], reverse=True)
    if size_limit is not None:
        capacity = max(0, int(size_limit * SIZE_MARGIN) - base)
    elif kl_target is not None:
        capacity = 2 * _bytes_to_reach(order, total_kl, kl_target)
    else:
        capacity = sum(d for _, _, d in items)
    allowance = int(keep * capacity)
    kept, used, saved = [], 0, 0.0
    for name, score, delta in order:
        # At least one module stays quantized: keeping all of them is the 16-bit (or fp32) point, not this format.
        if used + delta <= allowance and len(kept) < len(items) - 1:
            kept.append(name)
            used += delta
            saved += score
    kept_set = set(kept)
    ordered = [name for name, _ in targets if name in kept_set]
    return Solution(
        kept=ordered, skip_modules=_skip_list(ordered), predicted_bytes=base + used,
        predicted_kl=max(0.0, total_kl - saved), capacity_bytes=int(capacity), used_bytes=int(used),
    )


def _bytes_to_reach(order: list[tuple[str, float, int]], total_kl: float, target: float) -> int:
    remaining, used = total_kl, 0
    for _, score, delta in order:
        if remaining <= target:
            break
        remaining -= score
        used += delta
    return used if math.isfinite(used) else 0


def _skip_list(kept: list[str]) -> list[str]:
    """The quantize stage's ``skip_modules``: the default skips (``lm_head``) plus each kept module's full name.

    A list replaces the stage's default, so the defaults are written out; full names match only themselves
    (``model.layers.1.mlp.down_proj`` does not match ``model.layers.11.mlp.down_proj``).
    """
    return default_skip_modules() + [name for name in kept if name not in default_skip_modules()]


__all__ = ["SizeModel", "Solution", "estimate_bytes", "solve"]
