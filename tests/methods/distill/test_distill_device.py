"""Distill trains where the model is (a CPU model stays on the CPU on a GPU host)."""

from __future__ import annotations

import torch
from conftest import make_tiny

from hfsqueeze.core import hf


# ---- distill trains where the model is -------------------------------------------------------------------------


def test_distill_keeps_a_cpu_model_on_the_cpu_on_a_gpu_host(monkeypatch, tmp_path):
    from hfsqueeze.methods.distill.apply import _training_arguments
    from hfsqueeze.methods.distill.config import DistillConfig
    from hfsqueeze.methods.distill.launch import Launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = DistillConfig.from_dict({"training_args": {"max_steps": 1}}, where="distill")
    args = _training_arguments(config, str(tmp_path), False, hf.input_device(make_tiny("llama")),
                               Launch.detect(config.resolved_training_args()))
    assert args.use_cpu is True
