"""What a compression did: size, memory, latency, perplexity, KL and top-1 agreement against the original.

`reference_outputs` records the model's outputs before compression on the evaluation text (log-probabilities for
causal LMs, mean-pooled sentence embeddings for encoders); `measure` re-runs the same inputs and compares. Latency
uses the same prompt, thread count and repeat count for every measurement and reports the median, the spread of the
runs and the load average; when both models are in memory their runs are interleaved, and `latency_check` says
whether the ratio between them can be trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import torch

from ..compat.bnb import guard_bnb_cpu_repack, saveable
from ..compat.safetensors import safetensors_bytes
from ..core.data import eval_sources, load_texts, token_blocks
from ..core.errors import UnsupportedModelError
from ..core.hf import count_parameters, eval_mode, is_causal_lm, quantization_method, synchronizer, to_device
from ..core.quality import REFERENCE_DTYPE, cosine, pooled_embeddings, score_lm
from ..core.stage import Stage, save_weights
from ..core.utils import progress_bar
from .metrics import Metrics

logger = logging.getLogger("hfsqueeze")

# `model_task` values, as the report records them (``report["model"]["task"]``).
TASK_CAUSAL_LM = "causal-lm"
TASK_ENCODER = "encoder"
# Latency runs of one model whose slowest is more than this many times the fastest make a ratio unreliable.
MAX_LATENCY_SPREAD = 1.5
# Why ``evaluation.latency: auto`` leaves a bitsandbytes model on a CPU untimed (measured on SmolLM2: int8 decodes
# 1.5-2.5x slower than fp32 there, and timing it dominated the first command's wall time on a busy machine).
BNB_CPU_LATENCY = ("bitsandbytes runs on the CPU here, where its kernels say nothing about the speed it is built for "
                   "(GPUs); set evaluation.latency=true to time it anyway")


@dataclasses.dataclass
class Reference:
    """Outputs of the uncompressed model on the evaluation inputs."""

    task: str
    inputs: torch.Tensor  # causal: token blocks [n, L]; encoder: input ids [n, L]
    attention_mask: torch.Tensor | None
    outputs: list[torch.Tensor]  # causal: log-probs per block (`REFERENCE_DTYPE`, CPU); encoder: [embeddings [n, H]]
    perplexity: float | None = None
    label: str | None = None
    # The other evaluation texts, by label (``evaluation.text`` as a list); the report shows each one.
    others: dict[str, Reference] = dataclasses.field(default_factory=dict)

    def all(self) -> dict[str, Reference]:
        """Every text's reference by label, this one first."""
        return {self.label or "text": self, **self.others}


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


def model_task(model) -> str:
    """``"causal-lm"`` for generative LMs, ``"encoder"`` for models without a next-token head (BERT-style)."""
    return TASK_CAUSAL_LM if is_causal_lm(model) else TASK_ENCODER


def footprint_bytes(model) -> int:
    """Bytes held by parameters, buffers and bnb quantization state (int8 row scales, 4-bit absmax)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        scb = getattr(t, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                         if isinstance(v, torch.Tensor))
    return total


def disk_bytes(model, stages: Iterable[Stage] = ()) -> int:
    """Size of the weight files (safetensors) an artifact of ``model`` holds: what `save_compressed` writes with the
    registered ``stages`` (`hfsqueeze.registry.stages()`: a kept LoRA adapter is part of the artifact); without
    stages, what plain ``save_pretrained`` writes.

    The save runs as `save_compressed` runs it, but each weight file's exact size is computed instead of written
    (`compat.safetensors.safetensors_bytes`); only the small JSON files land in the temporary directory.
    """
    with tempfile.TemporaryDirectory(prefix="hfsqueeze-size-") as tmp, saveable(model):
        return safetensors_bytes(tmp, lambda: save_weights(model, tmp, stages))


def _eval_inputs(model, tokenizer, evaluation, texts: list[str] | None):
    texts = texts if texts is not None else load_texts(evaluation.texts[0], split="eval")
    if model_task(model) == TASK_CAUSAL_LM:
        return token_blocks(tokenizer, texts, max_tokens=evaluation.max_tokens, seq_len=evaluation.seq_len), None
    # Encoders: one sentence-ish chunk per paragraph, padded into a batch (the way sentence embeddings are used).
    paragraphs = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 20]
    chunks, used = [], 0
    for p in paragraphs:
        n = len(tokenizer(p, truncation=True, max_length=128)["input_ids"])
        chunks.append(p)
        used += n
        if used >= evaluation.max_tokens:
            break
    enc = tokenizer(chunks, truncation=True, max_length=128, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def reference_outputs(model, tokenizer, evaluation, texts: list[str] | None = None) -> Reference | None:
    """Record the outputs of ``model`` (before compression) on the evaluation text; ``None`` without a tokenizer."""
    if tokenizer is None:
        return None
    with eval_mode(model):
        task = model_task(model)
        inputs, mask = _eval_inputs(model, tokenizer, evaluation, texts)
        logger.info("recording the reference outputs on %d evaluation tokens", inputs.numel())
        if task == TASK_CAUSAL_LM:
            score = score_lm(model, inputs, keep=REFERENCE_DTYPE, desc="reference outputs")
            return Reference(task, inputs, None, score.reference, perplexity=score.perplexity)
        return Reference(task, inputs, mask, [pooled_embeddings(model, inputs, mask)])


def reference_set(model, tokenizer, evaluation, texts: dict[str, list[str]]) -> Reference | None:
    """`reference_outputs` for several texts: the first label's reference holds the others in ``others``."""
    refs = {label: reference_outputs(model, tokenizer, evaluation, docs) for label, docs in texts.items()}
    if not refs or any(r is None for r in refs.values()):
        return None
    for label, ref in refs.items():
        ref.label = label
    first, *rest = refs.values()
    first.others = {r.label: r for r in rest}
    return first


def _reference_quality(ref: Reference) -> dict[str, float]:
    """The original model's own quality on a text: its perplexity, zero KL, full agreement."""
    if ref.task == TASK_CAUSAL_LM:
        return {"perplexity": ref.perplexity, "kl_divergence": 0.0, "top1_agreement": 1.0,
                "eval_tokens": ref.inputs.numel()}
    return {"embedding_cosine": 1.0, "eval_tokens": int(ref.attention_mask.sum())}




def _quality(model, reference: Reference) -> dict[str, float]:
    if reference.task == TASK_ENCODER:
        cos = cosine(reference.outputs[0], pooled_embeddings(model, reference.inputs, reference.attention_mask))
        return {"embedding_cosine": cos.mean().item(), "eval_tokens": int(reference.attention_mask.sum())}
    # KL(original || compressed), per token, summed over the vocabulary.
    score = score_lm(model, reference.inputs, reference.outputs, desc="perplexity/KL")
    return {"perplexity": score.perplexity, "kl_divergence": score.kl_per_token, "top1_agreement": score.top1,
            "eval_tokens": score.tokens}


def load_average() -> float | None:
    """The 1-minute load average (``None`` where the OS has none): runnable processes competing for the CPUs."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _spread(runs: list[float]) -> dict[str, Any]:
    return {"min": min(runs), "median": statistics.median(runs), "max": max(runs), "runs": runs}


def _timers(model, prompt: torch.Tensor, decode_tokens: int):
    """(prefill, decode) callables returning ms/token of one run; decode is ``None`` for encoders or 0 tokens."""

    params = inspect.signature(model.forward).parameters
    prompt = to_device(prompt, model)
    # CUDA queues kernels and returns at once: wait for the device before reading each clock, or only the launches
    # are timed.
    sync = synchronizer(model)
    # Prefill as `generate` runs it: logits for the last position only (a 49k-152k vocabulary head over every prompt
    # token would otherwise be a fifth of SmolLM2's prefill time, work no generation does).
    last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def prefill() -> float:
        sync()
        start = time.perf_counter()
        model(input_ids=prompt, **last)
        sync()
        return (time.perf_counter() - start) * 1000 / prompt.shape[1]

    if model_task(model) != TASK_CAUSAL_LM or decode_tokens <= 0:
        return prefill, None
    # Transformers 5.2x renamed `past_key_values` to `cache` (input and output); accept both.
    key = "cache" if "cache" in params else "past_key_values"

    def decode() -> float:
        out = model(input_ids=prompt, use_cache=True, **last)
        past, token = getattr(out, key), out.logits[:, -1:].argmax(-1).to(prompt.device)
        sync()
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=token, use_cache=True, **{key: past})
            past, token = getattr(out, key), out.logits[:, -1:].argmax(-1).to(prompt.device)
        sync()
        return (time.perf_counter() - start) * 1000 / decode_tokens

    return prefill, decode


def latency_skipped(evaluation, model, quantized: str | None = None) -> str | None:
    """Why ``evaluation.latency: auto`` does not time ``model`` (``None``: it is timed as asked).

    ``quantized`` is the backend the model will be quantized with once a recipe ran (`Recipe.validated`); by default
    the one it has now.
    """
    if evaluation.latency != "auto":
        return None
    param = next(iter(model.parameters()), None)
    on_cpu = param is None or param.device.type == "cpu"
    return BNB_CPU_LATENCY if on_cpu and (quantized or quantization_method(model)) == "bitsandbytes" else None


@torch.no_grad()
def interleaved_latency(models: list, prompt: torch.Tensor, *, decode_tokens: int, repeats: int,
                        max_seconds: float | None = None) -> list[dict[str, Any]]:
    """Time several models on the same prompt, alternating between them in every round.

    A change in machine load then hits every model alike, so their ratios stay meaningful. Each model gets one
    untimed warm-up (first-call allocations, bnb weight preparation), then up to ``repeats`` rounds of one prefill
    and one greedy decode run with the KV cache; no round starts once ``max_seconds`` of timed rounds are spent
    (there is always one). The progress bar counts the runs: its total is re-estimated from the warm-up and ends as
    the number really run.

    Returns:
        `list[dict]`: per model, the median ``prefill_ms_per_token`` / ``decode_ms_per_token`` (``None`` when not
        measured), ``latency_spread`` (min/median/max and every run) and ``load_average`` (the highest 1-minute load
        average seen before and after the runs).
    """
    with contextlib.ExitStack() as stack:
        timers = [_timers(stack.enter_context(eval_mode(model)), prompt, decode_tokens) for model in models]
        # Under load a decode run of a 135M model takes seconds: show the runs (warm-up + rounds, every model).
        per_round = sum(1 + (d is not None) for _, d in timers)
        bar = stack.enter_context(progress_bar(desc="latency", total=(repeats + 1) * per_round))
        start = time.perf_counter()
        for prefill, decode in timers:
            prefill()
            if decode is not None:
                decode()
            bar.update(1 + (decode is not None))
        if max_seconds is not None:  # a timed round costs about what the warm-up did (less bnb's preparation)
            rounds = max(1, min(repeats, math.ceil(max_seconds / max(time.perf_counter() - start, 1e-9))))
            bar.total = (rounds + 1) * per_round
            bar.refresh()
        loads = [load_average()]
        runs: list[dict[str, list[float]]] = [{"prefill_ms_per_token": [], "decode_ms_per_token": []} for _ in models]
        start = time.perf_counter()
        for done in range(repeats):
            if done and max_seconds is not None and time.perf_counter() - start >= max_seconds:
                break
            for (prefill, decode), samples in zip(timers, runs):
                samples["prefill_ms_per_token"].append(prefill())
                if decode is not None:
                    samples["decode_ms_per_token"].append(decode())
                bar.update(1 + (decode is not None))
            if bar.n >= bar.total and done + 1 < repeats:  # the estimate was low: one more round fits the budget
                bar.total += per_round
        bar.total = bar.n  # what was really run
        bar.refresh()
        loads.append(load_average())
    seen = [x for x in loads if x is not None]
    results = []
    for samples in runs:
        spread = {key: _spread(values) for key, values in samples.items() if values}
        results.append({**{key: s["median"] for key, s in spread.items()}, "latency_spread": spread,
                        "load_average": max(seen) if seen else None})
        results[-1].setdefault("decode_ms_per_token", None)
    return results


def latency(model, prompt: torch.Tensor, *, decode_tokens: int, repeats: int, max_seconds: float | None = None
            ) -> dict[str, Any]:
    """Median prefill ms/token on ``prompt`` [1, P] and (causal LMs) greedy decode ms/token with the KV cache, with
    the spread of the runs and the load average (see `interleaved_latency`)."""
    return interleaved_latency([model], prompt, decode_tokens=decode_tokens, repeats=repeats,
                               max_seconds=max_seconds)[0]


def latency_prompt(reference: Reference, evaluation) -> torch.Tensor:
    """The latency prompt ``[1, P]``: the first ``evaluation.prompt_tokens`` tokens of the evaluation inputs."""
    if reference.task == TASK_ENCODER:
        return reference.inputs[:1, : evaluation.prompt_tokens]
    return reference.inputs.reshape(-1)[: evaluation.prompt_tokens].unsqueeze(0)


def remeasure_latency_interleaved(original, model, metrics: list[Metrics], reference: Reference, evaluation) -> None:
    """Re-time ``original`` and ``model`` interleaved and overwrite the latency fields of ``metrics`` (their two
    `Metrics`, in that order)."""
    logger.info("measuring latency: %d prompt tokens, %d decode steps, %d repeats (original and compressed, "
                "alternating)", evaluation.prompt_tokens, evaluation.decode_tokens, evaluation.repeats)
    prompt = latency_prompt(reference, evaluation)
    results = interleaved_latency([original, model], prompt, decode_tokens=evaluation.decode_tokens,
                                  repeats=evaluation.repeats, max_seconds=evaluation.latency_seconds)
    for target, values in zip(metrics, results):
        for key, value in values.items():
            setattr(target, key, value)


def latency_check(original: Metrics | None, final: Metrics | None, *, threads: int | None, interleaved: bool
                  ) -> dict[str, Any] | None:
    """Whether the final/original latency ratios can be trusted; ``None`` when no latency was measured.

    A ratio is flagged unreliable when the runs of either model spread more than `MAX_LATENCY_SPREAD` (max/min), or
    the 1-minute load average during either measurement exceeded the thread count (other processes competed for the
    CPUs; measured on SmolLM2 on a 2-core CPU: decode 256 ms/token under load vs 41 ms alone).
    """
    pairs = [(label, m) for label, m in (("original", original), ("compressed", final))
             if m is not None and (m.prefill_ms_per_token is not None or m.decode_ms_per_token is not None)]
    if not pairs:
        return None
    reasons = []
    for label, m in pairs:
        for key, spread in sorted((m.latency_spread or {}).items()):
            if spread["min"] > 0 and spread["max"] / spread["min"] > MAX_LATENCY_SPREAD:
                what = key.split("_")[0]
                reasons.append(f"the {label} model's {what} runs spread {spread['max'] / spread['min']:.2f}x "
                               f"(max/min > {MAX_LATENCY_SPREAD})")
        if threads and m.load_average is not None and m.load_average > threads:
            reasons.append(f"the 1-minute load average was {m.load_average:.2f} (> {threads} "
                           f"thread{'s' if threads != 1 else ''}) while the {label} model was timed")
    return {"reliable": not reasons, "reasons": reasons, "interleaved": interleaved, "threads": threads,
            "max_spread": MAX_LATENCY_SPREAD}




def measure(model, tokenizer, evaluation, reference: Reference | None = None, *, with_disk: bool | None = None,
            compare: bool = True, time_latency: bool = True, stages: Iterable[Stage] = ()) -> Metrics:
    """Measure ``model``: parameters, footprint, disk size, quality against ``reference``, latency.

    Args:
        model (`PreTrainedModel`): the model, as it is now.
        tokenizer: its tokenizer; without one, only sizes are measured.
        evaluation (`EvaluationConfig`): what to measure (text, token budget, latency settings).
        reference (`Reference`, *optional*): outputs of the original model; without it, no KL/top-1/cosine
            (perplexity is still measured for causal LMs).
        with_disk (`bool`, *optional*): size the weights on disk (`disk_bytes`); defaults to ``evaluation.disk_size``.
        compare (`bool`, defaults to `True`): compare with ``reference``; `measure_baseline` turns it off.
        time_latency (`bool`, defaults to `True`): time latency when ``evaluation.latency`` asks for it; off when
            the caller times this model interleaved with another (`remeasure_latency_interleaved`).
        stages (*optional*): the registered stages, to write the weights as an artifact holds them (`disk_bytes`).
    """
    guard_bnb_cpu_repack(model)
    metrics = Metrics(parameters=count_parameters(model), footprint_bytes=footprint_bytes(model))
    if evaluation.disk_size if with_disk is None else with_disk:
        metrics.disk_bytes = disk_bytes(model, stages)  # before any forward: see guard_bnb_cpu_repack
    if tokenizer is None:
        return metrics
    if reference is None:
        reference = reference_outputs(model, tokenizer, evaluation)
        if reference.task == TASK_CAUSAL_LM:
            metrics.perplexity, metrics.eval_tokens = reference.perplexity, reference.inputs.numel()
    elif compare:
        logger.info("measuring perplexity, KL and top-1 agreement against the reference")
        with eval_mode(model):
            for key, value in _quality(model, reference).items():
                setattr(metrics, key, value)
            if reference.others:
                metrics.texts = {reference.label: _reference_quality_of(metrics)}
                metrics.texts.update({label: _quality(model, ref) for label, ref in reference.others.items()})
    skipped = latency_skipped(evaluation, model) if evaluation.latency and time_latency else None
    if skipped:
        logger.info("latency not measured: %s", skipped)
    elif evaluation.latency and time_latency:
        logger.info("measuring latency: %d prompt tokens, %d decode steps, up to %d repeats or %gs",
                    evaluation.prompt_tokens, evaluation.decode_tokens, evaluation.repeats, evaluation.latency_seconds)
        for key, value in latency(model, latency_prompt(reference, evaluation), decode_tokens=evaluation.decode_tokens,
                                  repeats=evaluation.repeats, max_seconds=evaluation.latency_seconds).items():
            setattr(metrics, key, value)
    return metrics


def _reference_quality_of(metrics: Metrics) -> dict[str, float]:
    keys = ("perplexity", "kl_divergence", "top1_agreement", "embedding_cosine", "eval_tokens")
    return {k: getattr(metrics, k) for k in keys if getattr(metrics, k) is not None}


def measure_baseline(model, tokenizer, evaluation, texts: list[str] | dict[str, list[str]] | None = None, *,
                     time_latency: bool = True) -> tuple[Metrics, Reference | None]:
    """Measure the uncompressed model and record its outputs (on ``texts``, default: the evaluation text), which
    later measurements compare against. ``texts`` may map labels to texts: each is recorded and reported."""
    if texts is None and len(evaluation.texts) > 1:
        texts = {label: load_texts(src, split="eval") for label, src in eval_sources(None, evaluation).items()}
    if isinstance(texts, dict):
        reference = reference_set(model, tokenizer, evaluation, texts) if tokenizer is not None else None
    else:
        reference = reference_outputs(model, tokenizer, evaluation, texts)
    metrics = measure(model, tokenizer, evaluation, reference, compare=False, time_latency=time_latency)
    if reference is not None:
        if reference.task == TASK_CAUSAL_LM:
            metrics.perplexity, metrics.kl_divergence, metrics.top1_agreement = reference.perplexity, 0.0, 1.0
            metrics.eval_tokens = reference.inputs.numel()
        else:
            metrics.embedding_cosine = 1.0
            metrics.eval_tokens = int(reference.attention_mask.sum())
        if reference.others:
            metrics.texts = {label: _reference_quality(ref) for label, ref in reference.all().items()}
    return metrics, reference
