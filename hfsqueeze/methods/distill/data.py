"""Training data of the ``distill`` stage: tasks resolved to tokenized examples with a held-out split.

Causal-LM text is packed into ``block_size`` blocks; for a model without an LM head (a sentence encoder) it is cut
into paragraphs instead, each tokenized the way the encoder is used (with its special tokens, at most ``block_size``
tokens). The built-in texts (pydoc, ``builtin:generated``) train on their ``train`` split and hold out their ``eval``
split; any other source holds out every k-th document (``k = 1 / eval_fraction``), or the tail of the
tokens when it is a single document. Held-out examples are never trained on. Classification tables hold out every
k-th row. Several tasks are mixed into one training set by sampling each example's task by weight.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...core.data import BUILTIN, TABLE_SUFFIXES, builtin_text, load_texts, read_rows, token_blocks
from ...core.errors import RecipeError
from ...builtin.texts import GENERATED, generated_texts
from .config import CAUSAL_LM, SEQUENCE_CLASSIFICATION, DataConfig

IGNORE = -100


@dataclass
class TaskData:
    """One task's tokenized examples. An example is ``{"input_ids": list[int], "label": int}`` (-100 for LM)."""

    name: str
    kind: str
    weight: float
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def train_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.train)


def resolve_source(text: str, context: Any) -> Any:
    """Map a recipe's ``text`` to a source `load_texts` understands (``calibration`` and named dataset objects)."""
    extras = getattr(context, "extras", None) or {}
    if text == "calibration":
        return getattr(context, "calibration", BUILTIN) if context is not None else BUILTIN
    named = extras.get("datasets") or {}
    if text in named:
        return named[text]
    return text


def _every_kth(n: int, fraction: float) -> set[int]:
    k = max(2, round(1 / fraction))
    held = {i for i in range(n) if i % k == k - 1}
    return held or {n - 1}


def _split_texts(name: str, cfg: DataConfig, source: Any, tokenizer) -> tuple[list[str], list[str]]:
    """Training and held-out documents of a text source (see the module docstring)."""
    if source is None or (isinstance(source, str) and source == BUILTIN):
        return [builtin_text("train")], [builtin_text("eval")]
    if isinstance(source, str) and source == GENERATED:
        return generated_texts("train"), generated_texts("eval")
    docs = load_texts(source, split="train", column=cfg.column)
    if len(docs) >= 2:
        held = _every_kth(len(docs), cfg.eval_fraction)
        return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]
    train, held = _cut_text(docs[0], cfg.eval_fraction)
    n_train, n_held = (len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (train, held))
    if n_train < 2 or n_held < 2:
        raise RecipeError(f"task '{name}': the text is too short ({n_train + n_held} tokens) to hold out "
                          f"{cfg.eval_fraction:.0%} for evaluation; give a longer text")
    return [train], [held]


def _cut_text(text: str, fraction: float) -> tuple[str, str]:
    """One document as (train, held-out): the last ``fraction`` of its characters, cut at the paragraph break (else
    the whitespace) nearest to that point. The raw text is cut, not decoded tokens: an uncased tokenizer's decode
    would lowercase the text and lose the paragraph breaks that encoders train on."""
    point = int(len(text) * (1 - fraction))
    slack = len(text) * fraction / 2  # a cut this far from the point still holds out about ``fraction``
    for sep in ("\n\n", "\n", " "):
        before, after = text.rfind(sep, 0, point), text.find(sep, point)
        candidates = [i for i in (before, after) if 0 < i < len(text) - len(sep) and abs(i - point) <= slack]
        if candidates:
            cut = min(candidates, key=lambda i: abs(i - point))
            return text[:cut], text[cut + len(sep):]
    return text[:point], text[point:]


def paragraph_examples(tokenizer, texts: list[str], *, max_tokens: int, max_length: int) -> list[list[int]]:
    """Paragraphs (blank-line separated, over 20 characters) tokenized with the model's special tokens and cut to
    ``max_length``, up to ``max_tokens`` tokens: what a sentence encoder sees in use (and is scored on)."""
    out, used = [], 0
    for p in (p.strip() for t in texts for p in t.split("\n\n")):
        if len(p) <= 20:
            continue
        ids = tokenizer(" ".join(p.split()), truncation=True, max_length=max_length)["input_ids"]
        out.append(list(ids))
        used += len(ids)
        if used >= max_tokens:
            break
    return out


def _lm_task(name: str, cfg: DataConfig, source: Any, tokenizer, block_size: int, encoder: bool = False) -> TaskData:
    train_texts, eval_texts = _split_texts(name, cfg, source, tokenizer)
    if encoder:
        train = paragraph_examples(tokenizer, train_texts, max_tokens=cfg.max_tokens, max_length=block_size)
        held_out = paragraph_examples(tokenizer, eval_texts, max_tokens=cfg.eval_tokens, max_length=block_size)
    else:
        train = [row.tolist() for row in token_blocks(tokenizer, train_texts, max_tokens=cfg.max_tokens,
                                                      seq_len=block_size)]
        held_out = [row.tolist() for row in token_blocks(tokenizer, eval_texts, max_tokens=cfg.eval_tokens,
                                                         seq_len=block_size)]
    return TaskData(
        name=name, kind=CAUSAL_LM, weight=cfg.weight,
        train=[{"input_ids": ids, "label": IGNORE} for ids in train],
        eval=[{"input_ids": ids, "label": IGNORE} for ids in held_out],
    )


def _rows(source: Any) -> list[dict[str, Any]]:
    """Rows of a labelled table: a `datasets` object, or a local .json/.jsonl/.csv/.parquet file."""
    if not isinstance(source, (str, Path)):
        ds = source[list(source.keys())[0]] if hasattr(source, "keys") and not hasattr(source, "column_names") \
            else source
        return [dict(r) for r in ds]
    path = Path(source)
    if not path.is_file():
        raise RecipeError(f"classification data {str(source)!r} not found; give a local .json/.jsonl/.csv/.parquet "
                          "file or pass a dataset with compress(..., datasets={name: ds})")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise RecipeError(f"classification data {path} has suffix {path.suffix.lower()!r}; allowed: "
                          f"{', '.join(TABLE_SUFFIXES)}")
    return read_rows(path)


def _classification_task(name: str, cfg: DataConfig, source: Any, tokenizer, block_size: int) -> TaskData:
    rows = _rows(source)
    text_col = cfg.column or "text"
    if not rows or text_col not in rows[0] or cfg.label_column not in rows[0]:
        found = ", ".join(rows[0]) if rows else "no rows"
        raise RecipeError(f"task '{name}': classification data needs columns '{text_col}' and "
                          f"'{cfg.label_column}'; found: {found}")
    raw_labels = [r[cfg.label_column] for r in rows]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw_labels):
        label_names = [str(i) for i in range(max(raw_labels) + 1)]
        label_ids = raw_labels
    else:
        label_names = sorted({str(v) for v in raw_labels})
        label_ids = [label_names.index(str(v)) for v in raw_labels]
    if len(label_names) < 2:
        raise RecipeError(f"task '{name}': found {len(label_names)} distinct label(s); classification needs >= 2")
    held = _every_kth(len(rows), cfg.eval_fraction)
    train, held_out = [], []
    for i, (row, label) in enumerate(zip(rows, label_ids)):
        ids = tokenizer(str(row[text_col]), truncation=True, max_length=block_size)["input_ids"]
        (held_out if i in held else train).append({"input_ids": ids, "label": int(label)})
    return TaskData(name=name, kind=SEQUENCE_CLASSIFICATION, weight=cfg.weight, train=train, eval=held_out,
                    label_names=label_names)


def build_tasks(tasks: list[DataConfig], tokenizer, block_size: int, context: Any = None,
                encoder: bool = False) -> list[TaskData]:
    """Tokenize every task of a distill stage (see the module docstring for the held-out rules); ``encoder``: the
    model has no LM head, so text tasks are paragraphs rather than packed blocks."""
    out = []
    for i, cfg in enumerate(tasks, start=1):
        name = cfg.name or (f"task_{i}" if len(tasks) > 1 else cfg.task)
        source = resolve_source(cfg.text, context)
        if cfg.task == CAUSAL_LM:
            task = _lm_task(name, cfg, source, tokenizer, block_size, encoder)
        else:
            task = _classification_task(name, cfg, source, tokenizer, block_size)
        if not task.train or not task.eval:
            raise RecipeError(f"task '{name}': {len(task.train)} training and {len(task.eval)} held-out examples; "
                              "both must be non-empty (give more data)")
        out.append(task)
    return out


class MixedDataset(torch.utils.data.Dataset):
    """A fixed list of examples tagged with their task index, drawn by task weight with a seeded generator."""

    def __init__(self, tasks: list[TaskData], num_examples: int | None = None, seed: int = 0):
        if len(tasks) == 1 and num_examples is None:
            self.examples = [{**e, "task_id": 0} for e in tasks[0].train]
            return
        rng = random.Random(seed)
        total = num_examples or sum(len(t.train) for t in tasks)
        orders = [rng.sample(range(len(t.train)), len(t.train)) for t in tasks]
        cursors = [0] * len(tasks)
        weights = [t.weight for t in tasks]
        self.examples = []
        for _ in range(total):
            k = rng.choices(range(len(tasks)), weights=weights)[0]
            idx = orders[k][cursors[k] % len(orders[k])]
            cursors[k] += 1
            self.examples.append({**tasks[k].train[idx], "task_id": k})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


def eval_examples(task: TaskData, task_id: int) -> list[dict[str, Any]]:
    return [{**e, "task_id": task_id} for e in task.eval]


class Collator:
    """Right-pads a list of examples into ``input_ids``, ``attention_mask``, ``task_ids`` and ``class_labels``."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, : len(e["input_ids"])] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "task_ids": torch.tensor([e["task_id"] for e in batch], dtype=torch.long),
            "class_labels": torch.tensor([e["label"] for e in batch], dtype=torch.long),
        }


def pad_token_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
