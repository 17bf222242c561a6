"""Where a model sits is honoured: inputs follow it, offloaded weights are refused, --device/--dtype reach the
loader.

These run on a CPU. What needs a real GPU is in tests/test_gpu.py (the ``gpu`` marker).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import SMALL_EVAL, make_tiny
from torch import nn

from hfsqueeze.core import hf
from hfsqueeze.core.errors import HfSqueezeError, RecipeError, UnsupportedModelError

META = torch.device("meta")


# ---- input_device / to_device ----------------------------------------------------------------------------------


class _Split(nn.Module):
    """Embeddings on the meta device, everything else on the CPU: the input device is the embeddings'."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.embed = nn.Embedding(4, 2, device="meta")

    def get_input_embeddings(self):
        return self.embed


def test_to_device_moves_every_tensor_of_a_batch_to_the_input_embeddings_device():
    model = _Split()
    assert hf.input_device(model) == META  # not the first parameter's device (the CPU)
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3)
    moved = hf.to_device({"input_ids": ids, "extra": [mask, (mask, 7)], "name": "x"}, model)
    assert moved["input_ids"].device == META and moved["extra"][0].device == META
    assert moved["extra"][1][0].device == META and moved["extra"][1][1] == 7 and moved["name"] == "x"
    assert isinstance(moved["extra"][1], tuple)
    assert hf.to_device(ids, nn.Module()).device.type == "cpu"  # no parameters: the CPU


def test_synchronizer_is_a_no_op_without_cuda_parameters(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    hf.synchronizer(make_tiny("llama"))()
    assert calls == []


# ---- every forward feeds its inputs to the model's input device -----------------------------------------------


@pytest.fixture
def inputs_claimed_on_meta(monkeypatch):
    """Claim the model's inputs belong on ``meta`` and check, in a pre-hook on the embeddings, that every forward
    really sent them there; the hook then hands the embedding zeros on the CPU so the forward can finish. Code that
    feeds CPU tensors without `to_device` trips the assertion."""
    # Modules that bind `input_device` by name at import must be imported first: imported under the patch, they
    # would keep the fake for the rest of the session (distill's trainer is imported lazily, by the first distill).
    for name in ("hfsqueeze.tune.tuner", "hfsqueeze.methods.prune.importance", "hfsqueeze.methods.distill.apply",
                 "hfsqueeze.methods.distill.trainer", "hfsqueeze.methods.distill.quality", "hfsqueeze.artifact.parity"):
        importlib.import_module(name)
    monkeypatch.setattr(hf, "input_device", lambda model: META)
    seen: list[torch.device] = []

    def attach(model: nn.Module) -> nn.Module:
        def hook(module, args):
            seen.append(args[0].device)
            assert args[0].device == META, f"a forward fed its inputs on {args[0].device}, not the model's device"
            return (torch.zeros(args[0].shape, dtype=torch.long),)

        model.get_input_embeddings().register_forward_pre_hook(hook)
        return model

    return attach, seen


def test_measure_and_latency_inputs_follow_the_model(inputs_claimed_on_meta, tiny_tokenizer):
    from hfsqueeze.evaluation.config import EvaluationConfig
    from hfsqueeze.evaluation.measure import measure, measure_baseline

    attach, seen = inputs_claimed_on_meta
    model = attach(make_tiny("llama"))
    evaluation = EvaluationConfig.from_dict({**SMALL_EVAL, "disk_size": False}, where="evaluation")
    _, reference = measure_baseline(model, tiny_tokenizer, evaluation)  # reference pass + prefill/decode latency
    metrics = measure(model, tiny_tokenizer, evaluation, reference, with_disk=False)
    assert metrics.kl_divergence is not None and metrics.decode_ms_per_token is not None
    assert len(seen) > 4


def test_encoder_inputs_follow_the_model(monkeypatch, tiny_tokenizer):
    """Encoders: the ids and the mask go to the model's device (checked on the mask, a plain tensor argument)."""
    from hfsqueeze.core import quality

    moved = []
    real = quality.to_device
    monkeypatch.setattr(quality, "to_device", lambda batch, model: moved.append(batch) or real(batch, model))
    model = make_tiny("bert")
    ids, mask = torch.randint(5, 400, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    quality.pooled_embeddings(model, ids, mask)
    assert any(t.data_ptr() == mask.data_ptr() for t in moved)  # slices of the very tensors, both moved
    assert any(t.data_ptr() == ids.data_ptr() for t in moved)


def test_tune_forwards_follow_the_model(inputs_claimed_on_meta):
    from hfsqueeze.core import quality
    from hfsqueeze.tune import space

    attach, seen = inputs_claimed_on_meta
    model = attach(make_tiny("llama"))
    block = torch.randint(5, 400, (16,))
    reference = quality.logprobs(model, block)  # what a sensitivity pass records
    quality.score_lm(model, block.unsqueeze(0), [reference])  # what trials and sensitivities score
    assert len(seen) == 2
    half = make_tiny("llama")
    attach(half)
    assert space.fp16_overflows(half, block.unsqueeze(0)) is False  # its frozen copy keeps the hook


def test_prune_calibration_forwards_follow_the_model(inputs_claimed_on_meta):
    from hfsqueeze.methods.prune import importance, reconstruct

    attach, seen = inputs_claimed_on_meta
    model = attach(make_tiny("llama"))
    blocks = torch.randint(5, 400, (2, 16))
    with torch.no_grad():
        importance._forward(model, blocks)
    reconstruct.InputMoments({"down": model.model.layers[0].mlp.down_proj}).collect(model, blocks)
    assert len(seen) == 2


def test_distill_quality_and_parity_forwards_follow_the_model(inputs_claimed_on_meta, tmp_path):
    from hfsqueeze.artifact import parity
    from hfsqueeze.methods.distill import quality

    attach, seen = inputs_claimed_on_meta
    model = attach(make_tiny("llama"))
    quality.score(model, model, [quality.EvalSet("text", [[5, 6, 7, 8]])])  # the teacher's pass, then the model's
    parity._outputs(model, torch.randint(5, 400, (1, 8)))
    assert len(seen) == 3


# ---- offloaded weights are refused in one line, before any work ---------------------------------------------------


def _counting_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("where", ["meta", "disk"])
def test_offloaded_model_is_refused_in_one_line_before_any_work(where, tiny_tokenizer):
    model = make_tiny("llama")
    if where == "meta":
        model.model.layers[1].mlp.down_proj.to("meta")  # what accelerate's CPU/disk offload leaves in the module
    else:
        model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": "cpu"}
    calls = _counting_forwards(model)
    with pytest.raises(UnsupportedModelError) as info:
        model.compress({"stages": [{"method": "quantize", "bits": 8}], "evaluation": SMALL_EVAL},
                       tokenizer=tiny_tokenizer)
    message = str(info.value)
    assert "\n" not in message and "--dtype bfloat16" in message and "offload" in message
    assert ("'meta' device" in message) if where == "meta" else ("disk" in message)
    assert calls == []  # refused before the baseline was measured
    assert not any(type(m).__name__ == "Linear8bitLt" for m in model.modules())


def test_tune_refuses_an_offloaded_model_before_any_work(tiny_tokenizer, tmp_path):
    from hfsqueeze.tune import tune

    model = make_tiny("llama")
    model.model.layers[0].self_attn.q_proj.to("meta")
    calls = _counting_forwards(model)
    with pytest.raises(UnsupportedModelError, match="'meta' device"):
        tune(model, tiny_tokenizer, budget="size=0.5", trials=2, output=tmp_path / "out")
    assert calls == [] and not (tmp_path / "out").exists()


# ---- --device / --dtype --------------------------------------------------------------------------------------------


def test_placement_kwargs(monkeypatch):
    from hfsqueeze.core.models import placement_kwargs

    assert placement_kwargs() == {} and placement_kwargs("cpu") == {}
    assert placement_kwargs("auto", "bfloat16") == {"device_map": "auto", "dtype": torch.bfloat16}
    assert placement_kwargs(None, "auto") == {"dtype": "auto"}
    for device, dtype, needle in [("gpu", None, "allowed: cpu, cuda, cuda:N"), ("cuda:x", None, "cuda:N"),
                                  (None, "int8", "allowed: auto, float32, bfloat16, float16")]:
        with pytest.raises(RecipeError, match=needle):
            placement_kwargs(device, dtype)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="no CUDA device is available"):
        placement_kwargs("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert placement_kwargs("cuda:1") == {"device_map": "cuda:1"}
    with pytest.raises(RecipeError, match=r"2 CUDA device\(s\)"):
        placement_kwargs("cuda:2")


class _Loaded(HfSqueezeError):
    pass


@pytest.mark.parametrize("command", ["compress", "tune", "eval"])
def test_cli_device_and_dtype_reach_the_loader(command, model_dir, tmp_path, monkeypatch, capsys):
    import hfsqueeze.api
    import hfsqueeze.models
    from hfsqueeze.cli import main

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        raise _Loaded("loader reached")

    monkeypatch.setattr(hfsqueeze.models, "load_model", spy)
    monkeypatch.setattr(hfsqueeze.api, "load_compressed", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    if command == "eval":
        (tmp_path / "art").mkdir()
        (tmp_path / "art" / "config.json").write_text("{}")
        argv = ["eval", str(tmp_path / "art")]
    else:
        argv = [command, "--model", str(model_dir), "--output", str(tmp_path / "out")]
        argv += ["--budget", "size=0.5"] if command == "tune" else []
    assert main([*argv, "--device", "cuda", "--dtype", "bfloat16"]) == 2
    assert "loader reached" in capsys.readouterr().err
    assert seen and seen[0]["device_map"] == "cuda" and seen[0]["dtype"] is torch.bfloat16


def test_cli_bad_device_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, monkeypatch):
    from hfsqueeze.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["compress", "--model", str(model_dir), "--output", str(tmp_path / "out"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device is available" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()
