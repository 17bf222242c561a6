"""First run of the command line: a fast ``--help``, the version, a quiet CLI, progress and ``-v`` on long steps."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import transformers as tf
from conftest import SMALL_EVAL, make_tiny

from hfsqueeze.cli import main
from installkit import _env


# ---- the command line: fast help, version, quiet -------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["compress", "--help"], ["eval", "--help"],
                                  ["validate", "--help"], ["recipes", "--help"], ["push", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hfsqueeze", *argv], capture_output=True,
                          text=True, timeout=120, env=_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "hfsqueeze.cli" in imported and not imported & {"torch", "transformers", "bitsandbytes"}
    assert "hfsqueeze 0.1.0" in proc.stdout if argv == ["--version"] else "usage: hfsqueeze" in proc.stdout


def test_import_hfsqueeze_is_light_and_still_attaches_compress():
    code = ("import sys, hfsqueeze; assert 'torch' not in sys.modules; "
            "from transformers import PreTrainedModel; print(PreTrainedModel.compress._hfsqueeze, "
            "hfsqueeze.compress.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(),
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "hfsqueeze.api"]


def test_cli_stderr_has_no_bitsandbytes_noise(model_dir, tmp_path):
    small = [x for k, v in SMALL_EVAL.items() for x in ("--set", f"evaluation.{k}={v}")]
    out = tmp_path / "out"
    runs = [["compress", "--model", str(model_dir), "--recipe", "int8", "--output", str(out), *small],
            ["eval", str(out), *small]]
    for argv in runs:
        proc = subprocess.run([sys.executable, "-m", "hfsqueeze", *argv], capture_output=True, text=True,
                              timeout=300, env=_env(), check=False)
        assert proc.returncode == 0, proc.stderr
        assert "kernels-community" not in proc.stderr and "MatMul8bitLt" not in proc.stderr, proc.stderr[:500]


def test_other_bitsandbytes_warnings_still_show(caplog):
    from hfsqueeze.core.utils import silence_bnb_noise

    silence_bnb_noise()
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module")
        logging.getLogger("bitsandbytes.autograd._functions").warning(
            "MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        ops.warning("something else went wrong")
    assert caplog.messages == ["something else went wrong"]


# ---- progress and -v on long steps ---------------------------------------------------------------------------------
def test_importance_scoring_and_latency_report_progress(monkeypatch, capsys):
    from hfsqueeze.evaluation.measure import latency
    from hfsqueeze.methods.prune.importance import gradient_scores, head_units, kl_scores
    from hfsqueeze.methods.prune.surgery import attention_shape, layer_list

    monkeypatch.setenv("HFSQUEEZE_DISABLE_PROGRESS", "0")
    model = make_tiny("llama")
    units = [head_units(*attention_shape("llama", layer)[:2], "groups") for layer in layer_list("llama", model)]
    blocks = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    gradient_scores("llama", model, blocks, units, layers=True)
    kl_scores("llama", model, blocks, units, layers=True)
    latency(model, blocks[:1], decode_tokens=2, repeats=1)
    err = capsys.readouterr().err
    for label in ("importance (gradient)", "importance (kl): reference pass", "importance (kl)", "latency"):
        assert f"{label}: " in err, label
    assert "importance (kl):   0%|          | 0/6 " in err  # 2 layers x 2 KV groups + 2 layers
    assert "latency:   0%|          | 0/4 " in err  # (warm-up + 1 repeat) x (prefill, decode)
    monkeypatch.setenv("HFSQUEEZE_DISABLE_PROGRESS", "1")
    gradient_scores("llama", model, blocks, units, layers=False)
    assert capsys.readouterr().err == ""


def test_distill_training_bar_is_labelled(tiny_tokenizer, tmp_path, capsys):
    from hfsqueeze.methods.distill import DistillConfig
    from hfsqueeze.methods.distill.data import Collator, MixedDataset, build_tasks
    from hfsqueeze.methods.distill.trainer import DistillationTrainer, DistillSpec

    config = DistillConfig.from_dict({"block_size": 32, "data": {"text": "builtin", "max_tokens": 2000}})
    (task,) = build_tasks(config.tasks, tiny_tokenizer, 32)
    trainer = DistillationTrainer(
        model=make_tiny("llama"), teacher=make_tiny("llama"), spec=DistillSpec(),
        args=tf.TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                                  remove_unused_columns=False, use_cpu=True, disable_tqdm=False),
        train_dataset=MixedDataset([task]), data_collator=Collator(1),
    )
    trainer.args.logging_steps = 1
    trainer.train()
    out, err = capsys.readouterr()
    assert "distill: training steps:   0%|          | 0/2 " in err
    # The loss rides on the bar; no log dict is printed per step (they buried a CLI run's output).
    assert "loss=" in err and "{'loss'" not in out + err and "train_runtime" not in out + err


def test_cli_eval_verbose_logs_each_step(model_dir, tmp_path, caplog):
    small = [x for k, v in SMALL_EVAL.items() for x in ("--set", f"evaluation.{k}={v}")]
    out = tmp_path / "out"
    assert main(["compress", "--model", str(model_dir), "--recipe", "bf16", "--output", str(out), *small]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hfsqueeze"):
        assert main(["-v", "eval", str(out), "--base", str(model_dir), *small]) == 0
    steps = [m for m in caplog.messages if not m.startswith("saved")]
    assert steps[:2] == [f"loading the artifact {out}", f"loading the base model {model_dir} to re-measure it"]
    assert {"recording the reference outputs on 256 evaluation tokens", "measuring the artifact",
            "measuring perplexity, KL and top-1 agreement against the reference"} <= set(steps)
    # One interleaved timing of the original and the artifact (both are in memory with --base).
    assert [m for m in steps if m.startswith("measuring latency: 16 prompt tokens")] == [
        "measuring latency: 16 prompt tokens, 4 decode steps, 1 repeats (original and compressed, alternating)"]
