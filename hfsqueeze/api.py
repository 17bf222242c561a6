"""`compress`: the one implementation behind `PreTrainedModel.compress` and the CLI; `evaluate_artifact` behind
``hfsqueeze eval``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel

from .artifact.load import load_compressed, load_model
from .artifact.save import weights_bytes
from .core.context import CompressionContext
from .core.data import check_text_source, eval_sources, load_texts
from .core.errors import ArtifactError
from .core.hf import eval_mode, frozen_copy
from .core.loading import check_model_source
from .core.memory import return_freed_memory, unmap_weights
from .core.models import placement_kwargs
from .core.runner import AppliedStage, run_stages
from .core.utils import quiet_transformers_progress
from .evaluation.measure import (check_measurable, latency_skipped, measure, measure_baseline,
                                 remeasure_latency_interleaved)
from .evaluation.report import CompressionReport, StageResult, environment, model_summary
from .recipe import EvaluationConfig, Recipe, RecipeLike
from .registry import get_stage, stages

logger = logging.getLogger("hfsqueeze")


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
    recipe, outcome = recipe.validated(model)
    check_text_source(calibration)
    evaluation = recipe.evaluation
    # `latency: auto` decides for the result the recipe will give: an untimed result leaves the original untimed too.
    skipped = latency_skipped(evaluation, model, outcome.quantized)
    if skipped:
        logger.info("latency not measured: %s", skipped)
        evaluation = dataclasses.replace(evaluation, latency=False)
    sources = eval_sources(eval_text, evaluation)
    texts = {label: load_texts(src, split="eval") for label, src in sources.items()} if tokenizer else None
    ctx = CompressionContext(tokenizer=tokenizer, calibration=calibration, extras=extras, eval_texts=sources)
    # A model loaded by the caller may still point into its memory-mapped checkpoint: weights the stages free would
    # then stay resident (a no-op for models loaded by hfsqueeze, and off the CPU).
    unmap_weights(model)
    return_freed_memory()  # freed weights and activations go back to the system (see `core.memory`)
    if any(s.snapshot_needed() == "original" for s in recipe.stages):
        # When no stage writes into the model's tensors (quantize, then LoRA recovery), the frozen original shares
        # them: the fp32 weights are held once, and quantizing the model frees nothing the teacher needs anyway.
        ctx.original = frozen_copy(model, share=recipe.keeps_tensors(model))
    # With the original in memory anyway, time it interleaved with the result at the end: same load for both.
    interleave = ctx.original is not None and measure_quality and tokenizer is not None and evaluation.latency
    with eval_mode(model):
        reference = None
        if measure_quality:
            baseline, reference = measure_baseline(model, tokenizer, evaluation, texts, time_latency=not interleave)
        else:
            baseline = measure(model, None, evaluation, with_disk=False)
        report = CompressionReport(
            model=model_summary(model), recipe=recipe.to_dict(), environment=environment(model),
            evaluation={**recipe.evaluation.to_dict(), "text": ", ".join(sources),
                        "eval_tokens": baseline.eval_tokens},
            baseline=baseline, command=command, latency_skipped=skipped,
        )
        last = len(recipe.stages)

        def measured(applied: AppliedStage) -> None:
            result = StageResult(applied.index, applied.config.method, applied.config.to_dict(), applied.details,
                                 round(applied.seconds, 3))
            if applied.index == last or evaluation.per_stage:
                result.metrics = measure(model, tokenizer if measure_quality else None, evaluation, reference,
                                         with_disk=evaluation.disk_size, stages=stages(),
                                         time_latency=not (interleave and applied.index == last))
            report.stages.append(result)
            report.warnings += [f"stage {applied.index} ({applied.config.method}): {w}"
                                for w in result.details.get("warnings") or []]

        run_stages(model, recipe.stages, ctx, get_stage, after=measured, total=last)
        report.final = report.stages[-1].metrics
        if interleave and reference is not None:
            remeasure_latency_interleaved(ctx.original, model, [baseline, report.final], reference, evaluation)
            report.latency_interleaved = True
    model.hfsqueeze_report = report
    return report


def evaluate_artifact(path: str | Path, *, base: str | None = None, overrides: list[str] | None = None,
                      trust_remote_code: bool = False, check_parity: bool = True, device: str | None = None,
                      dtype: str | None = None) -> CompressionReport:
    """Re-measure a saved artifact; compare it with ``base`` (the uncompressed model) only when you name one.

    Nothing an artifact file names is loaded: the model path in its ``report.json`` could have been edited to point
    anywhere (another model, a directory with modeling code), so without ``base`` the artifact is measured alone
    (perplexity on the text, sizes, latency) and the report has no original column and no KL/top-1 against one.

    Args:
        path (`str` or `Path`): a directory written by `save_compressed`.
        base (`str`, *optional*): the uncompressed model (a directory or ``"builtin"``), loaded and re-measured; the
            artifact's KL and top-1 agreement are computed against it and the two are timed in alternating runs.
        overrides (`list[str]`, *optional*): ``evaluation.KEY=VALUE`` changes to the saved recipe's evaluation
            settings (the defaults when the artifact has no report).
        trust_remote_code (`bool`, defaults to `False`): allow custom modeling code in the artifact and ``base``,
            the two paths you pass; never in anything they name.
        check_parity (`bool`, defaults to `True`): the parity checks of `load_compressed` (an hfsqueeze artifact
            must hold ``parity.safetensors`` and reproduce it, a kept LoRA adapter must be there unchanged).
        device (`str`, *optional*): where the artifact and ``base`` load: ``cpu`` (default), ``cuda``, ``cuda:N`` or
            ``auto`` (see `hfsqueeze.core.models.placement_kwargs`).
        dtype (`str`, *optional*): ``auto`` (the saved dtype, default), ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        `CompressionReport`: one ``eval`` stage; its config's ``base`` is what it was compared with (``None``:
        nothing). ``baseline`` is the re-measured ``base``, or ``None``.

    Example:

    ```python
    from hfsqueeze.api import evaluate_artifact

    report = evaluate_artifact("out/smollm2-int8", base="builtin")
    print(report.to_markdown())
    ```
    """
    quiet_transformers_progress()
    placement = placement_kwargs(device, dtype)  # a bad device or dtype fails before anything loads
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ArtifactError(f"{path} is not a saved model directory (no config.json)")
    if base is not None:
        check_model_source(base)  # a --base that cannot load fails now, not after the artifact is measured
    # report.json gives the evaluation settings only; its model path is never opened.
    saved = CompressionReport.load(path) if (path / "report.json").is_file() else None
    evaluation = EvaluationConfig.from_dict((saved.recipe.get("evaluation") or {}) if saved else {},
                                            where="evaluation").overridden(overrides or [])
    logger.info("loading the artifact %s", path)
    model = load_compressed(path, trust_remote_code=trust_remote_code, check_parity=check_parity, **placement)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code) \
        if (path / "tokenizer_config.json").is_file() else None
    if base is None:
        logger.info("no base model given: measuring the artifact alone (pass base= to compare with one)")
        baseline, reference, base_model = None, None, None
    else:
        logger.info("loading the base model %s to re-measure it", base)
        base_model, _ = load_model(base, trust_remote_code=trust_remote_code, **placement)
        baseline, reference = measure_baseline(base_model, tokenizer, evaluation, time_latency=False)
    logger.info("measuring the artifact")
    metrics = measure(model, tokenizer, evaluation, reference, with_disk=False, time_latency=base_model is None)
    skipped = latency_skipped(evaluation, model)
    interleaved = base_model is not None and evaluation.latency and not skipped and reference is not None
    if interleaved:  # both models in memory: time them in alternating runs, under the same load
        remeasure_latency_interleaved(base_model, model, [baseline, metrics], reference, evaluation)
    del base_model
    metrics.disk_bytes = weights_bytes(path)
    return CompressionReport(
        model=saved.model if saved else model_summary(model),
        recipe=saved.recipe if saved else {},
        environment=environment(model),
        evaluation={**evaluation.to_dict(), "eval_tokens": metrics.eval_tokens},
        baseline=baseline,
        stages=[StageResult(1, "eval", {"artifact": str(path), "base": base}, {"format": "re-measured"}, 0.0,
                            metrics)],
        final=metrics,
        latency_interleaved=interleaved,
        latency_skipped=skipped,
    )


def attach_compress_method() -> None:
    """Give every `PreTrainedModel` a ``compress`` method delegating to `compress`; never overwrite a foreign one."""
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


# `import hfsqueeze` attaches this once Transformers defines PreTrainedModel; when that happens during the import of
# this module (which imports Transformers), the attaching is done here, now that `compress` exists.
attach_compress_method()

__all__ = ["attach_compress_method", "compress", "evaluate_artifact"]
