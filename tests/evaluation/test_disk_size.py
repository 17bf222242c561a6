"""Weights on disk computed without writing them (`compat.safetensors`): byte for byte what a real save writes."""

from __future__ import annotations

import importlib.util
import random
import threading
import warnings

import pytest
import safetensors.torch
import torch
import transformers.modeling_utils
from conftest import make_tiny

import hfsqueeze
from hfsqueeze.artifact.save import weights_bytes
from hfsqueeze.compat import safetensors as sizing
from hfsqueeze.compat.safetensors import layout_verified, safetensors_bytes, safetensors_size
from hfsqueeze.evaluation.measure import disk_bytes
from hfsqueeze.methods.quantize import QuantizeConfig, apply_quantize
from hfsqueeze.registry import stages

EVAL = {"max_tokens": 64, "seq_len": 32, "latency": False, "disk_size": False, "per_stage": False}


def _quantized(**config):
    model = make_tiny("llama")
    apply_quantize(model, QuantizeConfig(**config))
    return model


def _pruned(tokenizer):
    from hfsqueeze.methods.prune import PruneWarning

    model = make_tiny("llama_mha")
    stage = {"method": "prune", "heads": 0.5, "ffn": 0.25, "importance": "magnitude", "calibration_tokens": 256,
             "seq_len": 64}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruneWarning)
        hfsqueeze.compress(model, {"stages": [stage], "evaluation": EVAL}, tokenizer=tokenizer)
    return model


def _with_adapter(bits):
    from hfsqueeze.compat.peft import has_adapter, keep_adapter
    from hfsqueeze.methods.distill.config import LoraConfig
    from hfsqueeze.methods.distill.recover import attach_lora

    pytest.importorskip("peft")
    model = _quantized(bits=bits) if bits else make_tiny("llama")
    model = keep_adapter(attach_lora(model, LoraConfig()))
    for name, p in model.named_parameters():  # peft starts lora_B at zero: make the adapter's bytes count for real
        if "lora_B" in name:
            p.data.normal_()
    assert has_adapter(model)
    return model


MODELS = {
    "fp32": lambda tok: make_tiny("llama"),
    "gpt2-fp32": lambda tok: make_tiny("gpt2"),
    "bf16": lambda tok: _quantized(bits=16, dtype="bf16"),
    "int8": lambda tok: _quantized(bits=8),
    "nf4": lambda tok: _quantized(bits=4),
    "nf4-double-quant": lambda tok: _quantized(bits=4, double_quant=True),
    "pruned": _pruned,
    "nf4-lora-adapter": lambda tok: _with_adapter(4),
    "int8-lora-adapter": lambda tok: _with_adapter(8),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_computed_size_is_the_saved_size_byte_for_byte(kind, tiny_tokenizer, tmp_path, monkeypatch):
    if kind not in ("fp32", "gpt2-fp32", "pruned"):
        pytest.importorskip("bitsandbytes")
    model = MODELS[kind](tiny_tokenizer)
    writes = []
    real_serialize = safetensors.torch.serialize_file
    monkeypatch.setattr(safetensors.torch, "serialize_file", lambda *a, **k: writes.append(a[1]) or real_serialize(
        *a, **k))
    computed = disk_bytes(model, stages())  # as compress measures it: a kept adapter counts
    assert writes == []  # nothing was written to measure it
    out = hfsqueeze.save_compressed(model, tmp_path / "artifact")
    assert len(writes) == (3 if "adapter" in kind else 2)  # model, parity outputs (and the adapter): really written
    assert computed == weights_bytes(out)
    assert (out / "adapter_model.safetensors").is_file() == ("adapter" in kind)


def test_no_weights_are_written_to_measure_them(tmp_path, monkeypatch):
    """The save runs (its JSON files land in the directory) but no ``*.safetensors`` file is written, and every
    patched writer is the library's own again afterwards."""
    model = make_tiny("llama")
    originals = {(m, a): getattr(__import__(m, fromlist=[a]), a) for m, a in sizing.WRITERS[:2]}
    monkeypatch.setattr(safetensors.torch, "serialize_file", lambda *a, **k: pytest.fail("weights were written"))
    size = safetensors_bytes(tmp_path, lambda: model.save_pretrained(tmp_path))
    assert (tmp_path / "config.json").is_file() and not list(tmp_path.glob("*.safetensors"))
    assert size > 4 * sum(p.numel() for p in model.parameters() if p is not model.lm_head.weight)
    assert all(getattr(__import__(m, fromlist=[a]), a) is fn for (m, a), fn in originals.items())
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "real")
    assert size == weights_bytes(tmp_path / "real")


def test_sharded_save_sums_every_shard(tmp_path, monkeypatch):
    """Models over ``max_shard_size`` (50 GB by default) are saved in shards: each shard is sized on its own."""
    model = make_tiny("llama")
    monkeypatch.setattr(safetensors.torch, "serialize_file", lambda *a, **k: pytest.fail("weights were written"))
    size = safetensors_bytes(tmp_path, lambda: model.save_pretrained(tmp_path, max_shard_size="100KB"))
    assert (tmp_path / "model.safetensors.index.json").is_file()
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "real", max_shard_size="100KB")
    assert len(list((tmp_path / "real").glob("*.safetensors"))) > 2
    assert size == weights_bytes(tmp_path / "real")


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [None, 16, 4])
def test_computed_size_of_a_cuda_model_is_the_saved_size(bits, tmp_path):
    model = make_tiny("llama").to("cuda")
    if bits:
        apply_quantize(model, QuantizeConfig(bits=bits, **({"dtype": "bf16"} if bits == 16 else {})))
    assert disk_bytes(model, stages()) == weights_bytes(hfsqueeze.save_compressed(model, tmp_path / "artifact"))


def test_another_thread_saving_meanwhile_writes_for_real(tmp_path):
    """The writers are patched process-wide while one thread sizes; a real save in another thread still writes."""
    model, other = make_tiny("llama"), make_tiny("gpt2")

    def save_while_sizing() -> None:
        thread = threading.Thread(target=other.save_pretrained, args=(tmp_path / "real",))
        thread.start()
        thread.join()
        model.save_pretrained(tmp_path / "sized")

    size = safetensors_bytes(tmp_path / "sized", save_while_sizing)
    assert weights_bytes(tmp_path / "real") > 0 and not list((tmp_path / "sized").glob("*.safetensors"))
    model.save_pretrained(tmp_path / "check")
    assert size == weights_bytes(tmp_path / "check")


def test_a_writer_that_is_not_save_file_is_measured_by_writing(tmp_path, monkeypatch):
    """Fail safe: in a Transformers whose writer is something else, the weights are written and counted as before."""
    model = _quantized(bits=8) if _has_bnb() else make_tiny("llama")
    calls = []
    real = safetensors.torch.save_file

    def other_writer(tensors, filename, metadata=None):
        calls.append(filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", other_writer)
    size = disk_bytes(model)
    assert len(calls) == 1
    model.save_pretrained(tmp_path)
    assert size == weights_bytes(tmp_path)


def test_a_layout_the_formula_does_not_match_turns_sizing_off(tmp_path, monkeypatch):
    """A safetensors that lays files out differently (simulated: the dtype order reversed) fails the probe, and the
    weights are then measured by writing them: a slower number, never a wrong one."""
    model = make_tiny("llama")
    writes = []
    real_serialize = safetensors.torch.serialize_file
    monkeypatch.setattr(safetensors.torch, "serialize_file", lambda *a, **k: writes.append(a[1]) or real_serialize(
        *a, **k))
    monkeypatch.setattr(sizing, "DTYPE_ORDER", sizing.DTYPE_ORDER[::-1])
    layout_verified.cache_clear()
    try:
        assert not layout_verified()
        size = disk_bytes(model)
    finally:
        layout_verified.cache_clear()
    assert len(writes) == 1
    model.save_pretrained(tmp_path)
    assert size == weights_bytes(tmp_path)


def test_dicts_it_cannot_size_are_written_or_refused_as_safetensors_would(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with pytest.raises(ValueError, match="non contiguous"):
        safetensors_bytes(tmp_path, lambda: safetensors.torch.save_file({"a": t.t()}, tmp_path / "a.safetensors"))
    with pytest.raises(RuntimeError, match="share memory"):
        safetensors_bytes(tmp_path, lambda: safetensors.torch.save_file({"a": t, "b": t}, tmp_path / "b.safetensors"))
    assert safetensors_size({"a": t}, {"n": 1}) is None  # safetensors wants string metadata
    odd = getattr(torch, "float8_e4m3fnuz", None)  # a dtype outside DTYPE_ORDER: written, and counted from disk
    if odd is not None:
        tensors = {"x": torch.zeros(5, dtype=odd), "y": t}
        size = safetensors_bytes(tmp_path, lambda: safetensors.torch.save_file(tensors, tmp_path / "c.safetensors"))
        assert size == (tmp_path / "c.safetensors").stat().st_size


def test_size_formula_matches_safetensors_on_random_dicts():
    dtypes = [getattr(torch, t) for _, t in sizing.DTYPE_ORDER if hasattr(torch, t)]
    rng = random.Random(0)
    for _ in range(100):
        tensors = {}
        for i in range(rng.randint(0, 12)):
            shape = [rng.randint(0, 40) for _ in range(rng.randint(0, 3))]
            name = rng.choice(["model.layers.{}.w", "é.{}\"/", "a{}", "lm_head.{}\n"]).format(rng.randint(0, 10**6))
            tensors[f"{name}{i}"] = torch.zeros(shape, dtype=rng.choice(dtypes))
        metadata = rng.choice([None, {}, {"format": "pt"}, {"format": "pt", "ü": "x\ty"}])
        assert safetensors_size(tensors, metadata) == len(safetensors.torch.save(tensors, metadata=metadata))


def _has_bnb() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None
