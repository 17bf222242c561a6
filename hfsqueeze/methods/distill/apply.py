"""The ``distill`` stage in named steps: check and prepare (teacher, tasks, student, losses), train, report.

See `DistillConfig` for the options, `DistillationTrainer` for the training loop and `expand_recovery` for the
``recover: auto`` recipe option. Importing this module imports the training stack (``transformers.Trainer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from ...compat.bnb import is_bnb_quantized
from ...core.data import BUILTIN
from ...core.errors import RecipeError
from ...core.hf import input_device, is_causal_lm, num_layers
from ...core.models import load_pretrained
from ...core.utils import progress_disabled
from .config import DistillConfig, check_tasks, uses_lora
from .data import CAUSAL_LM, Collator, MixedDataset, TaskData, build_tasks, eval_examples, pad_token_id, resolve_source
from .launch import FSDP, Launch, argument_defaults, check_engaged, check_launch
from .outcome import finish, snapshot_trainable
from .plot import loss_curve_png
from .quality import EvalSet, evaluation_sets, score
from .recover import attach_lora
from .shard import EngineSetup
from .student import build_student
from .trainer import (
    AUX_NAME,
    DistillationTrainer,
    DistillAux,
    DistillSpec,
    classification_accuracy,
    embedding_cosine,
    lm_perplexity,
)

logger = logging.getLogger("hfsqueeze")


def _has_lm_head(model: nn.Module) -> bool:
    return model.get_output_embeddings() is not None if hasattr(model, "get_output_embeddings") else False


def _is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def resolve_teacher(model: nn.Module, config: DistillConfig, context: Any) -> tuple[nn.Module, str]:
    """The frozen teacher named by ``config.teacher`` and a description for the report."""
    where = f"stage {getattr(context, 'stage_index', 0)} (distill): key 'teacher'"
    if config.teacher in ("original", "previous"):
        teacher = getattr(context, config.teacher, None)
        if teacher is None:
            raise RecipeError(f"{where}: '{config.teacher}' needs the frozen copy that hfsqueeze.compress makes; "
                              f"when calling the stage yourself, set context.{config.teacher} to the teacher model")
        if teacher is model:
            raise RecipeError(f"{where}: the teacher is the model being trained; it must be a separate frozen copy")
        return teacher, config.teacher
    teacher, _ = load_pretrained(config.teacher)
    return teacher, config.teacher


def _layer_map(auto_or_list: Any, student_n: int, teacher_n: int, source_layers: list[int] | None,
               what: str) -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)``, 0-based."""
    if isinstance(auto_or_list, list):
        if len(auto_or_list) != student_n:
            raise RecipeError(f"{what}.layer_map: got {len(auto_or_list)} entries; the student has {student_n} "
                              "layers, give one teacher layer for each")
        if max(auto_or_list) >= teacher_n:
            raise RecipeError(f"{what}.layer_map: got {auto_or_list}; the teacher has {teacher_n} layers "
                              f"(0..{teacher_n - 1})")
        return list(enumerate(auto_or_list))
    if source_layers is not None:
        return list(enumerate(source_layers))
    if student_n == teacher_n:
        return [(i, i) for i in range(student_n)]
    return [(i, round((i + 1) * teacher_n / student_n) - 1) for i in range(student_n)]


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "adapter_model.bin")


def _checkpoint_problem(path: Path) -> str | None:
    """What makes a Trainer checkpoint unusable for resuming, or None when it is complete.

    Trainer writes the weights first and ``trainer_state.json`` last, so a save cut short (Ctrl-C, kill) lacks the
    state file or holds an unreadable one; the weights must be there and readable too.
    """
    state = path / "trainer_state.json"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is missing or unreadable"
    if step != int(_CHECKPOINT.match(path.name).group(1)):
        return f"trainer_state.json says step {step}"
    weights = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        return "no weights file"
    for file in weights:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), "pt") as fh:
                    fh.keys()
            except Exception:  # noqa: BLE001 - a truncated file is exactly what we are looking for
                return f"{file.name} is truncated or corrupt"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest Trainer checkpoint in ``output_dir`` that was written completely (skipping broken ones, loudly)."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir()
             if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    for _, path in sorted(found, reverse=True):
        problem = _checkpoint_problem(path)
        if problem is None:
            logger.warning("distill: resuming from %s", path)
            return str(path)
        logger.warning("distill: skipping incomplete checkpoint %s (%s; the save was interrupted)", path, problem)
    return None


def _checkpointing_default(model: nn.Module, use_lora: bool, launch: Launch,
                           kwargs: dict[str, Any]) -> dict[str, Any]:
    """Activation checkpointing on for LoRA on a quantized base (QLoRA), as peft's `prepare_model_for_kbit_training`
    does, unless the user set it: the frozen 4/8-bit base is small, so the stored activations are most of the memory
    a step adds (800M Llama, 2 steps: peak 2.63x -> 2.03x of the fp32 size) for one more forward per step. Not under
    FSDP, whose own checkpointing option conflicts with the Trainer's."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    if (not use_lora or not is_bnb_quantized(model) or launch.engine == FSDP
            or not getattr(model, "supports_gradient_checkpointing", False)
            or {"activation_checkpointing", "gradient_checkpointing"} & set(kwargs)):
        return {}
    return {key: True}


def _training_arguments(config: DistillConfig, output_dir: str, user_dir: bool, device: torch.device,
                        launch: Launch, checkpointing: dict[str, Any] | None = None):
    from transformers import TrainingArguments

    kwargs = {**(checkpointing or {}), **config.resolved_training_args()}
    cuda = torch.cuda.is_available()
    check_launch(launch, cuda)
    max_steps = kwargs.get("max_steps", -1)
    defaults: dict[str, Any] = {
        "logging_steps": max(1, max_steps // 50) if max_steps and max_steps > 0 else 10,
        "ddp_find_unused_parameters": False,
        "disable_tqdm": progress_disabled(),
        # Train where the model is: a CPU model stays on the CPU even on a GPU host (the Trainer would move it);
        # DeepSpeed and FSDP place the student themselves (DeepSpeed on CPU processes needs gloo).
        **argument_defaults(launch, cuda, on_cpu=device.type == "cpu"),
        "save_strategy": "steps" if user_dir else "no",
        "save_total_limit": 2,
    }
    if user_dir and "save_steps" not in kwargs and max_steps and max_steps > 0:
        defaults["save_steps"] = max(1, max_steps // 4)
    args = TrainingArguments(output_dir=output_dir, remove_unused_columns=False, report_to=[],
                             **{**defaults, **kwargs})
    if device.type == "cuda" and args.world_size == 1:
        # Outside a distributed launch the Trainer wraps the model in DataParallel over every visible GPU; hfsqueeze
        # trains on the model's own device only (Transformers itself sets this private count the same way).
        args._n_gpu = 1
    return args


def _evaluate(model: nn.Module, teacher: nn.Module | None, tasks: list[TaskData], pad_id: int,
              aux: DistillAux | None, spec: DistillSpec) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task_id, task in enumerate(tasks):
        examples = eval_examples(task, task_id)
        if task.kind == CAUSAL_LM:
            if _has_lm_head(model):
                out[task.name] = {"perplexity": lm_perplexity(model, examples, pad_id)}
            elif teacher is not None:
                out[task.name] = {"embedding_cosine": embedding_cosine(model, teacher, examples, pad_id)}
        else:
            head = None if spec.student_is_classifier else (aux.heads[str(task_id)] if aux else None)
            if head is None and not spec.student_is_classifier:
                continue
            out[task.name] = {"accuracy": classification_accuracy(model, head, examples, pad_id, spec.pooling)}
    return out


# ---- the stage ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """Everything one training run needs, prepared before the model is touched."""

    teacher: nn.Module
    teacher_desc: str
    tasks: list[TaskData]
    spec: DistillSpec
    aux: DistillAux | None
    use_lora: bool
    pad_id: int
    student: dict[str, Any] | None


def _check(model: nn.Module, config: DistillConfig, context: Any) -> tuple[nn.Module, str, bool]:
    """Every check that can fail, before the student is built: a refused stage leaves the model untouched."""
    if context is None or getattr(context, "tokenizer", None) is None:
        raise RecipeError("the distill stage needs a tokenizer; pass compress(..., tokenizer=tok)")
    teacher, teacher_desc = resolve_teacher(model, config, context)
    check_tasks(config, type(model).__name__)
    if _has_lm_head(model) and _has_lm_head(teacher):
        sv, tv = model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
        if sv != tv:
            raise RecipeError(f"teacher vocabulary ({tv}) differs from the student's ({sv}); KD on logits needs the "
                              "same tokenizer")
    use_lora = uses_lora(config, "bitsandbytes" if is_bnb_quantized(model) else None)
    return teacher, teacher_desc, use_lora


def _spec(model: nn.Module, teacher: nn.Module, config: DistillConfig, tasks: list[TaskData],
          source_layers: list[int] | None) -> DistillSpec:
    """The losses: weights, and which student layer imitates which teacher layer."""
    student_is_classifier = _is_classifier(model)
    spec = DistillSpec(
        temperature=config.temperature, alpha=config.alpha, task_kinds=[t.kind for t in tasks],
        hidden_weight=config.hidden_states.weight, hidden_kind=config.hidden_states.loss,
        attention_weight=config.attentions.weight,
        pooling="last" if is_causal_lm(model) else "mean",
        student_is_classifier=student_is_classifier, embedding_loss=config.embedding_loss,
        teacher_class_logits=[i for i, t in enumerate(tasks) if t.kind != CAUSAL_LM and _is_classifier(teacher)
                              and teacher.config.num_labels == t.num_labels],
    )
    student_n, teacher_n = num_layers(model), num_layers(teacher)
    if spec.hidden_weight:
        pairs = _layer_map(config.hidden_states.layer_map, student_n, teacher_n, source_layers, "hidden_states")
        spec.hidden_map = [(s + 1, t + 1) for s, t in pairs]
    if spec.attention_weight:
        spec.attention_map = _layer_map(config.attentions.layer_map, student_n, teacher_n, source_layers,
                                        "attentions")
    return spec


def _aux(model: nn.Module, teacher: nn.Module, spec: DistillSpec, tasks: list[TaskData]) -> DistillAux | None:
    """Trainable helpers: width projections (student narrower than teacher) and heads for classification tasks."""
    projections: dict[str, nn.Module] = {}
    if _width(model) != _width(teacher):
        keys = [f"{s}_{t}" for s, t in spec.hidden_map] + ([] if _has_lm_head(model) else ["-1_-1"])
        projections = {k: nn.Linear(_width(model), _width(teacher), bias=False) for k in keys}
    heads = {}
    if not spec.student_is_classifier:
        heads = {str(i): nn.Linear(_width(model), t.num_labels) for i, t in enumerate(tasks) if t.kind != CAUSAL_LM}
    aux = DistillAux(projections, heads) if projections or heads else None
    if aux is not None:
        aux.to(next(model.parameters()).device)
    return aux


def _prepare(model: nn.Module, config: DistillConfig, context: Any) -> _Run:
    teacher, teacher_desc, use_lora = _check(model, config, context)
    tasks = build_tasks(config.tasks, context.tokenizer, config.block_size, context, encoder=not _has_lm_head(model))
    student = build_student(model, config.student) if config.student is not None else None
    spec = _spec(model, teacher, config, tasks, (student or {}).get("source_layers"))
    return _Run(teacher, teacher_desc, tasks, spec, _aux(model, teacher, spec, tasks), use_lora,
                pad_token_id(context.tokenizer), student)


def _trainer(train_model: nn.Module, config: DistillConfig, context: Any, run: _Run, output_dir: str,
             user_dir: bool, launch: Launch, checkpointing: dict[str, Any]) -> DistillationTrainer:
    args = _training_arguments(config, output_dir, user_dir, input_device(train_model), launch, checkpointing)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    num_examples = args.max_steps * per_step if len(run.tasks) > 1 and args.max_steps > 0 else None
    trainer = DistillationTrainer(
        model=train_model, teacher=run.teacher, spec=run.spec, aux=run.aux, args=args,
        train_dataset=MixedDataset(run.tasks, num_examples=num_examples, seed=args.seed),
        data_collator=Collator(run.pad_id),
        callbacks=list((getattr(context, "extras", None) or {}).get("distill_callbacks", [])),
    )
    check_engaged(trainer, launch)
    trainer.add_callback(EngineSetup(trainer, launch))
    if args.disable_tqdm:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    return trainer


@contextlib.contextmanager
def _dropout_off(model: nn.Module, off: bool) -> Iterator[None]:
    """With ``off``, train without the model's dropout (``nn.Dropout`` modules and attention-dropout rates); the
    rates come back afterwards, so the saved model and its config are unchanged."""
    saved: list[tuple[Any, str, float]] = []
    if off:
        for module in model.modules():
            if isinstance(module, nn.Dropout) and module.p:
                saved.append((module, "p", module.p))
            if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
                saved.append((module, "attention_dropout", module.attention_dropout))
        for module, name, _ in saved:
            setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _on_model_device(model: nn.Module) -> Any:
    """A context making the model's GPU the current one: the Trainer (through accelerate) trains on "cuda", the
    current device, so a model on ``cuda:1`` stays there instead of being moved to ``cuda:0``."""
    device = input_device(model)
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _train(model: nn.Module, config: DistillConfig, context: Any, run: _Run, output_dir: str, user_dir: bool):
    """Train (resuming from ``output_dir``'s last complete checkpoint when asked); leave the model as it was set up
    to be."""
    attn_impl = getattr(model.config, "_attn_implementation", None)
    teacher_attn_impl = getattr(run.teacher.config, "_attn_implementation", None)
    if run.spec.attention_weight:
        model.set_attn_implementation("eager")
        run.teacher.set_attn_implementation("eager")
    train_model = attach_lora(model, config.lora) if run.use_lora else model
    if config.freeze_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.requires_grad_(False)
    if run.aux is not None:
        model.add_module(AUX_NAME, run.aux)
        run.aux.requires_grad_(True)
    on_device = _on_model_device(model)
    launch = Launch.detect(config.resolved_training_args())
    # on by default for QLoRA; off again after training (the finally below)
    checkpointing = _checkpointing_default(model, run.use_lora, launch, config.training_args)
    with on_device:
        trainer = _trainer(train_model, config, context, run, output_dir, user_dir, launch, checkpointing)
    trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
    resume_from = last_complete_checkpoint(output_dir) if config.resume and user_dir and Path(output_dir).is_dir() \
        else None
    placement = EngineSetup.of(trainer)
    try:
        with _dropout_off(model, not config.student_dropout), on_device:
            result = trainer.train(resume_from_checkpoint=resume_from)
        placement.restore(train_model)  # whole parameters again on every process, before anything else runs
    except BaseException:
        if run.aux is not None and hasattr(model, AUX_NAME):
            delattr(model, AUX_NAME)  # an interrupted run must not leave training-only modules in the model
        raise
    finally:
        # Mixed precision patches forward() with autocast; the compressed model must run in its own precision.
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        if checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
        if run.spec.attention_weight:
            model.set_attn_implementation(attn_impl or "sdpa")
            run.teacher.set_attn_implementation(teacher_attn_impl or "sdpa")
    return trainer, train_model, trainable, result, resume_from


def _task_details(run: _Run, before: dict, after: dict, teacher_metrics: dict) -> dict[str, Any]:
    out = {}
    for task in run.tasks:
        out[task.name] = {
            "kind": task.kind, "weight": task.weight, "train_examples": len(task.train),
            "eval_examples": len(task.eval), "before": before.get(task.name), "after": after.get(task.name),
            "teacher": teacher_metrics.get(task.name),
        }
        if task.label_names:
            out[task.name]["labels"] = task.label_names
    return out


def _perplexity_details(run: _Run, before: dict, after: dict, teacher_metrics: dict) -> dict[str, Any]:
    """Perplexity before/after/teacher of the first LM task, and the share of the gap to the teacher closed."""
    lm = next((t for t in run.tasks if t.kind == CAUSAL_LM and "perplexity" in (before.get(t.name) or {})), None)
    if lm is None:
        return {}
    ppl_before, ppl_after = before[lm.name]["perplexity"], after[lm.name]["perplexity"]
    ppl_teacher = (teacher_metrics.get(lm.name) or {}).get("perplexity")
    gap = ppl_before - ppl_teacher if ppl_teacher is not None else 0.0
    # A gap under 0.5% of the teacher's perplexity is noise; a ratio over it would be meaningless.
    meaningful = ppl_teacher is not None and math.isfinite(gap) and gap > 0.005 * ppl_teacher
    return {"perplexity_before": round(ppl_before, 4), "perplexity_after": round(ppl_after, 4),
            "teacher_perplexity": round(ppl_teacher, 4) if ppl_teacher else None,
            "gap_closed": round((ppl_before - ppl_after) / gap, 4) if meaningful else None}


def _quality_sets(model: nn.Module, run: _Run, config: DistillConfig, context: Any) -> list[EvalSet]:
    """What the stage scores before and after training: each LM task's held-out split and the recipe's evaluation
    texts (``evaluation.text``), except the built-in text when a task trains on it (its held-out split is that)."""
    if run.spec.student_is_classifier:
        return []
    trains_on_builtin = any(resolve_source(t.text, context) == BUILTIN for t in config.tasks)
    texts = {label: src for label, src in (getattr(context, "eval_texts", None) or {}).items()
             if not (trains_on_builtin and src in (BUILTIN, f"{BUILTIN}:pydoc"))}
    return evaluation_sets(run.tasks, texts, context.tokenizer, encoder=not _has_lm_head(model),
                           block_size=config.block_size, max_tokens=max(t.eval_tokens for t in config.tasks))


def _outcome_details(outcome: dict[str, Any], tokens: int, seconds: float) -> dict[str, Any]:
    """The recovery outcome for the report, with a warning when the guard restored the model."""
    details = {**outcome, "train_tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
    if outcome["regressions"]:
        worse = "; ".join(outcome["regressions"])
        details["warnings"] = [f"recovery made the model worse ({worse}); kept the model from before recovery"]
    return details


def apply_distill(model: nn.Module, config: DistillConfig, context: Any) -> dict[str, Any]:
    """Distil ``config.teacher`` into ``model`` (or into a student built from it), in place.

    Example:

    ```python
    from hfsqueeze import compress

    report = compress(model, {"stages": [
        {"method": "prune", "heads": 0.25},
        {"method": "distill", "teacher": "original", "training_args": {"max_steps": 100}},
    ]}, tokenizer=tokenizer)
    ```
    """
    started = time.perf_counter()
    run = _prepare(model, config, context)
    lm_tasks = [t for t in run.tasks if t.kind == CAUSAL_LM]
    # aux=None: classification heads are new, so their tasks are scored after training only.
    before = _evaluate(model, run.teacher, run.tasks, run.pad_id, None, run.spec)
    teacher_metrics = _evaluate(run.teacher, None, lm_tasks, run.pad_id, None, run.spec) \
        if _has_lm_head(run.teacher) else {}
    sets = _quality_sets(model, run, config, context)
    quality_before = score(model, run.teacher, sets) if sets else {}
    snapshot = snapshot_trainable(model) if config.guard and not run.use_lora else None
    user_dir = config.output_dir is not None
    output_dir = config.output_dir or tempfile.mkdtemp(prefix="hfsqueeze-distill-")
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    train_started = time.perf_counter()
    trainer, train_model, trainable, result, resume_from = _train(model, config, context, run, output_dir,
                                                                  user_dir)
    train_seconds = time.perf_counter() - train_started
    # Keep the adapter, merge it, or restore the model from before training (the guard); see outcome.finish.
    outcome = finish(model, train_model, teacher=run.teacher, sets=sets, before=quality_before, use_lora=run.use_lora,
                     quantized=is_bnb_quantized(model), merge=config.lora.merge, guard=config.guard,
                     tolerance=config.guard_tolerance, snapshot=snapshot, fit_text=config.alpha < 1)
    del snapshot
    after = _evaluate(model, run.teacher, run.tasks, run.pad_id, run.aux, run.spec)
    if run.aux is not None:
        delattr(model, AUX_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(grad_flags.get(name, False))  # a kept adapter is frozen too
    model.eval()

    history = [h for h in trainer.state.log_history if "loss" in h]
    artifacts = []
    if trainer.is_world_process_zero():
        png = loss_curve_png(history, trainer.component_log,
                             Path(output_dir) / f"distill_loss_stage{getattr(context, 'stage_index', 0) or 1}.png",
                             f"Distillation loss (teacher: {run.teacher_desc}), {trainer.state.global_step} "
                             f"step{'s' if trainer.state.global_step != 1 else ''}")
        if png is not None:
            artifacts.append(str(png))
    world_size = trainer.args.world_size
    details: dict[str, Any] = {
        "teacher": run.teacher_desc, "student": run.student, "adapter": "lora" if run.use_lora else "full",
        "trainable_parameters": trainable, "steps": trainer.state.global_step, "resumed_from": resume_from,
        "world_size": world_size, **EngineSetup.of(trainer).engaged,
        "activation_checkpointing": bool(getattr(trainer.args, "activation_checkpointing", None)
                                         or trainer.args.gradient_checkpointing),
        "tokens_seen": trainer.tokens_seen * world_size,
        "train_seconds": round(train_seconds, 2), "wall_seconds": round(time.perf_counter() - started, 2),
        "train_loss": round(float(result.training_loss), 5),
        "loss_curve": [[h["step"], round(h["loss"], 5)] for h in history],
        "tasks": _task_details(run, before, after, teacher_metrics), "output_dir": output_dir,
        "artifacts": artifacts, **_perplexity_details(run, before, after, teacher_metrics),
        **_outcome_details(outcome, trainer.tokens_seen * world_size, train_seconds),
    }
    logger.info("distill: %d steps in %.1fs, %s", details["steps"], train_seconds,
                {k: details.get(k) for k in ("perplexity_before", "perplexity_after", "teacher_perplexity")})
    return details
