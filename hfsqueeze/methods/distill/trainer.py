"""`DistillationTrainer`: a `transformers.Trainer` whose only override is `compute_loss`.

The teacher is an attribute of the trainer, not of the model: it stays out of the optimizer, out of DDP/FSDP
wrapping and out of checkpoints; it is frozen, in eval mode, and runs under ``torch.no_grad``. Modules that train
with the student but are not part of it (hidden-state projections, classification heads of multi-task runs) live in
``model.hfsqueeze_distill`` during training, so the Trainer optimizes, synchronizes and checkpoints them; the stage
removes them afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback

from ...compat.bnb import is_bnb_quantized
from ...core.hf import eval_mode, input_device
from ...core.quality import LMScore, cosine, pooled_embeddings, score_lm
from . import losses
from .data import CAUSAL_LM, Collator

AUX_NAME = "hfsqueeze_distill"


@dataclass
class DistillSpec:
    """What `DistillationTrainer.compute_loss` needs to know besides the batch.

    Attributes:
        task_kinds: ``"causal_lm"`` or ``"sequence_classification"`` for each task id.
        hidden_map: pairs ``(student_hidden_index, teacher_hidden_index)`` into ``outputs.hidden_states`` (index 0 is
            the embeddings, ``i + 1`` the output of layer ``i``).
        attention_map: pairs ``(student_layer, teacher_layer)`` into ``outputs.attentions``.
        pooling: ``"last"`` (last real token, decoders) or ``"mean"`` (encoders) for classification heads.
        teacher_class_logits: task ids for which the teacher's own ``logits`` are class logits.
    """

    temperature: float = 2.0
    alpha: float = 0.5
    task_kinds: list[str] = field(default_factory=lambda: [CAUSAL_LM])
    hidden_weight: float = 0.0
    hidden_kind: str = "mse"
    hidden_map: list[tuple[int, int]] = field(default_factory=list)
    attention_weight: float = 0.0
    attention_map: list[tuple[int, int]] = field(default_factory=list)
    pooling: str = "last"
    student_is_classifier: bool = False
    embedding_loss: str = "cosine"
    teacher_class_logits: list[int] = field(default_factory=list)


class DistillAux(nn.Module):
    """Trainable helpers of a distillation run: width projections and per-task classification heads."""

    def __init__(self, projections: dict[str, nn.Module] | None = None, heads: dict[str, nn.Module] | None = None):
        super().__init__()
        self.projections = nn.ModuleDict(projections or {})
        self.heads = nn.ModuleDict(heads or {})

    def tie_all(self) -> torch.Tensor:
        """A zero that depends on every parameter, so DDP sees each one used even when a task is absent."""
        total = torch.zeros(())
        for p in self.parameters():
            total = total.to(p.device) + p.sum() * 0.0
        return total


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sequence embedding ``[batch, width]``: the last real token (right padding) or the masked mean."""
    if how == "last":
        last = mask.sum(1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _logits(outputs: Any) -> torch.Tensor | None:
    return getattr(outputs, "logits", None)


def _last_hidden(outputs: Any) -> torch.Tensor:
    states = getattr(outputs, "hidden_states", None)
    return states[-1] if states is not None else outputs.last_hidden_state


class LabelledProgressCallback(ProgressCallback):
    """Transformers' progress bar, with a label: among hfsqueeze's other bars it must say what it counts."""

    label = "distill: training steps"

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.label)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Show the running loss on the bar instead of printing a ``{'loss': ...}`` dict line per log step (the
        stage's report keeps the whole loss history)."""
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "learning_rate") and isinstance(v, float)}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class DistillationTrainer(Trainer):
    """Trainer for knowledge distillation; see `DistillSpec` and `hfsqueeze.methods.distill.losses`.

    Example:

    ```python
    trainer = DistillationTrainer(
        model=student, teacher=teacher, spec=DistillSpec(temperature=2.0, alpha=0.5),
        args=TrainingArguments("out", max_steps=100, remove_unused_columns=False),
        train_dataset=dataset, data_collator=Collator(tokenizer.pad_token_id),
    )
    trainer.train()
    ```
    """

    # compute_loss returns a per-batch mean; the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, teacher: nn.Module, spec: DistillSpec, aux: DistillAux | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(LabelledProgressCallback)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        # The teacher runs next to the student. Neither bitsandbytes weights nor a model accelerate spread over
        # several devices (device_map="auto") can be moved with .to(); those stay where they are.
        spread = len({str(d) for d in (getattr(teacher, "hf_device_map", None) or {}).values()}) > 1
        if not is_bnb_quantized(teacher) and not spread:
            teacher.to(input_device(self.model))
        self.teacher = teacher
        self.spec = spec
        self.aux = aux
        self.component_log: list[dict[str, float]] = []
        self.tokens_seen = 0
        # Frozen bitsandbytes layers compute in train mode differently than at inference (LLM.int8 drops to
        # weight-only): adapters must learn against the kernel the saved model will run, so these stay in eval mode.
        self.inference_mode_modules = [m for m in self.model.modules()
                                       if type(m).__name__ in ("Linear8bitLt", "Linear4bit")]

    def compute_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None, **kwargs: Any):
        inputs = dict(inputs)
        task_ids = inputs.pop("task_ids")
        class_labels = inputs.pop("class_labels")
        outputs, t_out = self._forward(model, inputs)
        loss, parts = self._task_loss(outputs, t_out, inputs, task_ids, class_labels)
        record = {"step": float(self.state.global_step)}
        loss = self._add_feature_losses(loss, outputs, t_out, inputs["attention_mask"], record)
        if self.aux is not None:
            loss = loss + self.aux.tie_all().to(loss.device)
        if model.training:
            for key, values in parts.items():
                if values:
                    record[key] = sum(values) / len(values)
            record["loss"] = float(loss.detach())
            self.component_log.append(record)
            self.tokens_seen += int(inputs["attention_mask"].sum())
        return (loss, outputs) if return_outputs else loss

    def _forward(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        """The student's outputs, and the teacher's (``None`` when no loss needs them)."""
        spec = self.spec
        need_hidden = bool(spec.hidden_weight) or any(k != CAUSAL_LM for k in spec.task_kinds)
        need_attn = bool(spec.attention_weight)
        forward_kwargs = {"output_hidden_states": True} if need_hidden else {}
        if need_attn:
            forward_kwargs["output_attentions"] = True
        for module in self.inference_mode_modules:
            module.training = False
        outputs = model(**inputs, **forward_kwargs)
        # alpha = 0 with no feature losses is plain fine-tuning: skip the teacher's forward pass entirely.
        if not (spec.alpha > 0 or bool(spec.hidden_weight) or need_attn or _logits(outputs) is None):
            return outputs, None
        self.teacher.eval()
        with torch.no_grad():
            t_out = self.teacher(**inputs, output_hidden_states=need_hidden or _logits(outputs) is None,
                                 output_attentions=need_attn)
        return outputs, t_out

    def _task_loss(self, outputs: Any, t_out: Any, inputs: dict[str, torch.Tensor], task_ids: torch.Tensor,
                   class_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """KD and hard loss of each task on its rows, averaged over the batch's rows; and the parts, for the log."""
        spec, mask = self.spec, inputs["attention_mask"]
        s_logits, t_logits = _logits(outputs), (_logits(t_out) if t_out is not None else None)
        total, rows_done, parts = 0.0, 0, {"kd": [], "hard": []}
        for task_id, kind in enumerate(spec.task_kinds):
            rows = task_ids == task_id
            n = int(rows.sum())
            if n == 0:
                continue
            m = mask[rows]
            kd = hard = None
            if kind == CAUSAL_LM:
                if s_logits is None:
                    # An encoder without an LM head: imitate the teacher's final representation (DistilBERT).
                    # A sentence encoder: imitate the teacher's sentence embedding (the mean-pooled output).
                    s_last, t_last = _last_hidden(outputs)[rows], _last_hidden(t_out)[rows]
                    projection = self._projection(-1, -1)
                    if projection is not None:
                        s_last = projection(s_last)
                    kd = losses.embedding_loss(s_last, t_last, m, kind=spec.embedding_loss)
                else:
                    # Every row in this task (the usual case): the logits themselves, not a boolean-indexed copy.
                    sel = slice(None) if n == len(rows) else rows
                    # With alpha 1 the hard loss is only logged: no graph, so its softmax is not kept for backward.
                    logged_only = t_logits is not None and spec.alpha >= 1.0
                    with torch.set_grad_enabled(torch.is_grad_enabled() and not logged_only):
                        hard = losses.causal_lm_loss(s_logits[sel], inputs["input_ids"][sel], m)
                    if t_logits is not None:
                        kd = losses.kd_loss(s_logits[sel], t_logits[sel], spec.temperature, m)
            else:
                if spec.student_is_classifier:
                    cls_logits = s_logits[rows]
                else:
                    cls_logits = self.aux.heads[str(task_id)](pool(_last_hidden(outputs)[rows], m, spec.pooling))
                hard = losses.classification_loss(cls_logits, class_labels[rows])
                if task_id in spec.teacher_class_logits and t_logits is not None:
                    kd = losses.kd_loss(cls_logits, t_logits[rows], spec.temperature)
            total = total + losses.combine_losses(alpha=spec.alpha, hard=hard, kd=kd) * n
            rows_done += n
            for key, value in (("kd", kd), ("hard", hard)):
                if value is not None:
                    parts[key].append(float(value.detach()))
        return total / max(rows_done, 1), parts

    def _add_feature_losses(self, loss: torch.Tensor, outputs: Any, t_out: Any, mask: torch.Tensor,
                            record: dict[str, float]) -> torch.Tensor:
        """Add the weighted hidden-state and attention-map losses (logged in ``record``)."""
        spec = self.spec
        if spec.hidden_weight and spec.hidden_map:
            s_states = [outputs.hidden_states[i] for i, _ in spec.hidden_map]
            t_states = [t_out.hidden_states[j] for _, j in spec.hidden_map]
            projs = [self._projection(i, j) for i, j in spec.hidden_map]
            hidden = losses.hidden_state_loss(s_states, t_states, projs, mask, kind=spec.hidden_kind)
            loss = loss + spec.hidden_weight * hidden
            record["hidden"] = float(hidden.detach())
        if spec.attention_weight and spec.attention_map:
            attn = losses.attention_loss([outputs.attentions[i] for i, _ in spec.attention_map],
                                         [t_out.attentions[j] for _, j in spec.attention_map], mask)
            loss = loss + spec.attention_weight * attn
            record["attention"] = float(attn.detach())
        return loss

    def _projection(self, student_index: int, teacher_index: int):
        if self.aux is None:
            return None
        key = f"{student_index}_{teacher_index}"
        return self.aux.projections[key] if key in self.aux.projections else None


# ---- held-out evaluation ----------------------------------------------------------------------------------------


def _batches(examples: list[dict[str, Any]], pad_id: int, batch_size: int):
    collate = Collator(pad_id)
    for i in range(0, len(examples), batch_size):
        yield collate([{**e, "task_id": 0} for e in examples[i: i + batch_size]])


def _device(model: nn.Module) -> torch.device:
    return input_device(model)


def lm_perplexity(model: nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int = 4) -> float:
    """Perplexity over held-out token blocks (every next-token prediction inside each block counts once)."""
    total = LMScore()
    for batch in _batches(examples, pad_id, batch_size):
        total.add(score_lm(model, batch["input_ids"], attention_mask=batch["attention_mask"], batch_size=batch_size))
    return total.perplexity


def embedding_cosine(student: nn.Module, teacher: nn.Module, examples: list[dict[str, Any]], pad_id: int,
                     batch_size: int = 4) -> float:
    """Mean cosine similarity of mean-pooled last hidden states, student vs teacher."""
    sims = [cosine(pooled_embeddings(teacher, batch["input_ids"], batch["attention_mask"], batch_size=batch_size),
                   pooled_embeddings(student, batch["input_ids"], batch["attention_mask"], batch_size=batch_size))
            for batch in _batches(examples, pad_id, batch_size)]
    return float(torch.cat(sims).mean())


@torch.no_grad()
def classification_accuracy(model: nn.Module, head: nn.Module | None, examples: list[dict[str, Any]], pad_id: int,
                            pooling: str, batch_size: int = 8) -> float:
    """Accuracy of the model's own class logits (``head=None``) or of ``head`` on pooled last hidden states."""
    correct = 0
    with eval_mode(model):
        for batch in _batches(examples, pad_id, batch_size):
            ids, mask = batch["input_ids"].to(_device(model)), batch["attention_mask"].to(_device(model))
            if head is None:
                logits = model(input_ids=ids, attention_mask=mask).logits
            else:
                hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                logits = head(pool(hidden, mask, pooling))
            correct += int((logits.argmax(-1).cpu() == batch["class_labels"]).sum())
    return correct / max(len(examples), 1)
