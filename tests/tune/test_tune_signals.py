"""`hfsqueeze tune` under signals: a child process paused at a known point, then interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import outputs

from hfsqueeze.evaluation.measure import disk_bytes
from hfsqueeze.models import load_model
from hfsqueeze.tune import Budget, load_space
from hfsqueeze.tune.space import plan_of, quantize_targets
from tunekit import _own_cache  # noqa: F401  (autouse: a sensitivity cache per test)
from tunekit import EVALUATION, IDS, SETTINGS, run_tune, tiny_llama




# ---- signals ----------------------------------------------------------------------------------------------------
# `hfsqueeze tune` in a child process, paused at a known point: the ``n``-th trial (before it is built) or the
# ``n``-th module of the sensitivity pass (before it is scored); the pause writes ``marker`` and sleeps.
PAUSING_CLI = r"""
import json, os, sys, time
from pathlib import Path
from hfsqueeze import cli
from hfsqueeze.tune import sensitivity as sens_mod, study as study_mod, tuner as tuner_mod
settings, evaluation, pause = (json.loads(a) for a in sys.argv[1:4])
real_tune = tuner_mod.tune
tuner_mod.tune = lambda *a, **k: real_tune(*a, **{**k, "settings": settings, "evaluation": evaluation})
module, name = (study_mod, "run_point") if pause["at"] == "trial" else (sens_mod, "_kl")
real, calls = getattr(module, name), []
def paused(*args, **kwargs):
    calls.append(1)
    if len(calls) == pause["n"]:
        # Written whole, then renamed: the test signals as soon as the marker exists, which must not cut the write.
        Path(pause["marker"] + ".tmp").write_text(json.dumps(args[1] if pause["at"] == "trial" else None))
        os.replace(pause["marker"] + ".tmp", pause["marker"])
        time.sleep(600)
    return real(*args, **kwargs)
setattr(module, name, paused)
sys.exit(cli.main(sys.argv[4:]))
"""


def _paused_cli(tmp_path: Path, tokenizer, at: str, n: int, trials: int) -> tuple[subprocess.Popen, Path]:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    args = [json.dumps(SETTINGS), json.dumps(EVALUATION), json.dumps({"at": at, "n": n, "marker": str(marker)}),
            "tune", "--model", str(tmp_path / "m"), "--budget", "size=0.5", "--trials", str(trials), "--output",
            str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_CLI, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate(timeout=60)[1][-3000:]
    return proc, marker


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_inside_a_trial_saves_the_best_so_far_exits_with_its_code_and_resume_redoes_it(
        tiny_tokenizer, tmp_path, signum, code):
    out = tmp_path / "out"
    proc, marker = _paused_cli(tmp_path, tiny_tokenizer, "trial", n=2, trials=3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    report = json.loads((out / "report.json").read_text())  # the best point so far, saved
    assert report["tuning"]["stopped"] == ("terminated" if signum == signal.SIGTERM else "interrupted")
    records = [json.loads(line) for line in (out / "tuning" / "trials.jsonl").read_text().splitlines()]
    point = json.loads(marker.read_text())
    cut = [r for r in records if r["point"] == point]
    assert len(cut) == 1 and cut[0]["state"] == "FAIL" and cut[0]["interrupted"], cut

    result = run_tune(load_model(str(tmp_path / "m"))[0], tiny_tokenizer, out, trials=3, resume=True)
    redone = [r for r in result.trials if r["point"] == point and r["state"] == "COMPLETE"]
    assert len(redone) == 1 and redone[0]["number"] != cut[0]["number"]
    assert len([r for r in result.trials if r["state"] == "COMPLETE"]) == 3


@pytest.mark.slow
def test_ctrl_c_in_the_sensitivity_pass_keeps_what_was_scored_and_resume_continues(tiny_tokenizer, tmp_path,
                                                                                   monkeypatch):
    from hfsqueeze.tune import sensitivity as sens_mod

    out = tmp_path / "out"
    proc, _ = _paused_cli(tmp_path, tiny_tokenizer, "sensitivity", n=5, trials=2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "continue with --resume" in err, err[-3000:]
    saved = json.loads((out / "tuning" / "sensitivity.json").read_text())["entries"]
    (partial,) = [e for k, e in saved.items() if k.endswith(":int8")]
    assert len(partial["scores"]) == 4 and not partial["complete"]  # module 5 was being scored

    model = load_model(str(tmp_path / "m"))[0]
    real, scored = sens_mod._kl, []
    monkeypatch.setattr(sens_mod, "_kl", lambda *a, **k: scored.append(1) or real(*a, **k))
    result = run_tune(model, tiny_tokenizer, out, trials=2, resume=True)
    targets = len(quantize_targets(model))
    assert len(scored) == 3 * targets - 4  # int8 continued where it stopped; nf4 and fp4 scored in full
    section = result.report.tuning["sensitivity"]["int8"]
    assert section["cached_modules"] == 4 and not section["cached"]
    assert section["cached_from"] == str(out / "tuning" / "sensitivity.json")


def test_quantize_only_trials_share_the_original_tensors(tiny_tokenizer):
    """A trial that only quantizes starts from a copy sharing the original's tensors (no second fp32 model in
    memory); the original's modules, dtypes and outputs stay as they were."""
    from hfsqueeze.core.data import load_texts, token_blocks
    from hfsqueeze.tune.trial import TrialContext, TuneSettings, build

    model = tiny_llama()
    before = outputs(model, IDS)
    blocks = token_blocks(tiny_tokenizer, load_texts("builtin", split="train"), max_tokens=64, seq_len=64)
    scores = {"scores": {}}
    tctx = TrialContext(model, tiny_tokenizer, "builtin", blocks, Budget.parse("size=0.9"), load_space("quantize"),
                        TuneSettings(), {"int8": scores, "nf4": scores, "fp4": scores}, disk_bytes(model),
                        sum(p.numel() for p in model.parameters()))
    embed = model.get_input_embeddings().weight
    for bits, rest in ((8, "fp32"), (4, "bf16")):
        built, _, _ = build(tctx, plan_of({"quantize.bits": bits, "quantize.rest_dtype": rest, "quantize.keep": 0.0}))
        assert type(built.model.layers[0].mlp.up_proj).__name__ != "Linear"
        copied = built.get_input_embeddings().weight
        assert (copied.data_ptr() == embed.data_ptr()) == (rest == "fp32")  # shared unless the cast replaced it
        assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear and embed.dtype == torch.float32
        assert torch.equal(outputs(model, IDS), before)
        del built


def test_the_recovery_teacher_shares_the_original_tensors(tiny_tokenizer):
    """tune's teacher for recovery trials is frozen and in eval mode, but costs no second copy of the weights; the
    original keeps its own requires_grad flags."""
    from hfsqueeze.core.data import load_texts, token_blocks
    from hfsqueeze.tune.trial import TrialContext, TuneSettings

    model = tiny_llama()
    model.requires_grad_(True)
    blocks = token_blocks(tiny_tokenizer, load_texts("builtin", split="train"), max_tokens=64, seq_len=64)
    tctx = TrialContext(model, tiny_tokenizer, "builtin", blocks, Budget.parse("size=0.9"), load_space("quantize"),
                        TuneSettings(), {}, disk_bytes(model), sum(p.numel() for p in model.parameters()))
    teacher = tctx.teacher
    assert teacher is tctx.teacher and teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert [p.data_ptr() for p in teacher.parameters()] == [p.data_ptr() for p in model.parameters()]
