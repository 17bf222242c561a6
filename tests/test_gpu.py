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


# ---- distillation under accelerate launch on GPUs (FSDP2, DeepSpeed ZeRO-3) -----------------------------------------
def _launch_on_gpus(tmp_path, tokenizer, config: str, stages: list[dict]) -> dict:
    """``accelerate launch --config_file scripts/<config>`` over the GPUs here (at most 2; NCCL wants one per
    process), through scripts/distill.py; returns the distill stage's details."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    model_dir = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"evaluation": {**EVAL, "latency": False}, "stages": stages}))
    n = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(repo / "scripts" / config),
           "--num_processes", str(n), "--main_process_port", "29571", str(repo / "scripts" / "distill.py"),
           "--model", str(model_dir), "--recipe", str(recipe), "--output", str(tmp_path / "out"),
           "--report-json", str(tmp_path / "report.json")]
    proc = subprocess.run(cmd, env={**os.environ, "HFSQUEEZE_DISABLE_PROGRESS": "1"}, capture_output=True, text=True,
                          timeout=400, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    details = next(s["details"] for s in report["stages"] if s["method"] == "distill")
    assert details["world_size"] == n
    return details


FULL_DISTILL = {k: v for k, v in DISTILL.items() if k not in ("adapter", "lora", "freeze_embeddings")}


def test_fsdp2_launch_shards_student_and_teacher_on_gpus(tiny_tokenizer, tmp_path):
    d = _launch_on_gpus(tmp_path, tiny_tokenizer, "accelerate_fsdp.yaml", [FULL_DISTILL])
    assert d["engine"] == "fsdp" and d["fsdp_version"] == 2 and d["wrapped"].startswith("FSDP")
    assert d["teacher_sharded"] == "fsdp2"
    if d["world_size"] == 2:
        assert d["teacher_local_fraction"] < 0.6
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # whole again: gathered after training
    assert {k: v.shape for k, v in saved.state_dict().items()} == \
        {k: v.shape for k, v in make_tiny("llama").state_dict().items()}


def test_deepspeed_zero3_launch_shards_student_and_teacher_on_gpus(tiny_tokenizer, tmp_path):
    pytest.importorskip("deepspeed")
    d = _launch_on_gpus(tmp_path, tiny_tokenizer, "accelerate_deepspeed_zero3.yaml", [FULL_DISTILL])
    assert d["engine"] == "deepspeed" and d["zero_stage"] == 3 and d["wrapped"] == "DeepSpeedEngine"
    assert d["teacher_sharded"] == "zero3"


def test_qlora_under_fsdp2_stores_4bit_weights_in_the_training_dtype(tiny_tokenizer, tmp_path):
    stages = [*RECIPES["nf4"], DISTILL]
    d = _launch_on_gpus(tmp_path, tiny_tokenizer, "accelerate_fsdp.yaml", stages)
    assert d["engine"] == "fsdp" and d["quant_storage"] == "float32" and d["adapter"] == "lora"
    model, _ = load_model(tmp_path / "out")  # saved with bnb's usual uint8 storage: reloads like any 4-bit artifact
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
