"""The distill script under a real two-process launcher (torchrun, DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hfsqueeze.methods.distill import losses
from distillkit import tiny_llama

warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them ~4x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REPO = Path(__file__).resolve().parents[3]


# ---- scripts under a real two-process launcher ----------------------------------------------------------------------


@pytest.mark.slow
def test_distill_script_runs_two_processes_with_torchrun(tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_llama(2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "evaluation: {max_tokens: 256, seq_len: 128, latency: false, disk_size: false}\n"
        "stages:\n  - method: distill\n    block_size: 64\n"
        "    data: {text: builtin, max_tokens: 12000, eval_tokens: 1024}\n"
        "    training_args: {max_steps: 4, per_device_train_batch_size: 2, learning_rate: 1.0e-3}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HFSQUEEZE_DISABLE_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "scripts" / "distill.py"), "--model", str(model_dir), "--recipe", str(recipe),
           "--output", str(tmp_path / "out"), "--report-json", str(tmp_path / "report.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    d = json.loads((tmp_path / "report.json").read_text())["stages"][0]["details"]
    assert d["world_size"] == 2 and d["steps"] == 4
    assert d["tokens_seen"] == 4 * 2 * 2 * 64  # steps x per-device batch x processes x block
    assert "world size 2" in proc.stdout
    assert (tmp_path / "out" / "config.json").is_file()


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
