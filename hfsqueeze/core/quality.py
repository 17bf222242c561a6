"""The one implementation of output quality: log-probabilities, NLL / perplexity, KL(reference || model), top-1
agreement, and mean-pooled embeddings with their cosine.

Every quality number hfsqueeze reports or optimizes comes from here: the report (`evaluation.measure`), tune's trials
and per-module sensitivities, prune's ``kl`` importance, and distill's quality points, guard and held-out
evaluation. So batching, device placement (inputs go to `core.hf.input_device` through `to_device`; kept references
go to the CPU), ``no_grad``, eval mode and memory (vocabulary-sized tensors are normalized and compared a few
positions at a time; only one batch's log-probabilities exist at once) are handled once.

Conventions: position ``t`` of a block predicts token ``t + 1`` (a block of ``T`` tokens has ``T - 1`` predictions
for the NLL); KL and top-1 are taken over every position (``T`` per block); with an ``attention_mask`` only the
positions (and, for the NLL, the targets) whose mask is 1 count.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .hf import eval_mode, to_device
from .utils import progress

__all__ = [
    "CHUNK_POSITIONS",
    "LMScore",
    "REFERENCE_DTYPE",
    "compare",
    "cosine",
    "logprobs",
    "nll",
    "pooled_embeddings",
    "score_lm",
]

# Reference log-probabilities are kept in float16: half the memory of fp32 (they are `tokens x vocab`, 768 MiB in
# fp32 at 4096 tokens and a 49k vocabulary). fp16 represents log-probabilities down to -65504 with a relative error of
# 2^-11, so the KL computed from them (in fp32) moves by far less than the differences it reports; bf16 (2^-8) would
# not (measured: see tests/test_api.py).
REFERENCE_DTYPE = torch.float16
# Positions per chunk when normalizing or comparing vocabulary-sized outputs (64 x 49k fp32 = 12 MiB).
CHUNK_POSITIONS = 64

# Token blocks: a ``[N, T]`` tensor, or sequences of different lengths (lists of ids or 1-D tensors), run one by one.
Blocks = Union[torch.Tensor, Sequence[Union[Sequence[int], torch.Tensor]]]


@torch.no_grad()
def logprobs(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 log-probabilities ``[B, T, V]`` of a causal LM on ``ids`` ``[B, T]`` (``[T, V]`` for ``ids`` ``[T]``).

    The logits are normalized in place a few positions at a time: they are the only vocabulary-sized tensor
    (``log_softmax`` would allocate a second one, and its internals a third). They stay on the device the head put
    them on.
    """
    single = ids.dim() == 1
    batch = ids.unsqueeze(0) if single else ids
    kwargs = {"input_ids": to_device(batch, model), "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = to_device(attention_mask.unsqueeze(0) if single else attention_mask, model)
    logits = model(**kwargs).logits.float().contiguous()  # a copy only for a 16-bit model or a strided head
    for rows in logits.view(-1, logits.shape[-1]).split(CHUNK_POSITIONS):
        rows -= torch.logsumexp(rows, dim=-1, keepdim=True)
    return logits[0] if single else logits


@torch.no_grad()
def nll(logprobs: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[float, int]:
    """``(summed negative log-likelihood of the next tokens, number of predictions)`` for ``logprobs`` ``[..., T, V]``
    of ``ids`` ``[..., T]``; with ``attention_mask`` only targets whose mask is 1 count."""
    targets = ids[..., 1:].to(logprobs.device)  # the head may sit on another device than the embeddings
    picked = logprobs[..., :-1, :].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if attention_mask is None:
        return -picked.sum().item(), picked.numel()
    keep = attention_mask[..., 1:].to(picked.device).bool()
    return -picked[keep].sum().item(), int(keep.sum())


@torch.no_grad()
def compare(reference: torch.Tensor, logprobs: torch.Tensor) -> tuple[float, int]:
    """``(KL(reference || logprobs) summed over positions, positions whose top-1 token agrees)``.

    Computed in fp32 a few positions at a time, so no vocabulary-sized temporary of the whole block is made;
    ``reference`` may be kept in `REFERENCE_DTYPE` and on another device (the CPU).
    """
    vocab = logprobs.shape[-1]
    kl, agree = 0.0, 0
    refs, news = reference.reshape(-1, vocab), logprobs.reshape(-1, vocab)
    for ref, new in zip(refs.split(CHUNK_POSITIONS), news.split(CHUNK_POSITIONS)):
        ref = ref.to(new.device).float()
        kl += (ref.exp() * (ref - new)).sum().item()
        agree += int((ref.argmax(-1) == new.argmax(-1)).sum())
    return kl, agree


def _compact(logprobs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``logprobs`` as a kept reference: in ``dtype``, on the CPU, with no ``-inf`` (fp16 turns log-probabilities
    below -65504 into ``-inf``, and ``exp(-inf) * (-inf - x)`` would make the KL NaN; the floor contributes 0)."""
    kept = logprobs.to(device="cpu", dtype=dtype)
    return kept.clamp_(min=torch.finfo(dtype).min)


def _batches(blocks: Blocks, attention_mask: torch.Tensor | None, batch_size: int):
    """``(rows [b, T], mask [b, T] or None)``: ``batch_size`` rows of a tensor at a time, sequences one by one."""
    if isinstance(blocks, torch.Tensor):
        for start in range(0, blocks.shape[0], batch_size):
            mask = attention_mask[start:start + batch_size] if attention_mask is not None else None
            yield blocks[start:start + batch_size], mask
        return
    for i, ids in enumerate(blocks):
        mask = attention_mask[i].unsqueeze(0) if attention_mask is not None else None
        yield torch.as_tensor(ids, dtype=torch.long).reshape(1, -1), mask


def _count(blocks: Blocks) -> int:
    return blocks.shape[0] if isinstance(blocks, torch.Tensor) else len(blocks)


@dataclasses.dataclass
class LMScore:
    """Sums over token blocks: NLL of the next tokens, KL to a reference and top-1 agreement with it.

    Attributes:
        nll (`float`): summed negative log-likelihood of every predicted token.
        predicted (`int`): the tokens predicted (``T - 1`` per block, the masked ones left out).
        kl (`float`): summed KL(reference || model) per position (0 without a reference).
        agree (`int`): positions whose top-1 token agrees with the reference's.
        tokens (`int`): the positions scored (``T`` per block, the masked ones left out).
        reference (`list[torch.Tensor]`): the kept log-probabilities ``[T, V]`` of each block's real positions
            (``keep``), on the CPU.
    """

    nll: float = 0.0
    predicted: int = 0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    reference: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def mean_nll(self) -> float:
        """NLL per predicted token (nats)."""
        return self.nll / max(self.predicted, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def kl_per_token(self) -> float:
        return self.kl / max(self.tokens, 1)

    @property
    def top1(self) -> float:
        return self.agree / max(self.tokens, 1)

    def add(self, other: LMScore) -> LMScore:
        """Add ``other``'s sums (and kept references) to these; returns ``self``."""
        self.nll, self.predicted, self.kl = self.nll + other.nll, self.predicted + other.predicted, self.kl + other.kl
        self.agree, self.tokens = self.agree + other.agree, self.tokens + other.tokens
        self.reference.extend(other.reference)
        return self


@torch.no_grad()
def score_lm(model: nn.Module, blocks: Blocks, reference: Sequence[torch.Tensor] | None = None, *,
             attention_mask: torch.Tensor | None = None, keep: torch.dtype | None = None, batch_size: int = 1,
             desc: str | None = None) -> LMScore:
    """NLL, and against ``reference`` KL and top-1 agreement, of a causal LM on token blocks, in eval mode.

    Only one batch's log-probabilities exist at a time: the sums are taken and the batch is dropped, unless ``keep``
    asks to keep them as a reference for later comparisons.

    Args:
        model (`nn.Module`): a causal LM (inputs go to its input device).
        blocks (`torch.Tensor` or sequences): token blocks ``[N, T]``, or sequences of different lengths (run one by
            one).
        reference (`Sequence[torch.Tensor]`, *optional*): the reference's log-probabilities ``[T, V]`` of the real
            positions of each block (as `LMScore.reference` keeps them); without it, no KL / top-1 (``kl`` and
            ``agree`` stay 0).
        attention_mask (`torch.Tensor`, *optional*): ``[N, T]``, 1 for real tokens (right padding).
        keep (`torch.dtype`, *optional*): keep each block's log-probabilities, in this dtype, on the CPU
            (`REFERENCE_DTYPE` for a reference held through a whole run).
        batch_size (`int`, defaults to 1): blocks per forward.
        desc (`str`, *optional*): label of a progress bar over the batches (none without it).

    Example:

    ```python
    >>> base = score_lm(original, blocks, keep=REFERENCE_DTYPE)
    >>> new = score_lm(compressed, blocks, base.reference)
    >>> new.perplexity, new.kl_per_token, new.top1
    ```
    """
    score = LMScore()
    batches = _batches(blocks, attention_mask, batch_size)
    if desc is not None:
        batches = progress(batches, desc=desc, total=-(-_count(blocks) // batch_size))
    index = 0
    with eval_mode(model):
        for rows, mask in batches:
            lp = logprobs(model, rows, mask)
            s, n = nll(lp, rows, mask)
            score.nll, score.predicted = score.nll + s, score.predicted + n
            score.tokens += rows.numel() if mask is None else int(mask.sum())
            for j in range(rows.shape[0]):
                row = lp[j] if mask is None else lp[j][mask[j].to(lp.device).bool()]  # real positions only
                if reference is not None:
                    kl, agree = compare(reference[index + j], row)
                    score.kl, score.agree = score.kl + kl, score.agree + agree
                if keep is not None:
                    score.reference.append(_compact(row, keep))
            index += rows.shape[0]
            del lp  # the next forward's logits take its place
    return score


def _last_hidden(outputs) -> torch.Tensor:
    """The model's own last hidden state, or the last of ``hidden_states`` for heads that return no such field."""
    hidden = getattr(outputs, "last_hidden_state", None)
    return hidden if hidden is not None else outputs.hidden_states[-1]


@torch.no_grad()
def pooled_embeddings(model: nn.Module, ids: Blocks, attention_mask: torch.Tensor | None = None, *,
                      batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states ``[N, H]`` (fp32, on the CPU), in eval mode; padding (mask 0) is left out.

    ``ids`` is ``[N, T]`` (run ``batch_size`` rows at a time) or sequences of different lengths (one by one); without
    ``attention_mask`` every token counts.
    """
    out = []
    with eval_mode(model):
        for rows, mask in _batches(ids, attention_mask, batch_size):
            mask = torch.ones_like(rows) if mask is None else mask
            # Heads without a `last_hidden_state` (a masked-LM student) give their states only when asked.
            outputs = model(input_ids=to_device(rows, model), attention_mask=to_device(mask, model),
                            output_hidden_states=True)
            hidden = _last_hidden(outputs).float()
            m = mask.to(hidden.device).unsqueeze(-1).to(hidden.dtype)  # the last layer may sit on another device
            out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1.0)).cpu())
    return torch.cat(out)


def cosine(reference: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[N]`` of each row of ``embeddings`` to the same row of ``reference`` (in fp32)."""
    return F.cosine_similarity(reference.to(embeddings.device).float(), embeddings.float(), dim=-1)
