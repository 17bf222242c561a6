"""Configuration of the ``distill`` stage: teacher, student, losses, data and training arguments."""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, Literal

from ...core.config import ConfigBase, StageConfig, _describe
from ...core.data import check_text_source
from ...core.errors import RecipeError
from ...core.loading import check_model_source

CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
TEACHER_SNAPSHOTS = ("original", "previous")
DEFAULT_TRAINING_ARGS: dict[str, Any] = {
    "max_steps": 200,
    "per_device_train_batch_size": 4,
    "learning_rate": 5e-5,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.0,
    "seed": 0,
}
# Keys the stage sets itself; a user value would silently break checkpoints, logging or DDP.
RESERVED_TRAINING_ARGS = ("output_dir", "remove_unused_columns", "report_to")


@dataclasses.dataclass
class HiddenStatesConfig(ConfigBase):
    """Match intermediate hidden states of student and teacher."""

    weight: float = dataclasses.field(default=0.0, metadata={"help": "weight of the hidden-state loss (0 disables)"})
    layer_map: Literal["auto"] | list[int] = dataclasses.field(
        default="auto",
        metadata={"help": "'auto' (a layer-subset student maps to the layers it kept, otherwise uniform spacing) "
                  "or, for each student layer, the teacher layer (0-based) it imitates"},
    )
    loss: Literal["mse", "cosine"] = dataclasses.field(
        default="mse", metadata={"help": "'mse' (on projected states) or 'cosine' (1 - cosine similarity)"}
    )

    def __post_init__(self):
        if self.weight < 0:
            self.fail("weight", f"got {self.weight}; must be >= 0")
        if isinstance(self.layer_map, list) and any(i < 0 for i in self.layer_map):
            self.fail("layer_map", f"got {self.layer_map}; layer indices must be >= 0")


@dataclasses.dataclass
class AttentionsConfig(ConfigBase):
    """Match attention maps (averaged over heads, so pruned heads are fine). Runs attention in eager mode."""

    weight: float = dataclasses.field(default=0.0, metadata={"help": "weight of the attention-map loss (0 disables)"})
    layer_map: Literal["auto"] | list[int] = dataclasses.field(
        default="auto", metadata={"help": "'auto' or, for each student layer, the teacher layer it imitates"}
    )

    def __post_init__(self):
        if self.weight < 0:
            self.fail("weight", f"got {self.weight}; must be >= 0")


@dataclasses.dataclass
class StudentConfig(ConfigBase):
    """Turn the model being compressed into a smaller student before training (in place)."""

    layers: list[int] | None = dataclasses.field(
        default=None,
        metadata={"help": "keep only these transformer layers (0-based, DistilBERT-style: weights copied from the "
                  "teacher's layers)"},
    )
    keep: int | float | None = dataclasses.field(
        default=None,
        metadata={"help": "keep this many layers (an int) or this fraction of them (a float in (0, 1)), evenly "
                  "spaced from the first to the last; like 'layers', without naming them"},
    )
    config: dict[str, Any] | None = dataclasses.field(
        default=None,
        metadata={"help": "config overrides (e.g. {num_hidden_layers: 4, intermediate_size: 512}); tensors whose "
                  "names and shapes still match are initialised from the model, the rest randomly"},
    )

    def __post_init__(self):
        given = [k for k in ("layers", "keep", "config") if getattr(self, k) is not None]
        if len(given) > 1:
            self.fail(given[0], f"give exactly one of 'layers', 'keep' or 'config'; got {', '.join(given)}")
        if isinstance(self.keep, float) and not 0 < self.keep < 1:
            self.fail("keep", f"got {self.keep}; a fraction must be between 0 and 1 (exclusive)")
        if isinstance(self.keep, int) and self.keep < 1:
            self.fail("keep", f"got {self.keep}; keep at least 1 layer")
        if self.layers is not None:
            if not self.layers:
                self.fail("layers", "got an empty list; keep at least one layer")
            if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
                self.fail("layers", f"got {self.layers}; expected distinct layer indices >= 0")
        if not given:
            self.fail("layers", "a student needs 'layers', 'keep' or 'config'; omit 'student' to train the model "
                      "itself")


@dataclasses.dataclass
class DataConfig(ConfigBase):
    """One training task: a text source (causal LM) or a labelled table (sequence classification)."""

    text: str = dataclasses.field(
        default="calibration",
        metadata={"help": "'calibration' (the source passed to compress, by default the built-in text), 'builtin', "
                  "'builtin:generated' (varied English sampled from SmolLM2: recovery text that is not one domain), "
                  "a local .txt/.md/.json/.jsonl/.csv/.parquet file, a key of compress(..., datasets={...}) or a "
                  "datasets name"},
    )
    task: Literal["causal_lm", "sequence_classification"] = dataclasses.field(
        default="causal_lm", metadata={"help": "'causal_lm' (next-token) or 'sequence_classification'"}
    )
    name: str | None = dataclasses.field(default=None, metadata={"help": "task name in the report (default: task_N)"})
    weight: float = dataclasses.field(default=1.0, metadata={"help": "sampling weight of this task"})
    column: str | None = dataclasses.field(default=None, metadata={"help": "text column (default 'text')"})
    label_column: str = dataclasses.field(default="label", metadata={"help": "classification: the label column"})
    max_tokens: int = dataclasses.field(default=200_000, metadata={"help": "causal LM: training tokens read at most"})
    eval_fraction: float = dataclasses.field(
        default=0.1, metadata={"help": "held-out share (the built-in text has its own held-out split)"}
    )
    eval_tokens: int = dataclasses.field(default=8192, metadata={"help": "causal LM: held-out tokens scored at most"})

    def __post_init__(self):
        if self.weight <= 0:
            self.fail("weight", f"got {self.weight}; must be > 0")
        if not 0 < self.eval_fraction < 1:
            self.fail("eval_fraction", f"got {self.eval_fraction}; must be between 0 and 1 (exclusive)")
        for key in ("max_tokens", "eval_tokens"):
            if getattr(self, key) < 2:
                self.fail(key, f"got {getattr(self, key)}; must be >= 2")


@dataclasses.dataclass
class LoraConfig(ConfigBase):
    """LoRA adapters (QLoRA on bitsandbytes-quantized models): kept unmerged on a quantized model, merged otherwise."""

    r: int = dataclasses.field(default=16, metadata={"help": "adapter rank"})
    alpha: int = dataclasses.field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float = dataclasses.field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: list[str] | Literal["all-linear"] = dataclasses.field(
        default="all-linear", metadata={"help": "module names to adapt, or 'all-linear'"}
    )
    merge: Literal["auto"] | bool = dataclasses.field(
        default="auto",
        metadata={"help": "'auto': merge into full-precision weights (exact), keep the adapter unmerged on a "
                  "bnb-quantized model (merging re-quantizes the weights and rounds the update away; the artifact "
                  "then holds adapter_model.safetensors, which from_pretrained applies with peft installed); true: "
                  "always merge; false: never"},
    )

    def __post_init__(self):
        if self.r < 1:
            self.fail("r", f"got {self.r}; must be >= 1")
        if not 0 <= self.dropout < 1:
            self.fail("dropout", f"got {self.dropout}; must be in [0, 1)")


@dataclasses.dataclass
class DistillConfig(StageConfig):
    """Knowledge distillation from a frozen teacher into the model being compressed (or a student built from it).

    The loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard`` plus the optional hidden-state and
    attention-map terms. Training runs through a `transformers.Trainer` (so accelerate's DDP/FSDP/DeepSpeed apply).

    Example:

    ```yaml
    - method: distill
      teacher: original
      temperature: 2.0
      alpha: 0.5
      hidden_states: {weight: 0.1, layer_map: auto}
      data: {text: builtin}
      training_args: {max_steps: 200, per_device_train_batch_size: 4, learning_rate: 5.0e-5}
    ```
    """

    method = "distill"

    teacher: str = dataclasses.field(
        default="original",
        metadata={"help": "'original' (the model before the recipe: use it for recovery after pruning), 'previous' "
                  "(the model as it entered this stage: use it when the stage builds a smaller student), or a model "
                  "path / Hub id"},
    )
    # `Any` (checked in __post_init__) so a bad nested value reports the nested reason, not the union.
    student: Any = dataclasses.field(
        default=None,
        metadata={"help": "StudentConfig or null: omit to train the model itself; {layers: [...]} or {config: {...}}"},
    )
    temperature: float = dataclasses.field(default=2.0, metadata={"help": "softmax temperature of the KD loss"})
    alpha: float = dataclasses.field(
        default=0.5, metadata={"help": "weight of the KD loss; 1 - alpha goes to the hard (LM or task) loss"}
    )
    hidden_states: HiddenStatesConfig = dataclasses.field(
        default_factory=HiddenStatesConfig, metadata={"help": "hidden-state matching"}
    )
    attentions: AttentionsConfig = dataclasses.field(
        default_factory=AttentionsConfig, metadata={"help": "attention-map matching"}
    )
    data: Any = dataclasses.field(
        default_factory=DataConfig,
        metadata={"help": "a DataConfig or a list of them: one task, or several tasks sampled by weight"},
    )
    block_size: int = dataclasses.field(default=256, metadata={"help": "tokens per training sequence"})
    training_args: dict[str, Any] = dataclasses.field(
        default_factory=dict, metadata={"help": "transformers.TrainingArguments overrides"}
    )
    freeze_embeddings: bool = dataclasses.field(
        default=False,
        metadata={"help": "keep the input/output embeddings fixed (cheaper steps; large-vocabulary models)"},
    )
    student_dropout: bool = dataclasses.field(
        default=True,
        metadata={"help": "train the student with its own dropout; recovery turns it off: the student imitates the "
                  "teacher's exact outputs, and dropout noise kept all-MiniLM-L6-v2 further from them"},
    )
    adapter: Literal["auto", "lora", "none"] = dataclasses.field(
        default="auto", metadata={"help": "'auto': LoRA when the model is bnb-quantized, else full fine-tuning"}
    )
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig, metadata={"help": "LoRA settings"})
    output_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "checkpoints, logs and the loss curve (default: a new temporary dir)"}
    )
    resume: bool = dataclasses.field(
        default=True, metadata={"help": "resume from the last checkpoint found in output_dir"}
    )
    embedding_loss: Literal["cosine", "mse"] = dataclasses.field(
        default="cosine",
        metadata={"help": "models without an LM head (sentence encoders): distance between the mean-pooled "
                  "embeddings of student and teacher, 1 - cosine or MSE"},
    )
    guard: bool = dataclasses.field(
        default=True,
        metadata={"help": "score the model before and after training on the held-out split and the recipe's "
                  "evaluation texts; if the saved form is further from the teacher on any of them (with alpha < 1: "
                  "and has a higher perplexity), restore the model from before training, warn, and say so in the "
                  "report and the card"},
    )
    guard_tolerance: float = dataclasses.field(
        default=0.01, metadata={"help": "relative worsening (of KL, or of 1 - embedding cosine) the guard accepts"}
    )

    def __post_init__(self):
        if self.student is not None and not isinstance(self.student, StudentConfig):
            if not isinstance(self.student, dict):
                self.fail("student", f"got {self.student!r}; expected null or a mapping with 'layers' or 'config'")
            self.student = StudentConfig.from_dict(self.student, where="key 'student'")
        if isinstance(self.data, dict):
            self.data = DataConfig.from_dict(self.data, where="key 'data'")
        elif isinstance(self.data, list):
            self.data = [d if isinstance(d, DataConfig) else DataConfig.from_dict(d, where=f"key 'data[{i}]'")
                         if isinstance(d, dict) else self.fail(f"data[{i}]", f"got {d!r}; expected a mapping")
                         for i, d in enumerate(self.data)]
        elif not isinstance(self.data, DataConfig):
            self.fail("data", f"got {self.data!r}; expected a mapping (one task) or a list of mappings")
        if self.guard_tolerance < 0:
            self.fail("guard_tolerance", f"got {self.guard_tolerance}; must be >= 0")
        if self.temperature <= 0:
            self.fail("temperature", f"got {self.temperature}; must be > 0")
        if not 0 <= self.alpha <= 1:
            self.fail("alpha", f"got {self.alpha}; must be between 0 and 1")
        if self.block_size < 2:
            self.fail("block_size", f"got {self.block_size}; must be >= 2")
        if not self.teacher:
            self.fail("teacher", "got an empty string; use 'original', 'previous' or a model path / id")
        if isinstance(self.data, list) and not self.data:
            self.fail("data", "got an empty list; give at least one task")
        names = [t.name for t in self.tasks if t.name is not None]
        if len(names) != len(set(names)):
            self.fail("data", f"task names must be unique; got {names}")
        self._check_training_args()

    @property
    def tasks(self) -> list[DataConfig]:
        return self.data if isinstance(self.data, list) else [self.data]

    def _check_training_args(self) -> None:
        fields = _training_arg_types()
        for key, value in list(self.training_args.items()):
            if key in RESERVED_TRAINING_ARGS:
                self.fail("training_args", f"'{key}' is set by the stage; use the stage option 'output_dir' for "
                          "the directory")
            if key not in fields:
                close = sorted(k for k in fields if k.startswith(key[:4]))[:5]
                self.fail("training_args", f"unknown TrainingArguments field '{key}'"
                          + (f"; similar: {', '.join(close)}" if close else ""))
            ok, converted = _training_value(value, fields[key])
            if not ok:
                self.fail("training_args", f"'{key}': got {value!r}; TrainingArguments expects "
                          f"{_describe_training_type(fields[key])}")
            self.training_args[key] = converted

    def resolved_training_args(self) -> dict[str, Any]:
        return {**DEFAULT_TRAINING_ARGS, **self.training_args}

    def snapshot_needed(self) -> str | None:
        return self.teacher if self.teacher in TEACHER_SNAPSHOTS else None

    def keeps_tensors(self, info: Any) -> bool:
        # On a quantized model only LoRA adapters train (the base is frozen, a merge rebuilds the bnb weights); a
        # student from a config or full fine-tuning writes into the weights.
        return info.quantized is not None and self.student is None and self.adapter != "none"


@functools.lru_cache(maxsize=1)
def _training_arg_types() -> dict[str, Any]:
    """Field name -> type hint of every `transformers.TrainingArguments` init field."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _enum_values(tp: Any) -> list[Any] | None:
    """The allowed values when ``tp`` is an Enum or a union holding one (``SchedulerType | str``), else ``None``."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
    return [m.value for e in enums for m in e] if enums else None


def _training_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the TrainingArguments hint ``tp``, and the value to pass (numeric strings -> float)."""
    origin = typing.get_origin(tp)
    allowed = _enum_values(tp)
    if allowed is not None and isinstance(value, str):
        return value in allowed, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _training_value(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value
        try:  # YAML reads "5e-5" (no dot) as a string
            return isinstance(value, str), float(value)
        except (TypeError, ValueError):
            return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin is list or tp is list:
        return isinstance(value, list), value
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return True, value  # a type this check does not model: TrainingArguments itself validates it


def _describe_training_type(tp: Any) -> str:
    allowed = _enum_values(tp)
    if allowed is not None:
        return "one of " + ", ".join(repr(v) for v in allowed)
    return _describe(tp)


# ---- checks against the model (run by the stage before anything trains, and by DistillStage.validate) -------------
def check_tasks(config: DistillConfig, architecture: str) -> None:
    """A sequence classifier cannot train on next-token tasks."""
    if CAUSAL_LM in [t.task for t in config.tasks] and architecture.endswith("ForSequenceClassification"):
        raise RecipeError(f"{architecture} is a sequence classifier; its data cannot include causal_lm tasks (use "
                          "task: sequence_classification)")


def uses_lora(config: DistillConfig, quantized: str | None) -> bool:
    """LoRA adapters for a bnb-quantized model (whose weights cannot be trained directly), or when asked."""
    bnb = quantized == "bitsandbytes"
    if bnb and config.adapter == "none":
        raise RecipeError("the model is bnb-quantized, so its weights cannot be fine-tuned directly; use adapter: "
                          "auto or lora (LoRA adapters, kept beside the quantized weights)")
    return config.adapter == "lora" or (config.adapter == "auto" and bnb)


def check_sources(config: DistillConfig) -> None:
    """Read the local data files and check the teacher's directory now, before anything expensive runs."""
    for task in config.tasks:
        if task.text not in ("calibration", "builtin"):
            check_text_source(task.text)
    if config.teacher not in TEACHER_SNAPSHOTS:
        check_model_source(config.teacher)


def check_student(config: DistillConfig, n_layers: int | None) -> int | None:
    """Refuse student layers the model does not have; return the student's layer count (``None``: unknown)."""
    student = config.student
    if student is None:
        return n_layers
    if student.layers is not None:
        if n_layers is not None and max(student.layers) >= n_layers:
            bad = [i for i in student.layers if i >= n_layers]
            raise RecipeError(f"key 'student': layers {bad} do not exist; the model has {n_layers} layers "
                              f"(0..{n_layers - 1})")
        return len(student.layers)
    if isinstance(student.keep, int):
        if n_layers is not None and student.keep > n_layers:
            raise RecipeError(f"key 'student': keep: {student.keep} layers, but the model has only {n_layers}")
        return student.keep
    if student.keep is not None:
        return max(1, round(student.keep * n_layers)) if n_layers is not None else None
    layers = (student.config or {}).get("num_hidden_layers")
    return layers if isinstance(layers, int) else None
