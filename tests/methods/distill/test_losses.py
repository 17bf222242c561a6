"""Distillation losses, checked against values computed by hand and against autograd."""

from __future__ import annotations

import math

import pytest
import torch

from hfsqueeze.methods.distill import losses
from distillkit import IDS, tiny_llama
from distillkit import _one_thread  # noqa: F401  (autouse: one torch thread per module)




# ---- losses, checked against values computed by hand ---------------------------------------------------------------


def test_kd_loss_matches_hand_computed_kl_with_temperature_scaling():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2).
    expected_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    # float32, computed as cross-entropy minus the teacher's entropy: the difference of two numbers near 0.6 keeps
    # ~1e-7 absolute, and exp/log kernels differ between CPUs (AVX512 or not), so the bound is absolute.
    assert losses.kd_loss(student, teacher, 1.0).item() == pytest.approx(expected_t1, rel=1e-5, abs=1e-6)
    # T = 2: teacher logits halve, p_t = (sqrt3, 1) / (sqrt3 + 1); the KL is scaled by T^2 = 4.
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    expected_t2 = 4 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    assert losses.kd_loss(student, teacher, 2.0).item() == pytest.approx(expected_t2, rel=1e-5, abs=1e-6)
    assert losses.kd_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_mask_averages_only_counted_positions():
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[math.log(3.0), 0.0], [5.0, -5.0]]])
    first_only = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert losses.kd_loss(student, teacher, 1.0, torch.tensor([[1, 0]])).item() == pytest.approx(first_only, abs=1e-6)
    assert losses.kd_loss(student, teacher, 1.0).item() == pytest.approx(first_only / 2, abs=1e-6)
    with pytest.raises(ValueError, match="vocabularies"):
        losses.kd_loss(student, teacher[..., :1])


def test_causal_lm_loss_equals_transformers_loss():
    model = tiny_llama(2)
    with torch.no_grad():
        out = model(input_ids=IDS, labels=IDS)
    assert losses.causal_lm_loss(out.logits, IDS).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_hidden_state_and_attention_losses_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[0.0, 1.0], [0.0, 2.0]]])
    # MSE over the width: position 0 -> (1 + 1) / 2 = 1, position 1 -> 0; mean 0.5.
    assert losses.hidden_state_loss([s], [t]).item() == pytest.approx(0.5)
    assert losses.hidden_state_loss([s], [t], mask=torch.tensor([[0, 1]])).item() == pytest.approx(0.0)
    # cosine: orthogonal -> 1, parallel -> 0.
    assert losses.hidden_state_loss([s], [t], kind="cosine").item() == pytest.approx(0.5)
    double = torch.nn.Linear(2, 2, bias=False)
    double.weight.data = torch.eye(2) * 2
    assert losses.hidden_state_loss([s / 2], [s], [double]).item() == pytest.approx(0.0)
    # attention: one head, rows (1/2, 1/2) vs teacher (1, 0) -> KL = log 2 on the first query; causal row 2 equal.
    s_att = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])
    t_att = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    assert losses.attention_loss([s_att], [t_att]).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    # head averaging: a 2-head teacher whose mean equals the 1-head student gives 0.
    t_two = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]]])
    assert losses.attention_loss([s_att], [t_two]).item() == pytest.approx(0.0, abs=1e-6)


def test_combine_losses_weights():
    kd, hard = torch.tensor(2.0), torch.tensor(4.0)
    assert losses.combine_losses(alpha=0.25, hard=hard, kd=kd).item() == pytest.approx(0.25 * 2 + 0.75 * 4)
    assert losses.combine_losses(alpha=0.25, hard=None, kd=kd).item() == pytest.approx(2.0)
    assert losses.combine_losses(alpha=0.25, hard=hard, kd=None).item() == pytest.approx(4.0)


def test_kd_loss_gradient_is_the_written_out_kl_gradient():
    torch.manual_seed(0)
    student, teacher, mask = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    for temperature in (1.0, 2.0):
        s = student.clone().requires_grad_(True)
        losses.kd_loss(s, teacher, temperature, mask).backward()
        r = student.clone().requires_grad_(True)
        log_t = torch.log_softmax(teacher / temperature, -1)
        kl = (log_t.exp() * (log_t - torch.log_softmax(r / temperature, -1))).sum(-1)
        ((kl * mask).sum() / mask.sum() * temperature**2).backward()
        torch.testing.assert_close(s.grad, r.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_value_and_gradient_match_autograd_and_keep_no_extra_vocabulary_tensor(dtype):
    # The chunked KD loss equals F.cross_entropy through autograd (value and gradient), and its backward keeps no
    # vocabulary-sized tensor besides the student's logits and the teacher's probabilities (autograd through
    # cross_entropy keeps s/T and its log-softmax too: 200 MB each at 4 x 256 positions of a 49k vocabulary).
    import torch.nn.functional as F

    torch.manual_seed(0)
    vocab = 300
    student = (torch.randn(2, 70, vocab) * 3).to(dtype).requires_grad_(True)
    teacher = torch.randn(2, 70, vocab) * 3
    mask = torch.ones(2, 70)
    mask[1, 50:] = 0
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = losses.kd_loss(student, teacher, 2.0, mask)
    loss.backward()
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= student.numel()}
    assert big <= {student.untyped_storage().data_ptr()} | {t.untyped_storage().data_ptr() for t in saved
                                                            if t.dtype == torch.float32 and not t.requires_grad}
    assert len(big - {student.untyped_storage().data_ptr()}) == 1  # the teacher's probabilities

    reference = student.detach().clone().requires_grad_(True)
    log_t = F.log_softmax(teacher / 2.0, dim=-1)
    cross = F.cross_entropy((reference.float() / 2.0).reshape(-1, vocab), log_t.exp().reshape(-1, vocab),
                            reduction="none").view(2, 70)
    expected = ((cross + (log_t.exp() * log_t).sum(-1)) * mask).sum() / mask.sum() * 4.0
    expected.backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert loss.item() == pytest.approx(expected.item(), rel=tolerance)
    assert torch.allclose(student.grad.float(), reference.grad.float(), rtol=tolerance, atol=1e-6)


def test_a_logged_hard_loss_works_a_sequence_at_a_time_with_the_same_value(monkeypatch):
    # With alpha 1 the hard loss is only logged: no vocabulary-sized copy of the whole batch's logits (and its
    # log-softmax) beside the logits, which were the peak of a recovery step; the value is the batched one exactly.
    import torch.nn.functional as F

    torch.manual_seed(0)
    logits, ids = torch.randn(3, 20, 50), torch.randint(0, 50, (3, 20))
    mask = torch.ones(3, 20)
    mask[1, 12:] = 0
    targets = ids[:, 1:]
    batched = losses._masked_mean(F.cross_entropy(logits[:, :-1].reshape(-1, 50), targets.reshape(-1),
                                                  reduction="none").view_as(targets), mask[:, 1:])
    rows, real = [], F.cross_entropy
    monkeypatch.setattr(losses.F, "cross_entropy", lambda x, *a, **k: rows.append(x.shape[0]) or real(x, *a, **k))
    with torch.no_grad():
        logged = losses.causal_lm_loss(logits, ids, mask)
    assert torch.equal(logged, batched) and rows and max(rows) == 19
