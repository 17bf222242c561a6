"""Calibrated quantization that still reloads as stock bitsandbytes.

`apply_calibrated` runs the calibration text through the model one decoder layer at a time
(`layerwise.LayerwiseRunner`). For each layer, in order:

1. ``smooth: true``: the per-channel max-abs of the inputs of the Linears behind each norm (and of ``o_proj`` and
   ``down_proj``) is measured, and SmoothQuant scales are folded into the weights (`smooth.smooth_layer`);
2. ``calibration: gptq``: each quantized Linear's input Hessian is summed over the calibration blocks (its inputs
   on the held-out blocks are kept apart, as tokens), its weight is rounded onto bnb's grid with GPTQ's error
   feedback (`gptq`), and the codes are written into a real bnb module; a Linear whose GPTQ weight has a larger
   output error than bnb's own round-to-nearest on the held-out tokens keeps round-to-nearest (reported);
   ``calibration: rtn``: bnb's own
   quantization;
3. the quantized layer's outputs become the next layer's inputs (GPTQ's sequential order).

Linears outside the decoder layers (a BERT pooler) get bnb's own quantization. The model then carries the same
quantizer state as `apply.apply_quantize` leaves, so `save_pretrained` writes a standard bnb checkpoint.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...builtin.texts import GENERATED
from ...compat.bnb import import_bnb
from ...core.data import BUILTIN
from ...core.errors import RecipeError, UnsupportedModelError
from ...core.hf import eval_mode, find_layer_stack, strip_gguf
from ...core.memory import release_heap
from ...core.stage import ModelInfo
from ...core.utils import progress
from .apply import stock_bnb_module, check_quantizable, conversion_plan, mark_quantized
from .config import ALPHA_GRID, QuantizeConfig
from .gptq import add_gram, bnb_module, quantize_weights, stock_dequantized, token_error, weight_out_in
from .layerwise import LayerwiseRunner, input_hooks
from .smooth import SMOOTH_MODEL_TYPES, groups, smooth_layer, smoothed_inputs

logger = logging.getLogger("hfsqueeze")

# Tokens per calibration block. Every `HOLDOUT_EVERY`-th block is held out of the Hessians: the check that keeps
# round-to-nearest where GPTQ does worse runs on those.
SEQ_LEN = 512
HOLDOUT_EVERY = 8


def _source_label(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return Path(source).name if Path(source).is_file() else str(source)
    return getattr(getattr(source, "info", None), "dataset_name", None) or type(source).__name__


def split_blocks(n: int) -> tuple[list[int], list[int]]:
    """``(calibration, held-out)`` block indices: every `HOLDOUT_EVERY`-th block is held out (none when n < 2)."""
    held = [i for i in range(n) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1] or ([n - 1] if n >= 2 else [])
    return [i for i in range(n) if i not in held], held


def _per_input(runner: LayerwiseRunner, index: int, layer: nn.Module, modules: dict[str, nn.Module],
               which: list[int], accumulate) -> tuple[dict[str, Any], dict[str, str]]:
    """``accumulate(total or None, x)`` over each module's inputs ``x`` ``[tokens, in]`` on the blocks ``which``, and
    for each module the module whose input it shares (q/k/v read one tensor, gate/up another): one total per distinct
    input, keyed by its first reader."""
    totals: dict[str, Any] = {}
    owner: dict[str, str] = {}
    last: dict[str, Any] = {}

    def add(name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), x.stride())
        if last.get("key") == key:  # the very tensor the previous module read (held in `last`, so never reused)
            owner[name] = last["name"]
            return
        last.update(key=key, name=name, x=x)
        owner[name] = name
        totals[name] = accumulate(totals.get(name), x)

    handles = input_hooks(modules, add)
    try:
        runner.run(index, layer, which)
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    return totals, owner


def _hessians(runner: LayerwiseRunner, index: int, layer: nn.Module, modules: dict[str, nn.Module],
              which: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``sum x x^T`` of each distinct module input over the blocks ``which`` (see `_per_input`)."""
    return _per_input(runner, index, layer, modules, which, add_gram)


def _held_inputs(runner: LayerwiseRunner, index: int, layer: nn.Module, modules: dict[str, nn.Module],
                 which: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each distinct module input on the held-out blocks ``which``, the tokens themselves ``[tokens, in]``: the
    held-out check needs only ``|(W - Q) X^T|``, and a few hundred held-out tokens are far smaller than an
    ``in x in`` Hessian (at an 8B model's ``down_proj``, 512 bf16 tokens are 14 MB, its Hessian 0.8 GB)."""
    parts, owner = _per_input(runner, index, layer, modules, which, lambda total, x: [*(total or []), x.clone()])
    return {name: torch.cat(xs) for name, xs in parts.items()}, owner


def _channel_max(runner: LayerwiseRunner, index: int, layer: nn.Module, names: list[str],
                 which: list[int]) -> dict[str, torch.Tensor]:
    maxima: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        m = x.detach().abs().amax(dim=0).float()
        maxima[name] = torch.maximum(maxima[name], m) if name in maxima else m

    handles = input_hooks({n: layer.get_submodule(n) for n in names}, add)
    try:
        runner.run(index, layer, which)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def _quantize_layer(runner: LayerwiseRunner, index: int, layer: nn.Module, names: list[str], config: QuantizeConfig,
                    qc: Any, split: tuple[list[int], list[int]], kept_rtn: list[str], prefix: str) -> None:
    """Quantize the Linears ``names`` of one layer in place (GPTQ, or bnb's own round-to-nearest)."""
    bnb = import_bnb()
    modules = {name: layer.get_submodule(name) for name in names}
    if config.calibration != "gptq":
        for name, module in modules.items():
            layer.set_submodule(name, stock_bnb_module(bnb, module, qc, config))
        return
    calib, held = split
    hessians, owner = _hessians(runner, index, layer, modules, calib)
    held_out, held_owner = _held_inputs(runner, index, layer, modules, held) if held else ({}, {})
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(owner.get(name, name), []).append(name)
    for first, group in groups.items():
        weights = [weight_out_in(modules[name]) for name in group]
        # one sweep for the modules reading one input (GPTQ's rows are independent given the shared Hessian)
        for name, weight, q in zip(group, weights, quantize_weights(weights, hessians.pop(first), config)):
            module = modules[name]
            if name in held_owner:
                x = held_out[held_owner[name]]
                if token_error(weight, q.dequantized, x) > token_error(weight, stock_dequantized(weight, config), x):
                    kept_rtn.append(prefix + name)
                    layer.set_submodule(name, stock_bnb_module(bnb, module, qc, config))
                    continue
            layer.set_submodule(name, bnb_module(module, q, qc, config))


def _layer_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return sum(float(((o.float() - r.float()) ** 2).sum()) for o, r in zip(outputs, reference))


def _keep_rtn_layer(runner: LayerwiseRunner, index: int, original: nn.Module, names: list[str],
                    config: QuantizeConfig, qc: Any, held: list[int]) -> bool:
    """The layer-level held-out check, with the real bnb kernels (int8's activation quantization included): when the
    calibrated layer (folded scales, GPTQ) is further from the unquantized layer than plain round-to-nearest on the
    held-out blocks, put the round-to-nearest layer in its place (built from ``original``, a copy taken before any
    change) and return True. The next layer's inputs then come from it."""
    bnb = import_bnb()
    reference = runner.run(index, original, held, collect=True)
    calibrated = runner.run(index, runner.stack[index], held, collect=True)
    for name in names:
        original.set_submodule(name, stock_bnb_module(bnb, original.get_submodule(name), qc, config))
    plain = runner.run(index, original, held, collect=True)
    if _layer_error(calibrated, reference) <= _layer_error(plain, reference):
        return False
    runner.stack[index] = original
    return True


# `alpha: auto` compares the candidates on at most this many calibration blocks (their tokens cached already).
ALPHA_SEARCH_BLOCKS = 4


def _search_alpha(runner: LayerwiseRunner, index: int, layer: nn.Module, model_type: str,
                  maxima: dict[str, torch.Tensor], names: list[str], config: QuantizeConfig, qc: Any,
                  calib: list[int]) -> dict[str, float | None]:
    """``alpha: auto``: a migration strength per fold group (`ALPHA_GRID`, or ``None``: fold nothing), chosen group
    by group (greedy, the earlier groups' choices kept) so that the folded and round-to-nearest quantized copy of
    ``layer`` gives outputs closest to the unquantized layer's on a few calibration blocks, through the real bnb
    modules (so LLM.int8's per-token activation quantization and its outlier columns count, which SmoothQuant's
    closed-form scale does not see). AWQ searches its scales the same way."""
    bnb = import_bnb()
    which = calib[:ALPHA_SEARCH_BLOCKS]
    reference = runner.run(index, layer, which, collect=True)

    def error(alphas: dict[str, float | None]) -> float:
        candidate = copy.deepcopy(layer)
        smooth_layer(candidate, model_type, maxima, alphas)
        for name in names:
            candidate.set_submodule(name, stock_bnb_module(bnb, candidate.get_submodule(name), qc, config))
        return _layer_error(runner.run(index, candidate, which, collect=True), reference)

    chosen: dict[str, float | None] = {}
    best = error(chosen)
    for group in groups(model_type):
        if group.targets[0] not in maxima:
            continue
        for alpha in ALPHA_GRID:
            trial = error({**chosen, group.source: alpha})
            if trial < best:
                best, chosen[group.source] = trial, alpha
    return {group.source: chosen.get(group.source) for group in groups(model_type)}


def _default_text(ctx: Any) -> bool:
    return getattr(ctx, "calibration", None) in (None, BUILTIN)


def _calibration_blocks(ctx: Any, tokens: int, seq_len: int) -> torch.Tensor:
    """The calibration blocks: from the recipe's calibration source when one was given; by default, alternating
    blocks of ``builtin:generated`` (varied English) and the built-in pydoc text, both their train splits. Pydoc
    alone is one narrow domain: GPTQ fitted to it met the held-out target on pydoc but not on other prose."""
    if not _default_text(ctx):
        return ctx.calibration_blocks(max_tokens=tokens, seq_len=seq_len)
    half = max(seq_len, tokens // 2)
    parts = [ctx.calibration_blocks(max_tokens=half, seq_len=seq_len, source=src) for src in (GENERATED, BUILTIN)]
    rows = [part[i] for i in range(max(p.shape[0] for p in parts)) for part in parts if i < part.shape[0]]
    return torch.stack(rows)


def _blocks(config: QuantizeConfig, ctx: Any, widest: int) -> torch.Tensor:
    if ctx is None or getattr(ctx, "tokenizer", None) is None:
        raise RecipeError("quantize: calibration/smooth needs calibration text and a tokenizer; pass "
                          "compress(..., tokenizer=tok)")
    blocks = _calibration_blocks(ctx, config.tokens, min(SEQ_LEN, config.tokens))
    calib, _ = split_blocks(blocks.shape[0])
    tokens = len(calib) * blocks.shape[1]
    if config.calibration == "gptq" and tokens < widest:
        raise RecipeError(f"quantize: calibration: gptq got {tokens} calibration tokens, fewer than the widest "
                          f"quantized input ({widest} features); GPTQ hurts unseen text then: raise tokens (at least "
                          f"{widest * HOLDOUT_EVERY // (HOLDOUT_EVERY - 1) + SEQ_LEN}) or give a longer text")
    return blocks


def calibration_phrase(calibration: dict[str, Any]) -> str:
    """How the card names what was calibrated, from the report's ``calibration`` details."""
    parts = []
    if calibration.get("method") == "gptq":
        parts.append(f"GPTQ-style rounding onto bitsandbytes' grid (damp {calibration.get('damp')}"
                     f"{', absmax search' if calibration.get('absmax_search') else ''})")
    if calibration.get("smooth"):
        alpha = calibration.get("alpha")
        if alpha == "auto":
            picks = [a for layer in calibration.get("alphas") or [] for a in layer.values()]
            alpha = (f"searched per layer and group, folded in {sum(a is not None for a in picks)} of {len(picks)} "
                     "groups")
        parts.append(f"SmoothQuant scales folded into the weights (alpha {alpha})")
    text = (f"calibrated with {' and '.join(parts) or 'round-to-nearest'} on {calibration.get('text')}, "
            f"{calibration.get('tokens')} tokens ({calibration.get('held_out_tokens')} more held out)")
    kept, layers = calibration.get("kept_rtn") or [], calibration.get("kept_rtn_layers") or []
    text += f"; {len(kept)} modules kept round-to-nearest (better on the held-out tokens)" if kept else ""
    return text + (f"; layers {layers} kept plain round-to-nearest (better on the held-out tokens)" if layers else "")


def _fallback_warnings(rtn_layers: list[int], n_layers: int, kept_rtn: list[str], n_modules: int) -> list[str]:
    """The report's warnings for layers and modules the held-out checks left at round-to-nearest."""
    out = []
    if rtn_layers:
        out.append(f"calibration: {len(rtn_layers)} of {n_layers} layers kept plain round-to-nearest (the calibrated "
                   f"layer had the larger output error on the held-out calibration tokens): layers {rtn_layers}")
    if kept_rtn:
        out.append(f"calibration: {len(kept_rtn)} of {n_modules} modules kept round-to-nearest (GPTQ had the larger "
                   f"output error on the held-out calibration tokens): {', '.join(kept_rtn[:5])}"
                   f"{', ...' if len(kept_rtn) > 5 else ''}")
    return out


def apply_calibrated(model: nn.Module, config: QuantizeConfig, ctx: Any = None) -> dict[str, Any]:
    """Quantize ``model`` in place to bnb 8/4 bits with calibration (GPTQ and/or folded scales); return the details
    for the report. The result is a stock bnb model (same state as `apply.apply_quantize` leaves)."""
    strip_gguf(model)
    check_quantizable(ModelInfo.of(model))
    bnb = import_bnb()
    qc, hf_quantizer, skip, targets = conversion_plan(model, config)
    if not targets:
        raise RecipeError("the quantize stage found no nn.Linear/Conv1D module to quantize (all skipped by "
                          f"skip_modules={config.skip_modules})")
    names = [name for name, _ in targets]
    widest = max(weight_out_in(module).shape[1] for _, module in targets)
    quantized_params = sum(module.weight.numel() for _, module in targets)
    del targets
    start, peak_inputs = time.perf_counter(), 0
    blocks = _blocks(config, ctx, widest)
    split = split_blocks(blocks.shape[0])
    stack_name, stack = find_layer_stack(model)
    model_type = model.config.model_type
    if config.smooth and model_type not in SMOOTH_MODEL_TYPES:
        raise UnsupportedModelError(f"quantize: smooth: true does not support model type {model_type!r}; supported: "
                                    f"{', '.join(SMOOTH_MODEL_TYPES)} (set smooth: false)")
    kept_rtn: list[str] = []
    rtn_layers: list[int] = []
    smoothed = 0
    alphas: list[float | dict[str, float | None]] = []
    with eval_mode(model):
        runner = LayerwiseRunner(model, blocks)
        for index, layer in progress(runner.layers(), desc="quantize: calibrating layers", total=len(stack)):
            prefix = f"{stack_name}.{index}."
            peak_inputs = max(peak_inputs, sum(x.numel() * x.element_size() for x in runner.inputs))
            mine = [n[len(prefix):] for n in names if n.startswith(prefix)]
            original = copy.deepcopy(layer) if split[1] else None  # one layer: the held-out check's reference
            if config.smooth:
                maxima = _channel_max(runner, index, layer, smoothed_inputs(model_type), split[0])
                alpha = config.alpha if config.alpha != "auto" else \
                    _search_alpha(runner, index, layer, model_type, maxima, mine, config, qc, split[0])
                alphas.append(alpha)
                smoothed += smooth_layer(layer, model_type, maxima, alpha)
            _quantize_layer(runner, index, layer, mine, config, qc, split, kept_rtn, prefix)
            if original is not None and _keep_rtn_layer(runner, index, original, mine, config, qc, split[1]):
                rtn_layers.append(index)
            del original
            release_heap()  # the layer's candidates, Hessians and copies: back to the system before the next layer
    rest = [n for n in names if not n.startswith(stack_name + ".")]
    for name in rest:  # outside the decoder layers: bnb's own quantization
        model.set_submodule(name, stock_bnb_module(bnb, model.get_submodule(name), qc, config))
    details = mark_quantized(model, config, qc, hf_quantizer, skip, names, quantized_params)
    calib, held = split
    details["calibration"] = {
        "method": config.calibration or "rtn",
        **({"damp": config.damp, "absmax_search": config.absmax_search} if config.calibration == "gptq" else {}),
        "smooth": bool(config.smooth),
        **({"alpha": config.alpha, "smoothed_groups": smoothed} if config.smooth else {}),
        **({"alphas": alphas} if config.alpha == "auto" else {}),
        "text": (f"{GENERATED} + {BUILTIN} (train splits)" if _default_text(ctx)
                 else _source_label(getattr(ctx, "calibration", None))),
        "tokens": len(calib) * blocks.shape[1],
        "held_out_tokens": len(held) * blocks.shape[1],
        "kept_rtn": kept_rtn,
        "kept_rtn_layers": rtn_layers,
        "outside_layers_rtn": rest,
        "seconds": round(time.perf_counter() - start, 2),
        "cached_activation_bytes": peak_inputs,
    }
    if fallbacks := _fallback_warnings(rtn_layers, len(stack), kept_rtn, len(names)):
        details.setdefault("warnings", []).extend(fallbacks)
    logger.info("calibrated %d modules to %s in %.1f s", len(names), config.label, details["calibration"]["seconds"])
    return details


__all__ = ["apply_calibrated", "calibration_phrase", "split_blocks"]
