"""What recovery did, measured where it matters: before training, after training, and in the form that is saved.

Each evaluation set is a list of token blocks: the held-out split of every language-modelling task (never trained on)
and every evaluation text of the recipe (``evaluation.text``; e.g. ``builtin:bible``, prose the recovery never sees).
A causal LM is scored by KL(teacher || model) per token and perplexity; an encoder by the mean cosine similarity of
its mean-pooled embeddings to the teacher's. `regressions` compares the saved form with the model before training,
so the stage can keep the better one (see ``DistillConfig.guard``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...core.data import load_texts, token_blocks
from ...core.quality import REFERENCE_DTYPE, cosine, pooled_embeddings, score_lm
from .data import CAUSAL_LM, TaskData

LM = "lm"
EMBEDDING = "embedding"
# Paragraphs longer than this are cut when an encoder is scored (sentence-embedding models are used on short text).
ENCODER_MAX_TOKENS = 128


@dataclasses.dataclass
class EvalSet:
    """Token blocks (causal LM) or paragraphs (encoder) scored at every point, with the teacher's outputs cached."""

    label: str
    inputs: list[list[int]]
    kind: str = LM
    teacher_outputs: list[torch.Tensor] | None = None

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.inputs)


def _text_set(label: str, source: Any, tokenizer, kind: str, block_size: int, max_tokens: int) -> EvalSet:
    texts = load_texts(source, split="eval")
    if kind == LM:
        blocks = token_blocks(tokenizer, texts, max_tokens=max_tokens, seq_len=block_size)
        return EvalSet(label, [row.tolist() for row in blocks], LM)
    paragraphs, used = [], 0
    for p in (p.strip() for t in texts for p in t.split("\n\n")):
        if len(p) <= 20:
            continue
        ids = tokenizer(p, truncation=True, max_length=min(block_size, ENCODER_MAX_TOKENS))["input_ids"]
        paragraphs.append(ids)
        used += len(ids)
        if used >= max_tokens:
            break
    return EvalSet(label, paragraphs, EMBEDDING)


def evaluation_sets(tasks: list[TaskData], texts: dict[str, Any], tokenizer, *, encoder: bool, block_size: int,
                    max_tokens: int) -> list[EvalSet]:
    """The held-out split of each LM task (``held-out: <task>``) and each evaluation text, by label."""
    kind = EMBEDDING if encoder else LM
    sets = [EvalSet(f"held-out: {t.name}", [e["input_ids"] for e in t.eval], kind)
            for t in tasks if t.kind == CAUSAL_LM]
    for label, source in texts.items():
        sets.append(_text_set(label, source, tokenizer, kind, block_size, max_tokens))
    return [s for s in sets if s.inputs]


def _teacher_outputs(teacher: nn.Module, s: EvalSet) -> list[torch.Tensor]:
    if s.teacher_outputs is None:
        # Vocabulary-sized log-probabilities are kept in 16-bit (a 2k-token set of a 49k vocabulary is 200 MB).
        s.teacher_outputs = (score_lm(teacher, s.inputs, keep=REFERENCE_DTYPE).reference if s.kind == LM
                             else [pooled_embeddings(teacher, s.inputs)])
    return s.teacher_outputs


def score(model: nn.Module, teacher: nn.Module, sets: list[EvalSet]) -> dict[str, dict[str, float]]:
    """Quality of ``model`` on every set: ``kl_divergence`` and ``perplexity``, or ``embedding_cosine``."""
    out = {}
    for s in sets:
        refs = _teacher_outputs(teacher, s)
        if s.kind == EMBEDDING:
            cos = cosine(refs[0], pooled_embeddings(model, s.inputs))
            out[s.label] = {"embedding_cosine": round(cos.mean().item(), 5)}
            continue
        lm = score_lm(model, s.inputs, refs)
        out[s.label] = {"kl_divergence": round(lm.kl_per_token, 5), "perplexity": round(lm.perplexity, 4)}
    return out


def _distance(metrics: dict[str, float]) -> float | None:
    """Lower is better: KL to the teacher, or 1 - embedding cosine."""
    if "kl_divergence" in metrics:
        return metrics["kl_divergence"]
    if "embedding_cosine" in metrics:
        return 1.0 - metrics["embedding_cosine"]
    return None


def _worse(before: float, after: float, tolerance: float, lower_is_better: bool = True) -> bool:
    if not lower_is_better:
        before, after = -before, -after
    return after > before + abs(before) * tolerance + 1e-6


def regressions(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], tolerance: float, *,
                fit_text: bool = False) -> list[str]:
    """One line per set on which ``after`` is worse than ``before`` (beyond ``tolerance``, relative).

    Worse means further from the teacher (higher KL, lower embedding cosine). With ``fit_text`` (the hard loss is on,
    ``alpha < 1``: the recipe also asks to fit its text) a causal LM must also have a higher perplexity to count.
    """
    found = []
    for label, b in before.items():
        a = after.get(label) or {}
        if "embedding_cosine" in b and "embedding_cosine" in a:
            if _worse(1.0 - b["embedding_cosine"], 1.0 - a["embedding_cosine"], tolerance):
                found.append(f"{label}: embedding cosine to the teacher {b['embedding_cosine']:.4f} -> "
                             f"{a['embedding_cosine']:.4f}")
            continue
        if "kl_divergence" not in b or "kl_divergence" not in a:
            continue
        kl_worse = _worse(b["kl_divergence"], a["kl_divergence"], tolerance)
        ppl_worse = _worse(b["perplexity"], a["perplexity"], tolerance)
        if kl_worse and (ppl_worse or not fit_text):
            found.append(f"{label}: KL to the teacher {b['kl_divergence']:.4f} -> {a['kl_divergence']:.4f}, "
                         f"perplexity {b['perplexity']:.2f} -> {a['perplexity']:.2f}")
    return found
