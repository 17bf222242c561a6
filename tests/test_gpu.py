"""On a CUDA GPU: every method on a tiny model placed three ways, saved on the GPU and reloaded on the CPU with parity.

Marked ``gpu``: skipped without CUDA (tests/conftest.py). Run them with ``pytest -m gpu tests/test_gpu.py``, or
through ``scripts/gpu_check.sh``, which also runs each method on the real SmolLM2 and compares with the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_EVAL, make_tiny

import hfsqueeze
from hfsqueeze.artifact.parity import check_saved_parity, verify_parity
from hfsqueeze.core.hf import input_device
from hfsqueeze.models import load_model

pytestmark = pytest.mark.gpu

EVAL = {**SMALL_EVAL, "text": "builtin"}  # the built-in text ships with hfsqueeze: no network on a GPU machine
DISTILL = {"method": "distill", "teacher": "original", "alpha": 1.0,
           "data": {"text": "calibration", "eval_tokens": 256}, "block_size": 64, "freeze_embeddings": True,
           "adapter": "lora", "lora": {"r": 4, "alpha": 8, "merge": "auto"},
           "training_args": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3}}
RECIPES = {
    "int8": [{"method": "quantize", "bits": 8}],
    "nf4": [{"method": "quantize", "bits": 4, "quant_type": "nf4"}],
    "bf16": [{"method": "quantize", "bits": 16, "dtype": "bf16"}],
    "prune": [{"method": "prune", "ffn": 0.25, "scope": "layerwise", "importance": "gradient", "reconstruct": True,
               "calibration_tokens": 512, "seq_len": 64}],
    "distill-int8": [{"method": "quantize", "bits": 8}, DISTILL],
}
PLACEMENTS = ["to-cuda", "device_map-cuda", "device_map-auto"]


def _placed(placement: str, tmp_path, tokenizer):
    """The tiny Llama on the GPU: moved with ``.to("cuda")``, or loaded with ``device_map="cuda"`` / ``"auto"``."""
    if placement == "to-cuda":
        return make_tiny("llama").to("cuda")
    path = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    model, _ = load_model(path, device_map=placement.split("-", 1)[1])
    return model


def _bnb_modules_on_cuda(model) -> int:
    """bitsandbytes modules whose quantized weight (and its scales) sit on CUDA; fails on one left on the CPU."""
    found = 0
    for module in model.modules():
        name = type(module).__name__
        if name not in ("Linear8bitLt", "Linear4bit"):
            continue
        found += 1
        assert module.weight.device.type == "cuda", name
        if name == "Linear8bitLt":
            assert module.weight.dtype == torch.int8 and module.weight.SCB.device.type == "cuda"
        else:
            assert module.weight.quant_state.absmax.device.type == "cuda"
    return found


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("method", list(RECIPES))
def test_method_on_cuda_saves_and_reloads_on_cpu_with_parity(method, placement, tiny_tokenizer, tmp_path):
    model = _placed(placement, tmp_path, tiny_tokenizer)
    assert input_device(model).type == "cuda"
    report = model.compress({"stages": RECIPES[method], "evaluation": EVAL}, tokenizer=tiny_tokenizer)
    assert input_device(model).type == "cuda"  # nothing moved the model off the GPU
    if "bits" in RECIPES[method][0] and RECIPES[method][0]["bits"] < 16:
        assert _bnb_modules_on_cuda(model) > 0
    final = report.final
    assert final.kl_divergence is not None and 0 <= final.kl_divergence < 5 and final.perplexity > 1
    assert final.prefill_ms_per_token > 0 and final.decode_ms_per_token > 0  # timed with synchronize
    assert report.environment["device"].startswith("cuda")

    out = hfsqueeze.save_compressed(model, tmp_path / "artifact", tokenizer=tiny_tokenizer)
    on_gpu = hfsqueeze.load_compressed(out, device_map="cuda")  # same kind of device: the default tolerance
    assert input_device(on_gpu).type == "cuda"
    cpu = hfsqueeze.load_compressed(out, check_parity=False)
    assert input_device(cpu).type == "cpu"
    result = check_saved_parity(cpu, out)  # recorded on CUDA, checked on the CPU: the kernel's stated tolerance
    assert "recorded on cuda, checked on cpu" in result["tolerance_reason"]


def test_fresh_process_parity_of_a_gpu_artifact(tiny_tokenizer, tmp_path):
    """The push gate: an int8 artifact saved from the GPU, reloaded in a fresh CPU process, matches."""
    model = make_tiny("llama").to("cuda")
    model.compress({"stages": RECIPES["int8"], "evaluation": {**EVAL, "latency": False}}, tokenizer=tiny_tokenizer)
    out = hfsqueeze.save_compressed(model, tmp_path / "artifact", tokenizer=tiny_tokenizer)
    result = verify_parity(out)
    assert "checked on cpu" in result["tolerance_reason"]


def test_cpu_model_stays_on_cpu_on_a_gpu_host(tiny_tokenizer):
    """The CPU suite's promise on a GPU machine: a CPU model is quantized, distilled and measured on the CPU."""
    model = make_tiny("llama")
    model.compress({"stages": RECIPES["distill-int8"], "evaluation": {**EVAL, "latency": False}},
                   tokenizer=tiny_tokenizer)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
