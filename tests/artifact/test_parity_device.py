"""Parity compares like with like: the device and kernel are recorded; another device gets its kernel's stated
tolerance. These run on a CPU; tests/test_gpu.py covers the GPU.
"""

from __future__ import annotations

import json

import pytest
from conftest import SMALL_EVAL, make_tiny
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hfsqueeze
from hfsqueeze.core.errors import HfSqueezeError


# ---- parity: the device and kernel are recorded; another device gets its kernel's stated tolerance -------------


def _saved(tmp_path, tiny_tokenizer, stages=None):
    model = make_tiny("llama")
    if stages:
        model.compress({"stages": stages, "evaluation": {**SMALL_EVAL, "latency": False}}, tokenizer=tiny_tokenizer)
    return model, hfsqueeze.save_compressed(model, tmp_path / "art", tokenizer=tiny_tokenizer)


def _meta(path):
    with safe_open(str(path / "parity.safetensors"), "pt") as fh:
        return json.loads(fh.metadata()["hfsqueeze"])


def _rewrite(path, scale: float, **changes):
    """Move the recorded outputs by ``scale`` of their largest value and change the metadata."""
    file = path / "parity.safetensors"
    tensors, meta = load_file(str(file)), _meta(path)
    out = tensors["outputs"]
    tensors["outputs"] = out + scale * out.abs().max()
    save_file(tensors, str(file), metadata={"hfsqueeze": json.dumps({**meta, **changes}, sort_keys=True)})


def test_parity_records_device_and_kernel(tmp_path, tiny_tokenizer):
    _, path = _saved(tmp_path, tiny_tokenizer, [{"method": "quantize", "bits": 8}])
    meta = _meta(path)
    assert meta["version"] == 3 and meta["device"] == "cpu" and meta["kernel"] == "bnb-int8"


def test_parity_across_devices_uses_the_kernels_stated_tolerance(tmp_path, tiny_tokenizer):
    from hfsqueeze.artifact.parity import CROSS_DEVICE_TOLERANCE, DEFAULT_PARITY_TOLERANCE

    _, path = _saved(tmp_path, tiny_tokenizer)
    assert _meta(path)["kernel"] == "float32"
    # Same device: the default tolerance holds.
    _rewrite(path, 3 * DEFAULT_PARITY_TOLERANCE)
    with pytest.raises(HfSqueezeError, match="does not reproduce"):
        hfsqueeze.load_compressed(path)
    # Recorded on CUDA, checked here: a difference the kernels explain passes, and a larger one names the rule.
    _, path = _saved(tmp_path / "b", tiny_tokenizer)
    bf16 = CROSS_DEVICE_TOLERANCE["bfloat16"]
    assert bf16 > DEFAULT_PARITY_TOLERANCE
    _rewrite(path, (DEFAULT_PARITY_TOLERANCE + bf16) / 2, device="cuda", kernel="bfloat16")
    hfsqueeze.load_compressed(path)
    _rewrite(path, bf16, device="cuda", kernel="bfloat16")
    with pytest.raises(HfSqueezeError) as info:
        hfsqueeze.load_compressed(path)
    assert "recorded on cuda, checked on cpu" in str(info.value) and "CROSS_DEVICE_TOLERANCE" in str(info.value)


def test_parity_version_3_needs_device_and_kernel_and_older_versions_still_load(tmp_path, tiny_tokenizer):
    _, path = _saved(tmp_path, tiny_tokenizer)
    file = path / "parity.safetensors"
    tensors, meta = load_file(str(file)), _meta(path)
    old = {k: v for k, v in meta.items() if k not in ("device", "kernel")}
    save_file(tensors, str(file), metadata={"hfsqueeze": json.dumps({**old, "version": 2})})
    hfsqueeze.load_compressed(path)  # a version-2 file: recorded on the CPU, checked as before
    save_file(tensors, str(file), metadata={"hfsqueeze": json.dumps({**old, "version": 3})})
    with pytest.raises(HfSqueezeError, match="3 the device and kernel"):
        hfsqueeze.load_compressed(path)
