"""Per-module sensitivity: the KL cost of quantizing one module alone, in each candidate format.

For every module the quantize stage would convert, the module is swapped in place for the real bitsandbytes module
(the one the stage builds), the model runs on a small calibration batch in eval mode (where bnb int8 is W8A8 with its
outlier threshold), and the mean KL(original || model) per token is recorded; then the original module goes back.
The layers before the swapped module return their recorded outputs instead of running (they cannot change), which
halves the cost on average. Scores are cached in ``sensitivity.json`` keyed by the model's fingerprint, the format
and the calibration tokens' hash, so a resumed study or a new budget never scores twice.

Format variants share one score: int8 is scored at the stock threshold 6.0 and 4-bit formats without double
quantization in float32; the scores only rank modules for the solver, every trial is then measured for real.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .space import quantize_targets, quantized_module

logger = logging.getLogger("hfsqueeze")

SENSITIVITY_SCHEMA = "hfsqueeze.sensitivity"


def base_format(fmt: dict[str, Any]) -> dict[str, Any]:
    """The format whose scores stand for ``fmt`` (see the module docstring)."""
    if fmt["bits"] == 8:
        return {"bits": 8, "threshold": 6.0}
    return {"bits": 4, "quant_type": fmt.get("quant_type", "nf4"), "double_quant": False, "compute_dtype": "float32"}


def format_key(fmt: dict[str, Any]) -> str:
    """``int8`` or the 4-bit quant type (``nf4``, ``fp4``): the key of ``base_format(fmt)`` in the cache."""
    base = base_format(fmt)
    return "int8" if base["bits"] == 8 else base["quant_type"]


def fingerprint(model: nn.Module) -> str:
    """A hash of the model's type, parameter names, shapes and values (sums), cheap enough to take every run.

    Only what survives a save and reload: the config's path and version fields differ between a model in memory and
    the same model loaded from disk (the worker processes load it).
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(f"{type(model).__name__}:{getattr(config, 'model_type', None)}".encode())
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if not param.is_floating_point():
                continue
            flat = param.detach().float().reshape(-1)
            sums = f"{float(flat.sum()):.6e}:{float(flat.abs().sum()):.6e}"
            digest.update(f"{name}:{tuple(param.shape)}:{sums}".encode())
    return digest.hexdigest()[:16]


def tokens_hash(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The repeated blocks (``model.layers``, ``transformer.h``...): the `ModuleList` holding the most parameters."""
    best, size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = (name, module), n
    return best


def layer_index(name: str, prefix: str) -> int:
    """Index of the block holding module ``name`` (0 when it lies outside the blocks: nothing can be replayed)."""
    head = prefix + "."
    if not name.startswith(head):
        return 0
    return int(name[len(head):].split(".", 1)[0])


def _forward(model: nn.Module, block: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=block.unsqueeze(0), use_cache=False)
    return out.logits[0].float().log_softmax(-1)


@contextlib.contextmanager
def _replaying(layers: nn.ModuleList, outputs: list[Any], upto: int) -> Iterator[None]:
    """Blocks before ``upto`` return their recorded outputs instead of running."""
    for j in range(upto):
        layers[j].forward = _returning(outputs[j])
    try:
        yield
    finally:
        for j in range(upto):
            del layers[j].forward


def _returning(value: Any) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return value

    return forward


def _record(model: nn.Module, layers: nn.ModuleList, blocks: torch.Tensor):
    recorded: list[list[Any]] = []
    for block in blocks:
        outputs: list[Any] = [None] * len(layers)
        hooks = [layer.register_forward_hook(lambda m, a, o, j=j, outputs=outputs: outputs.__setitem__(j, o))
                 for j, layer in enumerate(layers)]
        try:
            reference = _forward(model, block)
        finally:
            for hook in hooks:
                hook.remove()
        recorded.append((outputs, reference))
    return recorded


def _kl(model: nn.Module, blocks: torch.Tensor, recorded, layers: nn.ModuleList | None, upto: int) -> float:
    total = 0.0
    for block, (outputs, reference) in zip(blocks, recorded):
        context = _replaying(layers, outputs, upto) if layers is not None else contextlib.nullcontext()
        with context:
            lp = _forward(model, block)
        total += float(F.kl_div(lp, reference, log_target=True, reduction="none").sum(-1).mean())
    return total / len(blocks)


@torch.no_grad()
def score_modules(model: nn.Module, blocks: torch.Tensor, fmt: dict[str, Any],
                  progress: Callable[[int, int], None] | None = None, *, deadline: float | None = None
                  ) -> dict[str, float]:
    """KL per token on ``blocks`` when each quantizable module alone is in format ``fmt``; the model is unchanged.
    Once ``deadline`` (a `time.time` value) has passed no further module is scored: the ones scored are returned."""
    was_training = model.training
    model.eval()
    found = find_layers(model)
    prefix, layers = found if found is not None else ("", None)
    targets = quantize_targets(model)
    recorded = _record(model, layers, blocks) if layers is not None else \
        [([], _forward(model, block)) for block in blocks]
    scores: dict[str, float] = {}
    try:
        for i, (name, module) in enumerate(targets):
            if deadline is not None and time.time() >= deadline:
                break
            new = quantized_module(module, base_format(fmt))
            new.eval()
            model.set_submodule(name, new)
            try:
                scores[name] = max(0.0, _kl(model, blocks, recorded, layers, layer_index(name, prefix)))
            finally:
                model.set_submodule(name, module)
            if progress is not None:
                progress(i + 1, len(targets))
    finally:
        model.train(was_training)
    return scores


class SensitivityCache:
    """Scores on disk: ``{"entries": {"<fingerprint>:<tokens hash>:<format key>": {module: kl}}}``, merged on write
    under a file lock, so several runs (and the shared cache under ``$HFSQUEEZE_CACHE``) can hold them."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]

    def get(self, key: str) -> dict[str, Any] | None:
        for path in self.paths:
            entry = _read(path).get(key)
            if entry is not None:
                return entry
        return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(f".{path.stem}.lock"), "w") as lock:  # hidden: not part of the artifact
                fcntl.flock(lock, fcntl.LOCK_EX)
                entries = _read(path)
                entries[key] = entry
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"schema": SENSITIVITY_SCHEMA, "version": 1, "entries": entries},
                                          indent=1, sort_keys=True) + "\n")
                os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if isinstance(data, dict) and data.get("schema") == SENSITIVITY_SCHEMA else {}


def sensitivities(model: nn.Module, blocks: torch.Tensor, formats: list[dict[str, Any]], cache: SensitivityCache,
                  *, model_fingerprint: str | None = None,
                  report: Callable[[dict[str, Any]], None] | None = None,
                  deadline: float | None = None) -> dict[str, dict[str, Any]]:
    """Scores for each format's base format (``format_key`` -> entry), from the cache or measured now and cached.

    An entry holds ``scores`` (module -> KL), ``tokens``, ``seconds`` and whether it came ``cached``. Once
    ``deadline`` (a `time.time` value: the tune run's time budget) has passed, scoring stops: an entry cut short
    lists its ``unscored`` modules, which get the mean of the scores measured (the solver then neither prefers nor
    avoids them), and is not cached.
    """
    fp = model_fingerprint or fingerprint(model)
    th = tokens_hash(blocks)
    out: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        fkey = format_key(fmt)
        if fkey in out:
            continue
        key = f"{fp}:{th}:{fkey}"
        entry = cache.get(key)
        if entry is not None:
            logger.info("sensitivity %s: %d modules from the cache", fkey, len(entry["scores"]))
            out[fkey] = {**entry, "cached": True}
            cache.put(key, entry)  # copy into every cache file (the output's own sensitivity.json)
            continue
        start = time.perf_counter()

        def step(done: int, total: int, fkey=fkey, start=start) -> None:
            if done == total or done % max(1, total // 10) == 0:
                elapsed = time.perf_counter() - start
                info = {"phase": "sensitivity", "format": fkey, "done": done, "total": total, "elapsed": elapsed,
                        "eta": elapsed / done * (total - done)}
                logger.info("sensitivity %s: %d/%d modules, %.0fs, ETA %.0fs", fkey, done, total, elapsed,
                            info["eta"])
                if report is not None:
                    report(info)

        scores = score_modules(model, blocks, fmt, step, deadline=deadline)
        entry = {"format": base_format(fmt), "scores": scores, "tokens": int(blocks.numel()),
                 "seconds": round(time.perf_counter() - start, 2)}
        names = [name for name, _ in quantize_targets(model)]
        unscored = [name for name in names if name not in scores]
        if not unscored:
            cache.put(key, entry)
        else:
            logger.warning("tune: the time budget ran out during the sensitivity pass: %s scored %d of %d modules; "
                           "the other %d count as the mean score (not cached)", fkey, len(scores), len(names),
                           len(unscored))
            mean = sum(scores.values()) / len(scores) if scores else 0.0
            entry = {**entry, "scores": {**scores, **dict.fromkeys(unscored, mean)}, "unscored": unscored}
        out[fkey] = {**entry, "cached": False}
    return out


__all__ = ["SensitivityCache", "base_format", "fingerprint", "format_key", "score_modules", "sensitivities"]
