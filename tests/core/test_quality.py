"""The quality kernel (`hfsqueeze.core.quality`) on tiny models: NLL, KL, top-1, pooled embeddings and cosine."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny

from hfsqueeze.core.quality import REFERENCE_DTYPE, LMScore, cosine, logprobs, pooled_embeddings, score_lm


def _blocks(n: int = 3, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, 400, (n, length), generator=torch.Generator().manual_seed(seed))


def test_a_model_against_itself_has_zero_kl_and_full_agreement():
    model, blocks = make_tiny("llama"), _blocks()
    base = score_lm(model, blocks, keep=torch.float32)
    again = score_lm(model, blocks, base.reference)
    assert again.kl_per_token == pytest.approx(0.0, abs=1e-6) and again.top1 == 1.0
    assert again.tokens == blocks.numel() and again.predicted == blocks.numel() - blocks.shape[0]
    assert again.perplexity == pytest.approx(base.perplexity) and base.kl == 0.0 and base.agree == 0


def test_nll_is_the_next_token_cross_entropy():
    model, blocks = make_tiny("gpt2"), _blocks()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits.float()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                               reduction="sum").item()
    score = score_lm(model, blocks)
    assert score.nll == pytest.approx(expected, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(expected / (blocks.numel() - blocks.shape[0])), rel=1e-5)


def test_kl_and_top1_match_a_hand_computation():
    model, blocks = make_tiny("llama"), _blocks()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    ref = [logprobs(model, b) for b in blocks]
    new = [logprobs(other, b) for b in blocks]
    kl = sum(F.kl_div(n, r, log_target=True, reduction="sum").item() for r, n in zip(ref, new))
    top1 = sum(int((r.argmax(-1) == n.argmax(-1)).sum()) for r, n in zip(ref, new))
    score = score_lm(other, blocks, ref)
    assert score.kl > 0 and score.kl == pytest.approx(kl, rel=1e-5) and score.agree == top1


def test_batched_equals_unbatched():
    model, blocks = make_tiny("llama"), _blocks(n=5)
    one = score_lm(model, blocks, keep=torch.float32, batch_size=1)
    three = score_lm(model, blocks, one.reference, keep=torch.float32, batch_size=3)
    assert len(three.reference) == len(one.reference) == 5
    assert three.nll == pytest.approx(one.nll, rel=1e-5) and three.kl == pytest.approx(0.0, abs=1e-4)
    for a, b in zip(one.reference, three.reference):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_padding_under_the_mask_changes_nothing():
    # Sequences of different lengths run one by one equal the same sequences right-padded into one masked batch.
    model = make_tiny("llama")
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18]]
    ids = torch.full((3, 6), 2, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    plain = score_lm(model, seqs, keep=torch.float32)
    padded = score_lm(model, ids, plain.reference, attention_mask=mask, batch_size=3)
    assert (padded.tokens, padded.predicted) == (plain.tokens, plain.predicted) == (14, 11)
    assert padded.nll == pytest.approx(plain.nll, rel=1e-5)
    assert padded.kl == pytest.approx(0.0, abs=1e-4) and padded.agree == 14


def test_reference_is_kept_compact_on_the_cpu_and_never_infinite():
    # Logits ~1e5 apart give log-probabilities below fp16's range: kept as -inf, the KL against them would be NaN.
    model, blocks = make_tiny("llama"), _blocks(n=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    base = score_lm(model, blocks, keep=REFERENCE_DTYPE)
    assert {(r.dtype, r.device.type) for r in base.reference} == {(REFERENCE_DTYPE, "cpu")}
    assert all(bool(torch.isfinite(r).all()) for r in base.reference)
    again = score_lm(model, blocks, base.reference)
    assert math.isfinite(again.kl) and again.top1 == 1.0


def test_a_bf16_model_is_scored_in_fp32():
    model, blocks = make_tiny("llama"), _blocks()
    base = score_lm(model, blocks, keep=torch.float32)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert logprobs(half, blocks[0]).dtype == torch.float32
    score = score_lm(half, blocks, base.reference)
    assert math.isfinite(score.kl) and 0 <= score.kl_per_token < 0.05 and score.top1 > 0.5
    assert score.perplexity == pytest.approx(base.perplexity, rel=0.05)


def test_eval_mode_is_used_and_the_mode_is_given_back():
    model, blocks = make_tiny("gpt2"), _blocks()  # GPT-2's dropout makes train-mode outputs random
    expected = score_lm(model, blocks)
    model.train()
    assert score_lm(model, blocks).nll == pytest.approx(expected.nll, rel=1e-6)
    assert model.training


def test_scores_add_up():
    model, blocks = make_tiny("llama"), _blocks(n=4)
    whole = score_lm(model, blocks, keep=torch.float32)
    parts = score_lm(model, blocks[:1], keep=torch.float32).add(score_lm(model, blocks[1:], keep=torch.float32))
    assert isinstance(parts, LMScore) and len(parts.reference) == 4
    assert (parts.tokens, parts.predicted) == (whole.tokens, whole.predicted)
    assert parts.nll == pytest.approx(whole.nll, rel=1e-6)


def test_pooled_embeddings_of_identical_models_have_cosine_one_and_ignore_padding():
    model, twin = make_tiny("bert"), make_tiny("bert")
    ids = _blocks(n=3, length=10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    a, b = pooled_embeddings(model, ids, mask), pooled_embeddings(twin, ids, mask, batch_size=2)
    assert a.shape == (3, 64) and a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(cosine(a, b), torch.ones(3))
    # The padded row pools its six real tokens only: the same as that sentence alone.
    alone = pooled_embeddings(model, [ids[1, :6].tolist()])
    torch.testing.assert_close(a[1:2], alone, atol=1e-5, rtol=1e-5)
    # Without a mask every token counts: the plain mean of the last hidden state.
    with torch.no_grad():
        mean = model(input_ids=ids).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(pooled_embeddings(model, ids), mean, atol=1e-5, rtol=1e-5)
