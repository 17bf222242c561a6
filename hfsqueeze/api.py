"""`compress`: the one implementation behind `PreTrainedModel.compress` and the CLI."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from .context import CompressionContext
from .data import check_text_source, eval_sources, load_texts
from .errors import UnsupportedModelError
from .measure import Metrics, measure, measure_baseline, model_task, remeasure_latency_interleaved
from .recipe import Recipe, RecipeLike
from .registry import get_stage
from .report import CompressionReport, StageResult
from .utils import cpu_name, quiet_transformers_progress, versions

logger = logging.getLogger("hfsqueeze")


def frozen_copy(model):
    """A deep copy of ``model`` in eval mode with gradients off: a teacher or a reference that never trains."""
    clone = copy.deepcopy(model)
    clone.eval()
    clone.requires_grad_(False)
    return clone


def compress(
    model,
    recipe: RecipeLike,
    *,
    tokenizer: Any = None,
    calibration: Any = "builtin",
    eval_text: Any = None,
    overrides: list[str] | None = None,
    measure_quality: bool = True,
    command: str | None = None,
    **extras: Any,
) -> CompressionReport:
    """Run a recipe of compression stages on ``model``, in place, and measure what each stage did.

    Args:
        model (`PreTrainedModel`): a loaded model; it is modified in place.
        recipe (`Recipe`, `dict` or `str`): a `Recipe`, a dict, a YAML path or a built-in recipe name (``"int8"``).
        tokenizer (*optional*): the model's tokenizer; needed for perplexity/KL and for data-driven stages.
        calibration (*optional*, defaults to `"builtin"`): calibration/training text for stages that need data: the
            built-in text (its train split), a local file, or a `datasets.Dataset`.
        eval_text (*optional*): evaluation text(s); overrides the recipe's ``evaluation.text``: a path,
            ``"builtin"``, ``"builtin:bible"``, a `datasets.Dataset`, or a list of these (the report shows each).
        overrides (`list[str]`, *optional*): ``key.path=value`` recipe overrides, as the CLI's ``--set``.
        measure_quality (`bool`, defaults to `True`): measure before/after; off, only sizes are reported.
        command (`str`, *optional*): the command line that ran this, recorded in the report and the model card.
        extras: passed to the stages through ``CompressionContext.extras``.

    Returns:
        `CompressionReport`: also attached to the model as ``model.hfsqueeze_report`` so `save_compressed` finds it.

    Example:

    ```python
    import hfsqueeze
    report = model.compress("recipes/int8.yaml", tokenizer=tok)
    print(report.to_markdown())
    ```
    """
    quiet_transformers_progress()
    recipe = Recipe.load(recipe, overrides)
    # Everything that can be known before the model runs fails here, before the baseline is measured.
    check_measurable(model)
    recipe = recipe.validate(model)
    check_text_source(calibration)
    evaluation = recipe.evaluation
    sources = eval_sources(eval_text, evaluation)
    texts = {label: load_texts(src, split="eval") for label, src in sources.items()} if tokenizer else None
    ctx = CompressionContext(tokenizer=tokenizer, calibration=calibration, extras=extras, eval_texts=sources)
    if any(s.snapshot_needed() == "original" for s in recipe.stages):
        ctx.original = frozen_copy(model)

    was_training = model.training
    model.eval()
    reference = None
    # With the original in memory anyway, time it interleaved with the result at the end: same load for both.
    interleave = ctx.original is not None and measure_quality and tokenizer is not None and evaluation.latency
    if measure_quality:
        baseline, reference = measure_baseline(model, tokenizer, evaluation, texts, time_latency=not interleave)
    else:
        baseline = measure(model, None, evaluation, with_disk=False)
    report = CompressionReport(
        model={
            "name_or_path": getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None),
            "model_type": model.config.model_type,
            "architecture": type(model).__name__,
            "task": model_task(model),
        },
        recipe=recipe.to_dict(),
        environment={**versions(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                     "device": str(getattr(model, "device", "cpu"))},
        evaluation={**evaluation.to_dict(), "text": ", ".join(sources),
                    "eval_tokens": baseline.eval_tokens},
        baseline=baseline,
        command=command,
    )

    last = len(recipe.stages)
    for index, stage in enumerate(recipe.stages, start=1):
        spec = get_stage(stage.method)
        ctx.stage_index = index
        ctx.previous = frozen_copy(model) if stage.snapshot_needed() == "previous" else None
        logger.info("stage %d/%d: %s", index, last, stage.method)
        start = time.perf_counter()
        details = spec.apply(model, stage, ctx) or {}
        seconds = time.perf_counter() - start
        model.eval()
        metrics = None
        if index == last or evaluation.per_stage:
            metrics = measure(model, tokenizer if measure_quality else None, evaluation, reference,
                              with_disk=evaluation.disk_size, time_latency=not (interleave and index == last))
        report.stages.append(StageResult(index, stage.method, stage.to_dict(), details, round(seconds, 3), metrics))
        report.warnings += [f"stage {index} ({stage.method}): {w}" for w in details.get("warnings") or []]
        ctx.results.append({"method": stage.method, **details})
    ctx.previous = None
    report.final = report.stages[-1].metrics
    if interleave and reference is not None:
        remeasure_latency_interleaved(ctx.original, model, [baseline, report.final], reference, evaluation)
        report.latency_interleaved = True
    model.train(was_training)
    model.hfsqueeze_report = report
    return report


def _expand(recipe: Recipe) -> Recipe:
    """Let stage packages rewrite the recipe before it runs (e.g. insert recovery after pruning)."""
    return recipe.expanded()


def check_measurable(model) -> None:
    """Refuse, before any work, a model that no stage and no measurement supports: encoder-decoder models.

    hfsqueeze compresses and measures decoder-only causal LMs and encoder models; each stage declares which model
    types it supports on top of that (its ``validate``).
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model type {getattr(config, 'model_type', None)!r} ({type(model).__name__}) is an encoder-decoder "
            "model; hfsqueeze compresses and measures decoder-only causal LMs (llama, gpt2, ...) and encoders "
            "(bert, ...)"
        )


def attach_compress_method() -> None:
    """Give every `PreTrainedModel` a ``compress`` method delegating to `compress`; never overwrite a foreign one."""
    from transformers import PreTrainedModel

    existing = getattr(PreTrainedModel, "compress", None)
    if existing is not None:
        if not getattr(existing, "_hfsqueeze", False):
            logger.warning("PreTrainedModel.compress already exists and was not added by hfsqueeze; "
                           "use hfsqueeze.compress(model, recipe) instead")
        return

    def compress_method(self, recipe: RecipeLike, **kwargs: Any) -> CompressionReport:
        return compress(self, recipe, **kwargs)

    compress_method.__doc__ = compress.__doc__
    compress_method._hfsqueeze = True
    PreTrainedModel.compress = compress_method


__all__ = ["Metrics", "attach_compress_method", "check_measurable", "compress", "frozen_copy"]
