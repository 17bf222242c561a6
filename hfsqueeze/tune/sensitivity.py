"""Per-module sensitivity: the KL cost of quantizing one module alone, in each candidate format.

For every module the quantize stage would convert, the module is swapped in place for the real bitsandbytes module
(the one the stage builds), the model runs on a small calibration batch in eval mode (where bnb int8 is W8A8 with its
outlier threshold), and the mean KL(original || model) per token is recorded; then the original module goes back.
The layers before the swapped module return their recorded outputs instead of running (they cannot change), which
halves the cost on average. Scores are cached in ``sensitivity.json`` keyed by the model's fingerprint (its config
and a hash of every weight's bytes), the format and the calibration tokens' hash, so a resumed study or a new budget
never scores twice. They are written module by module as they are scored, so an interrupted pass continues where it
stopped. Every entry read back is checked (version, module names, finite scores >= 0, token count) and a bad one is
dropped with a warning and scored again.

Format variants share one score: int8 is scored at the stock threshold 6.0 and 4-bit formats without double
quantization in float32; the scores only rank modules for the solver, every trial is then measured for real.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.quality import LMScore, logprobs, score_lm
from ..core.utils import atomic_write
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


# Config keys that differ between the same model in memory and saved then loaded again (or between versions).
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype"})


def fingerprint(model: nn.Module) -> str:
    """A hash of what the model computes: its class, its config (``to_diff_dict()`` without version, path and dtype
    keys, as sorted JSON) and the bytes of every parameter and persistent buffer (name, dtype, shape, data).

    A config or a single weight changed by one ulp gives another fingerprint; the same model in memory and loaded
    from disk (the worker processes load it) gives the same one. Streamed tensor by tensor, without copies of
    contiguous CPU tensors.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    diff = config.to_diff_dict() if hasattr(config, "to_diff_dict") else {}
    stable = {k: v for k, v in diff.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    digest.update(f"{type(model).__name__}\n".encode())
    digest.update(json.dumps(stable, sort_keys=True, default=str).encode() + b"\n")
    seen: dict[tuple[int, int, torch.dtype, tuple[int, ...]], str] = {}
    with torch.no_grad():
        state = model.state_dict(keep_vars=False)
        for name in sorted(state):
            tensor = state[name].detach()
            head = f"{name}:{str(tensor.dtype).replace('torch.', '')}:{tuple(tensor.shape)}"
            # Tied weights (lm_head = embeddings) are hashed once; the second name records the tie.
            ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype, tuple(tensor.shape)) \
                if tensor.device.type != "meta" else None
            if ident is not None and ident in seen:
                digest.update(f"{head}=tied:{seen[ident]}\n".encode())
                continue
            if ident is not None:
                seen[ident] = name
            digest.update(head.encode() + b"\n")
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(memoryview(data.numpy()))
    return digest.hexdigest()[:32]


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
            reference = logprobs(model, block)
        finally:
            for hook in hooks:
                hook.remove()
        recorded.append((outputs, reference))
    return recorded


def _kl(model: nn.Module, blocks: torch.Tensor, recorded, layers: nn.ModuleList | None, upto: int) -> float:
    """Mean KL(original || model) per token; each block's forward replays the blocks before ``upto``."""
    total = LMScore()
    for block, (outputs, reference) in zip(blocks, recorded):
        context = _replaying(layers, outputs, upto) if layers is not None else contextlib.nullcontext()
        with context:
            total.add(score_lm(model, block.unsqueeze(0), [reference]))
    return total.kl_per_token


@torch.no_grad()
def score_modules(model: nn.Module, blocks: torch.Tensor, fmt: dict[str, Any],
                  progress: Callable[[int, int], None] | None = None, *, done: dict[str, float] | None = None,
                  save: Callable[[dict[str, float]], None] | None = None, deadline: float | None = None
                  ) -> dict[str, float]:
    """KL per token on ``blocks`` when each quantizable module alone is in format ``fmt``; the model is unchanged.

    Modules in ``done`` (scores from an interrupted pass) are not scored again; ``save`` gets the scores so far after
    each module, so an interruption loses at most the module being scored. Once ``deadline`` (a `time.time` value)
    has passed no further module is scored: the ones scored are returned.
    """
    targets = quantize_targets(model)
    scores = {name: done[name] for name, _ in targets if done and name in done}
    if len(scores) == len(targets):
        return scores
    was_training = model.training
    model.eval()
    found = find_layers(model)
    prefix, layers = found if found is not None else ("", None)
    recorded = _record(model, layers, blocks) if layers is not None else \
        [([], logprobs(model, block)) for block in blocks]
    try:
        for name, module in targets:
            if name in scores:
                continue
            if deadline is not None and time.time() >= deadline:
                break
            new = quantized_module(module, base_format(fmt))
            new.eval()
            model.set_submodule(name, new)
            try:
                scores[name] = max(0.0, _kl(model, blocks, recorded, layers, layer_index(name, prefix)))
            finally:
                model.set_submodule(name, module)
            if save is not None:
                save(dict(scores))
            if progress is not None:
                progress(len(scores), len(targets))
    finally:
        model.train(was_training)
    return {name: scores[name] for name, _ in targets if name in scores}


SENSITIVITY_VERSION = 2
_ENTRY_KEYS = ("format", "scores", "tokens", "seconds", "complete")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def entry_problem(entry: Any, fmt: dict[str, Any], targets: list[str], tokens: int) -> str | None:
    """Why a cached entry cannot stand for ``fmt`` on this model and these tokens; ``None`` when it can.

    The entry must hold every key, the base format of ``fmt``, the token count this run scores, and scores (finite
    numbers >= 0) for this model's quantizable modules only (all of them once ``complete``).
    """
    if not isinstance(entry, dict):
        return "not a JSON object"
    missing = [key for key in _ENTRY_KEYS if key not in entry]
    if missing:
        return f"no {missing[0]!r} key"
    if entry["format"] != base_format(fmt):
        return f"format {entry['format']!r}, expected {base_format(fmt)!r}"
    if not _is_number(entry["tokens"]) or entry["tokens"] != tokens:
        return f"tokens {entry['tokens']!r}, while this run scores on {tokens} tokens"
    if not _is_number(entry["seconds"]) or entry["seconds"] < 0:
        return f"seconds {entry['seconds']!r} is not a number >= 0"
    if not isinstance(entry["complete"], bool):
        return f"complete {entry['complete']!r} is not true or false"
    scores = entry["scores"]
    if not isinstance(scores, dict):
        return "scores is not a mapping of module names to numbers"
    allowed = set(targets)
    foreign = [name for name in scores if name not in allowed]
    if foreign:
        return f"module {foreign[0]!r} is not one of this model's {len(targets)} quantizable modules"
    bad = [name for name, value in scores.items() if not _is_number(value) or value < 0]
    if bad:
        return f"the score of {bad[0]!r} is {scores[bad[0]]!r}, not a finite number >= 0"
    if entry["complete"] and len(scores) != len(targets):
        return f"marked complete with {len(scores)} of the model's {len(targets)} modules scored"
    return None


class SensitivityCache:
    """Scores on disk: ``{"schema", "version", "entries": {"<fingerprint>:<tokens hash>:<format key>": entry}}``,
    merged on write under a file lock, so several runs (and the shared cache under ``$HFSQUEEZE_CACHE``) can hold
    them. An entry is ``{"format", "scores": {module: kl}, "tokens", "seconds", "complete"}``.

    Nothing read is trusted: a file that is not a sensitivity file of this version is ignored (one warning, then
    rewritten), and `get` drops an entry its check refuses, with a warning.
    """

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._warned: set[Path] = set()

    def get(self, key: str, problem: Callable[[Any], str | None]) -> tuple[dict[str, Any], Path] | None:
        """The valid entry under ``key`` with the most scores (a complete one when there is one), with its file."""
        best: tuple[dict[str, Any], Path] | None = None
        for path in self.paths:
            entries = self._entries(path)
            if key not in entries:
                continue
            why = problem(entries[key])
            if why is not None:
                logger.warning("sensitivity cache %s: the entry for %s is dropped (%s); it is scored again", path,
                               key.rsplit(":", 1)[-1], why)
                continue
            if best is None or len(entries[key]["scores"]) > len(best[0]["scores"]):
                best = (entries[key], path)
        return best

    def put(self, key: str, entry: dict[str, Any]) -> None:
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(f".{path.stem}.lock"), "w") as lock:  # hidden: not part of the artifact
                fcntl.flock(lock, fcntl.LOCK_EX)
                entries = self._entries(path)
                entries[key] = entry
                atomic_write(path, json.dumps({"schema": SENSITIVITY_SCHEMA, "version": SENSITIVITY_VERSION,
                                               "entries": entries}, indent=1, sort_keys=True) + "\n")

    def _entries(self, path: Path) -> dict[str, Any]:
        why, entries = _read(path)
        if why is not None and path not in self._warned:
            self._warned.add(path)
            logger.warning("sensitivity cache %s is not used (%s); it is replaced by fresh scores", path, why)
        return entries


def _read(path: Path) -> tuple[str | None, dict[str, Any]]:
    """(why the file cannot be used, or ``None``; its entries). A missing file is simply empty."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, {}
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable: {type(exc).__name__}", {}
    try:
        data = json.loads(text)
    except ValueError:
        return "not valid JSON", {}
    if not isinstance(data, dict) or data.get("schema") != SENSITIVITY_SCHEMA:
        return "not an hfsqueeze sensitivity file", {}
    if data.get("version") != SENSITIVITY_VERSION:
        return f"version {data.get('version')!r}; this hfsqueeze reads version {SENSITIVITY_VERSION}", {}
    if not isinstance(data.get("entries"), dict):
        return "its entries are not a mapping", {}
    return None, data["entries"]


def sensitivities(model: nn.Module, blocks: torch.Tensor, formats: list[dict[str, Any]], cache: SensitivityCache,
                  *, model_fingerprint: str | None = None,
                  report: Callable[[dict[str, Any]], None] | None = None,
                  deadline: float | None = None) -> dict[str, dict[str, Any]]:
    """Scores for each format's base format (``format_key`` -> entry), from the cache or measured now and cached.

    An entry holds ``scores`` (module -> KL), ``tokens``, ``seconds`` (spent scoring in this call), ``cached``
    (every score came from the cache), ``cached_modules`` (how many did) and ``cached_from`` (which file). Once
    ``deadline`` (a `time.time` value: the tune run's time budget) has passed, scoring stops: an entry cut short
    lists its ``unscored`` modules, which get the mean of the scores measured (the solver then neither prefers nor
    avoids them); the cache keeps it as an interrupted pass that a later run completes.
    """
    fp = model_fingerprint or fingerprint(model)
    th = tokens_hash(blocks)
    targets = [name for name, _ in quantize_targets(model)]
    tokens = int(blocks.numel())
    out: dict[str, dict[str, Any]] = {}
    for fmt in formats:
        fkey = format_key(fmt)
        if fkey in out:
            continue
        key = f"{fp}:{th}:{fkey}"
        found = cache.get(key, lambda entry, fmt=fmt: entry_problem(entry, fmt, targets, tokens))
        cached, source = (dict(found[0]["scores"]), str(found[1])) if found else ({}, None)
        previous = float(found[0]["seconds"]) if found else 0.0
        if found and found[0]["complete"]:
            logger.info("sensitivity %s: %d modules from the cache %s", fkey, len(cached), source)
            cache.put(key, found[0])  # copy into every cache file (the output's own sensitivity.json)
            out[fkey] = {"format": base_format(fmt), "scores": cached, "tokens": tokens, "seconds": 0.0,
                         "cached": True, "cached_modules": len(cached), "cached_from": source}
            continue
        if cached:
            logger.info("sensitivity %s: %d of %d modules from the cache %s (an interrupted pass); scoring the rest",
                        fkey, len(cached), len(targets), source)
        start = time.perf_counter()

        def entry(scores: dict[str, float], fmt=fmt, start=start, previous=previous) -> dict[str, Any]:
            return {"format": base_format(fmt), "scores": scores, "tokens": tokens, "complete": len(scores) == len(
                targets), "seconds": round(previous + time.perf_counter() - start, 2)}

        def step(done: int, total: int, fkey=fkey, start=start, skipped=len(cached)) -> None:
            if done == total or (done - skipped) % max(1, total // 10) == 0:
                elapsed = time.perf_counter() - start
                info = {"phase": "sensitivity", "format": fkey, "done": done, "total": total, "elapsed": elapsed,
                        "eta": elapsed / max(1, done - skipped) * (total - done)}
                logger.info("sensitivity %s: %d/%d modules, %.0fs, ETA %.0fs", fkey, done, total, elapsed,
                            info["eta"])
                if report is not None:
                    report(info)

        scores = score_modules(model, blocks, fmt, step, done=cached, deadline=deadline,
                               save=lambda scores, key=key, entry=entry: cache.put(key, entry(scores)))
        cache.put(key, entry(scores))
        out[fkey] = {"format": base_format(fmt), "scores": scores, "tokens": tokens,
                     "seconds": round(time.perf_counter() - start, 2), "cached": False,
                     "cached_modules": len(cached), "cached_from": source}
        unscored = [name for name in targets if name not in scores]
        if unscored:
            logger.warning("tune: the time budget ran out during the sensitivity pass: %s scored %d of %d modules; "
                           "the other %d count as the mean score (--resume scores them)", fkey, len(scores),
                           len(targets), len(unscored))
            mean = sum(scores.values()) / len(scores) if scores else 0.0
            out[fkey].update(scores={**scores, **dict.fromkeys(unscored, mean)}, unscored=unscored)
    return out


__all__ = ["SensitivityCache", "base_format", "entry_problem", "fingerprint", "format_key", "score_modules",
           "sensitivities"]
