"""What a tune run prepares before its search: checks of its arguments and output (before a model loads), the
calibration text written once to ``tuning/calibration.jsonl`` and tokenized once, ``tuning/run.json`` (written, or
checked on ``--resume``), the sensitivities, and the per-process `TrialContext` a coordinator and every worker build
from that run file (`make_context`)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..artifact.save import check_output_dir, check_writable
from ..core.data import load_texts, pack_blocks, token_ids
from ..core.errors import ArtifactError, HfSqueezeWarning, RecipeError
from ..core.hf import count_parameters
from ..core.memory import return_freed_memory
from ..core.utils import atomic_write, cache_dir
from ..evaluation.measure import disk_bytes
from ..registry import stages as registered_stages
from .budget import LATENCY_KEYS, Budget
from .output import TUNING_DIR
from .resources import check_workers
from .sensitivity import SensitivityCache, fingerprint, sensitivities, tokens_hash
from .space import QUANTIZE, Space, draws_fp16, fp16_overflows, without_fp16
from .study import (
    check_journal,
)
from .trial import TrialContext, TuneSettings


logger = logging.getLogger("hfsqueeze")

RUN_FILE = "run.json"
SENSITIVITY_FILE = "sensitivity.json"
STORAGE_ENV = "HFSQUEEZE_TUNE_STORAGE"  # how local workers get an RDB URL
CALIBRATION_FILE = "calibration.jsonl"
ORIGINAL_COPY = ".original"  # the original saved for worker processes when tune got no model_path
# Fewer calibration tokens than this and every trial's KL rests on a few sentences: warn, and say so in the report.
MIN_CALIBRATION_TOKENS = 256
# What must match for --resume to continue a study (anything else may change between runs).
_RESUME_KEYS = ("budget", "space", "settings", "seed", "fingerprint", "calibration_hash")


def check_args(budget: Budget, space: Space, settings: TuneSettings, trials: int, workers: int,
               time_budget: float | None, resume: bool, output: Any) -> None:
    """One-line errors for settings that cannot run, none needing the model (the CLI calls it before loading)."""
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise RecipeError(f"trials: got {trials!r}; must be an integer >= 1")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise RecipeError(f"workers: got {workers!r}; must be an integer >= 1")
    check_workers(workers)  # the CPU bound; memory once the model's size is known
    if time_budget is not None and not time_budget > 0:
        raise RecipeError(f"time budget: got {time_budget!r}; must be a positive number of seconds")
    if resume and output is None:
        raise RecipeError("resume needs the output directory of the run to continue")
    latency = set(LATENCY_KEYS) & (set(budget.limits) | {budget.minimize})
    if latency and settings.latency is False:  # None: timed exactly when the budget asks for it
        raise RecipeError(f"the budget uses {', '.join(sorted(latency))} but latency measurement is off")
    if QUANTIZE not in space.sections and budget.minimize == "kl" and not (
            {"prefill", "decode", "size", "size_bytes", "bits"} & set(budget.limits)):
        raise RecipeError("the budget has nothing this space can trade for quality")


def check_output(output: Any, resume: bool, overwrite: bool) -> None:
    """One-line errors for an ``output`` this run cannot use, before any work (the CLI calls it before loading)."""
    if output is None:
        return
    out = Path(output).expanduser().resolve()
    ours = (out / TUNING_DIR / RUN_FILE).is_file()
    if resume and not ours:
        raise ArtifactError(f"--resume: {out} holds no tuning run ({TUNING_DIR}/{RUN_FILE} is missing); start "
                            "without --resume")
    if not resume and ours and not overwrite:
        raise ArtifactError(f"{out} holds a previous tuning run; pass --resume to continue it or --overwrite to "
                            "start over")
    # compress's policy (no file, no protected directory, a writable parent: the chosen point is staged beside
    # `out`); what an earlier run of ours left in `out` is judged above instead.
    check_output_dir(output, overwrite, probe=True, contents=not ours)
    check_writable(out / TUNING_DIR / RUN_FILE, output)  # the study is written inside `out`


def prepare_output(output: Any, resume: bool, overwrite: bool) -> tuple[Path, Path, bool]:
    """The output and ``tuning/`` directories, checked before any work (one-line errors, nothing written)."""
    if output is None:
        out = Path(tempfile.mkdtemp(prefix="hfsqueeze-tune-"))
        (out / TUNING_DIR).mkdir()
        return out, out / TUNING_DIR, True
    check_output(output, resume, overwrite)
    out = Path(output).expanduser().resolve()
    tuning = out / TUNING_DIR
    if not resume and (tuning / RUN_FILE).is_file():
        shutil.rmtree(tuning)  # --overwrite of a previous run (check_output refused it without)
    tuning.mkdir(parents=True, exist_ok=True)
    return out, tuning, False


def space_formats(space: Space) -> list[dict[str, Any]]:
    """The 8/4-bit formats the space can draw (one per sensitivity base format)."""
    q = space.sections.get(QUANTIZE)
    if not q:
        return []
    bits = q["bits"].choices if "bits" in q else (8,)
    formats = [{"bits": 8}] if 8 in bits else []
    if 4 in bits:
        formats += [{"bits": 4, "quant_type": t} for t in (q["quant_type"].choices if "quant_type" in q else ("nf4",))]
    return formats


def calibration_file(calibration: Any, tuning: Path) -> Path:
    """Write the calibration documents (built-in: its train split) to ``tuning/calibration.jsonl``: the only text
    the search reads, and what the trials' stages get as their calibration source."""
    docs = load_texts(calibration, split="train")
    path = tuning / CALIBRATION_FILE
    atomic_write(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def calibration_ids(tokenizer, source: str, settings: TuneSettings) -> list[int]:
    """The calibration text's token ids, as many as the trials' blocks and the sensitivity pass use (tokenized once
    for both)."""
    return token_ids(tokenizer, load_texts(source, split="train"),
                     max_tokens=max(settings.calibration_tokens, settings.sensitivity_tokens))


def _blocks(ids: list[int], tokens: int, settings: TuneSettings) -> torch.Tensor:
    return pack_blocks(ids, max_tokens=tokens, seq_len=min(settings.seq_len, tokens))


def make_context(model, tokenizer, spec: dict[str, Any], tuning: Path,
                 report: Callable[[dict[str, Any]], None] | None = None, deadline: float | None = None,
                 ids: list[int] | None = None) -> TrialContext:
    """The per-process trial context for the run described by ``spec`` (``tuning/run.json``); sensitivity scoring
    stops at ``deadline`` (the time budget, see `sensitivities`). ``ids``: the calibration token ids when the
    caller has them already (`calibration_ids`)."""
    return_freed_memory()  # every trial frees a model's worth of weights and activations (`core.memory`)
    settings = TuneSettings(**spec["settings"])
    budget = Budget(dict(spec["budget"]["limits"]), spec["budget"]["minimize"])
    space = Space.from_dict(spec["space"])
    source = str(tuning / CALIBRATION_FILE)
    ids = calibration_ids(tokenizer, source, settings) if ids is None else ids
    blocks = _blocks(ids, settings.calibration_tokens, settings)
    sens_blocks = _blocks(ids, settings.sensitivity_tokens, settings)
    cache = SensitivityCache([tuning / SENSITIVITY_FILE,
                              cache_dir() / "sensitivity" / f"{spec['fingerprint']}.json"])
    scores = sensitivities(model, sens_blocks, space_formats(space), cache, model_fingerprint=spec["fingerprint"],
                           report=report, deadline=deadline)
    return TrialContext(model, tokenizer, source, blocks, budget, space, settings, scores, spec["original_bytes"],
                        spec["original_params"], workdir=tuning)


def setup_run(model, tokenizer, budget: Budget, space: Space, settings: TuneSettings, calibration: Any, tuning: Path,
           seed: int, resume: bool, progress, deadline: float | None = None, journal: bool = True
           ) -> tuple[TrialContext, dict[str, Any]]:
    """Write (or, on resume, check) ``tuning/run.json``; score sensitivities; build the trial context."""
    cal_path = calibration_file(calibration, tuning)
    ids = calibration_ids(tokenizer, str(cal_path), settings)
    blocks = _blocks(ids, settings.calibration_tokens, settings)
    few = calibration_warning(int(blocks.numel()), settings)
    if few:
        warnings.warn(few, HfSqueezeWarning, stacklevel=3)
    if draws_fp16(space) and fp16_overflows(model, blocks[:1]):
        logger.warning("tune: this model overflows in float16 (non-finite logits on the calibration text); fp16 "
                       "choices are left out of the space")
        space = without_fp16(space)
    spec = {
        "budget": budget.to_dict(), "space": space.to_dict(), "settings": settings.to_dict(), "seed": seed,
        "fingerprint": fingerprint(model), "calibration_hash": tokens_hash(blocks),
        "original_bytes": disk_bytes(model, registered_stages()), "original_params": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    run_file = tuning / RUN_FILE
    if resume:
        saved = _saved_run(run_file)
        for key in _RESUME_KEYS:
            if json.dumps(saved.get(key), sort_keys=True) != json.dumps(spec[key], sort_keys=True):
                what = "model (its config or weights differ)" if key == "fingerprint" else key
                raise RecipeError(f"--resume: the run in {tuning.parent} was started with another {what} "
                                  f"({_short(saved.get(key))}, now {_short(spec[key])}); resume with the same model, "
                                  "budget, space, seed and calibration, or start over with --overwrite")
        if journal:  # the study is in tuning/study.journal (not in a database)
            check_journal(tuning)
        spec = {**saved, **{k: spec[k] for k in ("original_bytes", "original_params", "dtype")}}
    atomic_write(run_file, json.dumps(spec, indent=1) + "\n")
    logger.info("tune: original %.1f MiB on disk, %d parameters; budget %s", spec["original_bytes"] / 2**20,
                spec["original_params"], budget.describe())
    return make_context(model, tokenizer, spec, tuning, progress, deadline, ids), spec


def calibration_warning(tokens: int, settings: TuneSettings) -> str | None:
    """Why the search's measurements stand on too little text, or ``None`` (the report's tuning section keeps it)."""
    if tokens >= MIN_CALIBRATION_TOKENS:
        return None
    why = ("the calibration text is that short; pass a longer one (--calibration)" if tokens <
           settings.calibration_tokens else f"settings ask for calibration_tokens={settings.calibration_tokens}")
    return (f"tune: every trial is measured on only {tokens} calibration tokens (at least {MIN_CALIBRATION_TOKENS} "
            f"recommended), so its KL and perplexity may not hold on other text: {why}")


def _saved_run(run_file: Path) -> dict[str, Any]:
    try:
        saved = json.loads(run_file.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"--resume: {run_file} cannot be read ({type(exc).__name__}); start over with "
                            "--overwrite") from None
    if not isinstance(saved, dict):
        raise ArtifactError(f"--resume: {run_file} is not a tuning run's record; start over with --overwrite")
    return saved


def _short(value: Any) -> str:
    text = value.get("text") if isinstance(value, dict) and "text" in value else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["CALIBRATION_FILE", "ORIGINAL_COPY", "RUN_FILE", "SENSITIVITY_FILE", "STORAGE_ENV", "calibration_file",
           "calibration_ids", "calibration_warning", "check_args", "check_output", "make_context", "prepare_output",
           "setup_run", "space_formats"]
