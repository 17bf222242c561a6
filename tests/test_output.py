"""Honest output: ``--json`` prints one JSON document, the footer and card claim only what was measured, latency
ratios carry their spread and an "unreliable" flag when the machine was busy or the runs disagreed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SMALL_EVAL, make_tiny

import hfsqueeze  # noqa: F401  (gives models .compress)

REPO = Path(__file__).resolve().parent.parent


def _run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HFSQUEEZE_DISABLE_PROGRESS", None)  # progress on: bars and Trainer's log lines must not reach stdout
    return subprocess.run([sys.executable, "-m", "hfsqueeze", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


# ---- --json: one document on stdout ------------------------------------------------------------------------------
def test_compress_json_with_distill_prints_exactly_one_json_document(model_dir, tmp_path):
    recipe = {
        "stages": [{"method": "distill", "student": {"keep": 0.5}, "block_size": 32,
                    "data": {"text": "builtin", "max_tokens": 2000, "eval_tokens": 256},
                    "training_args": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1}}],
        "evaluation": {**SMALL_EVAL, "disk_size": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    proc = _run_cli("compress", "--model", str(model_dir), "--recipe", "recipe.yaml", "--json", "--output", str(out),
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # the whole of stdout, nothing before or after
    assert report["schema"] == "hfsqueeze.report" and report["stages"][0]["method"] == "distill"
    assert "saved to" in proc.stderr and "loss" in proc.stderr  # moved, not lost
    assert (out / "report.json").is_file()

    proc = _run_cli("eval", str(out), "--json", "--set", "evaluation.latency=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["stages"][0]["method"] == "eval"

    proc = _run_cli("eval", str(out), "--json", "--base", str(model_dir), cwd=tmp_path)  # both loaded: interleaved
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["latency"]["interleaved"] is True


# ---- the footer and the card say only what was measured ----------------------------------------------------------
def _card_text(model, report) -> str:
    from hfsqueeze.artifact.card import render_model_card

    return str(render_model_card(model.config, report, load_code="model = ..."))


BF16 = [{"method": "quantize", "bits": 16}]


def test_without_tokenizer_no_token_or_latency_claims():
    model = make_tiny("llama")
    report = model.compress({"stages": BF16, "evaluation": SMALL_EVAL})
    footer = report.to_markdown().split("\n\n")[-1]
    assert "sizes only" in footer
    for claim in ("tokens of", "median", "latency as", "runs"):
        assert claim not in footer
    card = _card_text(model, report)
    assert "**Latency:**" not in card and "median of" not in card and "**Quality:**" not in card
    assert report.to_dict()["latency"] is None


def test_latency_false_no_latency_claim(tiny_tokenizer):
    model = make_tiny("llama")
    report = model.compress({"stages": BF16, "evaluation": {**SMALL_EVAL, "latency": False}}, tokenizer=tiny_tokenizer)
    footer = report.to_markdown().split("\n\n")[-1]
    assert f"quality on {report.baseline.eval_tokens} tokens of builtin text" in footer
    assert "median" not in footer and "latency" not in footer
    card = _card_text(model, report)
    assert "**Quality:**" in card and "**Latency:**" not in card and "median of" not in card


# ---- latency: spread, load, interleaving, the unreliable flag -----------------------------------------------------
class _SteadyClock:
    """A stand-in for time.perf_counter whose every timed run lasts exactly as long as the previous one."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.001
        return self.now


@pytest.fixture
def quiet_machine(monkeypatch):
    from hfsqueeze.evaluation import measure

    monkeypatch.setattr(measure, "time", _SteadyClock())
    monkeypatch.setattr(measure.os, "getloadavg", lambda: (0.0, 0.0, 0.0))


def _compress_timed(tokenizer, repeats: int = 3):
    model = make_tiny("llama")
    report = model.compress({"stages": BF16, "evaluation": {**SMALL_EVAL, "repeats": repeats}}, tokenizer=tokenizer)
    return model, report


def test_steady_runs_on_a_quiet_machine_are_not_flagged(quiet_machine, tiny_tokenizer):
    model, report = _compress_timed(tiny_tokenizer)
    data = json.loads(report.to_json())
    spread = data["final"]["latency_spread"]["decode_ms_per_token"]
    assert len(spread["runs"]) == 3 and spread["min"] <= spread["median"] <= spread["max"]
    assert data["baseline"]["latency_spread"]["prefill_ms_per_token"]["runs"]
    assert data["final"]["load_average"] == 0.0
    assert data["latency"] == {"reliable": True, "reasons": [], "interleaved": False, "threads": data["environment"]
                               ["threads"], "max_spread": 1.5}
    md = report.to_markdown()
    assert "unreliable" not in md and "latency as the median of 3 runs" in md
    card = _card_text(model, report)
    assert "**Latency:** median of 3 runs" in card and "unreliable" not in card


def test_load_average_above_thread_count_flags_latency(quiet_machine, monkeypatch, tiny_tokenizer):
    import torch

    from hfsqueeze.evaluation import measure

    monkeypatch.setattr(measure.os, "getloadavg", lambda: (torch.get_num_threads() + 3.5, 0.0, 0.0))
    model, report = _compress_timed(tiny_tokenizer)
    check = report.to_dict()["latency"]
    assert check["reliable"] is False and "load average" in check["reasons"][0]
    rows = [line for line in report.to_markdown().splitlines() if "latency (ms/token)" in line]
    assert len(rows) == 2 and all(row.endswith("x (unreliable) |") for row in rows)
    assert "Latency ratios are unreliable: the 1-minute load average" in report.to_markdown()
    card = _card_text(model, report)
    assert card.count("**(unreliable, see below)**") == 2 and "The latency ratios are unreliable:" in card


def test_noisy_runs_flag_latency(monkeypatch):
    import time

    from hfsqueeze.evaluation import measure

    monkeypatch.setattr(measure.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    model = make_tiny("llama")
    calls = []

    def noisy(module, args, kwargs):  # every other prompt-length forward is 30 ms slower: a machine that hiccups
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            calls.append(1)
            time.sleep(0.03 * (len(calls) // 2 % 2))

    model.register_forward_pre_hook(noisy, with_kwargs=True)
    result = measure.latency(model, torch_prompt(), decode_tokens=2, repeats=3)
    runs = result["latency_spread"]["prefill_ms_per_token"]["runs"]
    assert max(runs) / min(runs) > 1.5
    final = measure.Metrics(prefill_ms_per_token=result["prefill_ms_per_token"],
                            latency_spread=result["latency_spread"], load_average=0.0)
    steady = measure.Metrics(prefill_ms_per_token=1.0, latency_spread={
        "prefill_ms_per_token": {"min": 1.0, "median": 1.0, "max": 1.2, "runs": [1.0, 1.2, 1.0]}}, load_average=0.0)
    check = measure.latency_check(steady, final, threads=2, interleaved=False)
    assert not check["reliable"] and any("compressed model's prefill runs spread" in r for r in check["reasons"])
    assert measure.latency_check(steady, steady, threads=2, interleaved=False)["reliable"]


def torch_prompt():
    import torch

    return torch.arange(5, 21).unsqueeze(0)


def test_interleaved_latency_alternates_models(monkeypatch):
    from hfsqueeze.evaluation import measure

    monkeypatch.setattr(measure.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    a, b = make_tiny("llama"), make_tiny("llama")
    order = []
    a.register_forward_pre_hook(lambda m, args, kw: order.append("a") if kw["input_ids"].shape[1] > 1 else None,
                                with_kwargs=True)
    b.register_forward_pre_hook(lambda m, args, kw: order.append("b") if kw["input_ids"].shape[1] > 1 else None,
                                with_kwargs=True)
    ra, rb = measure.interleaved_latency([a, b], torch_prompt(), decode_tokens=2, repeats=3)
    # warm-up (prefill + decode prompt) per model, then rounds of prefill + decode, alternating a, b, a, b...
    assert order == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3
    assert len(ra["latency_spread"]["prefill_ms_per_token"]["runs"]) == 3 and rb["decode_ms_per_token"] > 0


def test_prefill_is_timed_as_generate_runs_it(monkeypatch):
    # generate() asks for the last position's logits only; timing the LM head over every prompt token measured work
    # no generation does.
    from hfsqueeze.evaluation import measure

    model = make_tiny("llama")
    seen = []
    model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("logits_to_keep")), with_kwargs=True)
    measure.latency(model, torch_prompt(), decode_tokens=0, repeats=2)
    assert seen == [1, 1, 1]


def test_compress_interleaves_when_the_original_is_in_memory(quiet_machine, monkeypatch, tiny_tokenizer):
    from hfsqueeze import api

    calls = []
    real = api.remeasure_latency_interleaved
    monkeypatch.setattr(api, "remeasure_latency_interleaved",
                        lambda original, model, *a, **k: (calls.append((original, model)), real(original, model, *a,
                                                                                                   **k)))
    model = make_tiny("llama")
    stage = {"method": "distill", "student": {"keep": 0.5}, "block_size": 32,
             "data": {"text": "builtin", "max_tokens": 2000, "eval_tokens": 256},
             "training_args": {"max_steps": 1, "per_device_train_batch_size": 2}}
    report = model.compress({"stages": [stage], "evaluation": {**SMALL_EVAL, "repeats": 2, "disk_size": False}},
                            tokenizer=tiny_tokenizer)
    assert len(calls) == 1 and calls[0][1] is model and calls[0][0] is not model
    assert report.latency_interleaved and report.to_dict()["latency"]["interleaved"] is True
    assert len(report.baseline.latency_spread["decode_ms_per_token"]["runs"]) == 2
    assert "alternating runs" in report.to_markdown()
    from hfsqueeze.evaluation.report import CompressionReport

    assert CompressionReport.from_dict(report.to_dict()).latency_interleaved  # survives report.json


# ---- latency: auto, the time budget, the bar ----------------------------------------------------------------------
def test_latency_auto_leaves_bitsandbytes_on_cpu_untimed_and_says_why(tiny_tokenizer):
    from hfsqueeze.evaluation.measure import BNB_CPU_LATENCY
    from hfsqueeze.evaluation.report import CompressionReport

    report = make_tiny("llama").compress({"stages": [{"method": "quantize", "bits": 8}], "evaluation": SMALL_EVAL},
                                         tokenizer=tiny_tokenizer)
    assert report.latency_skipped == BNB_CPU_LATENCY
    assert report.baseline.prefill_ms_per_token is None and report.final.decode_ms_per_token is None
    assert f"latency not measured: {BNB_CPU_LATENCY}." in report.to_markdown()
    assert CompressionReport.from_dict(report.to_dict()).latency_skipped == BNB_CPU_LATENCY
    # Asked for explicitly, it is timed; a recipe without bitsandbytes is timed by default.
    asked = make_tiny("llama").compress({"stages": [{"method": "quantize", "bits": 8}],
                                         "evaluation": {**SMALL_EVAL, "latency": True}}, tokenizer=tiny_tokenizer)
    assert asked.latency_skipped is None and asked.final.prefill_ms_per_token is not None
    cast = make_tiny("llama").compress({"stages": [{"method": "quantize", "bits": 16}], "evaluation": SMALL_EVAL},
                                       tokenizer=tiny_tokenizer)
    assert cast.latency_skipped is None and cast.final.prefill_ms_per_token is not None
    assert "latency_skipped" not in cast.to_dict()


class _Bar:
    """Records what a progress bar was told."""

    def __init__(self, desc: str, total: int | None = None):
        self.n, self.total, self.totals = 0, total, [total]

    def update(self, k: int = 1) -> None:
        self.n += k

    def refresh(self) -> None:
        self.totals.append(self.total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("max_seconds, rounds", [(1e-9, 1), (None, 3)])
def test_latency_time_budget_and_the_bar_counts_what_runs(max_seconds, rounds, monkeypatch):
    import torch

    from hfsqueeze.evaluation import measure as measure_mod

    bars = []
    monkeypatch.setattr(measure_mod, "progress_bar", lambda **k: bars.append(_Bar(**k)) or bars[-1])
    models = [make_tiny("llama"), make_tiny("llama")]
    results = measure_mod.interleaved_latency(models, torch.randint(5, 400, (1, 8)), decode_tokens=2, repeats=3,
                                              max_seconds=max_seconds)
    assert [len(r["latency_spread"]["decode_ms_per_token"]["runs"]) for r in results] == [rounds, rounds]
    bar = bars[0]
    assert bar.n == bar.total == (rounds + 1) * 2 * 2  # warm-up + rounds; prefill + decode; two models


def test_report_footer_counts_the_runs_really_timed(tiny_tokenizer):
    report = make_tiny("llama").compress(
        {"stages": [{"method": "quantize", "bits": 16}],
         "evaluation": {**SMALL_EVAL, "repeats": 5, "latency_seconds": 1e-9}}, tokenizer=tiny_tokenizer)
    assert "latency as the median of 1 run (" in report.to_markdown()


def test_compress_prints_next_steps_and_a_caption(model_dir, tmp_path):
    """After saving: the load line with the model's Auto class and the path as typed, the card, the push command."""
    proc = _run_cli("compress", "--model", str(model_dir), "--recipe", "int8", "--output", "out/tiny-int8",
                    "--set", "evaluation.max_tokens=128", "--set", "evaluation.seq_len=64", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert f"**{model_dir.name}** (LlamaForCausalLM), recipe **int8**:" in out
    assert "saved to out/tiny-int8\n\nNext steps:\n" in out
    assert ('  load it:     from transformers import AutoModelForCausalLM; '
            'model = AutoModelForCausalLM.from_pretrained("out/tiny-int8")\n') in out
    assert "  model card:  out/tiny-int8/README.md\n" in out
    assert "  push it:     hfsqueeze push out/tiny-int8 --repo <your-username>/tiny-int8" in out
    assert (tmp_path / "out/tiny-int8/README.md").is_file()
    from hfsqueeze.cli import build_parser
    assert build_parser().parse_args(["push", "out/tiny-int8", "--repo", "me/tiny-int8"]).repo == "me/tiny-int8"


# ---- CLI conventions ----------------------------------------------------------------------------------------------
NO_TORCH = """
import sys
from hfsqueeze.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


@pytest.mark.parametrize("argv, code", [(["recipes"], 0), (["--help"], 0), (["compress", "--help"], 0),
                                        (["compres"], 2), (["compress", "--bogus"], 2)])
def test_recipes_help_and_argument_errors_answer_without_torch(argv, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]


def test_recipes_is_a_grouped_table_within_100_columns(capsys):
    from hfsqueeze.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    groups = [line for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert groups == ["quantize:", "prune:", "distill:", "combined:"]
    assert "  int8 " in out.split("prune:")[0] and "  prune-int8 " in out.split("combined:")[1]
    assert out.splitlines()[0].split() == ["recipe", "for", "time", "what", "it", "does"]
    minilm = next(line for line in out.splitlines() if line.startswith("  prune-recover-minilm "))
    assert minilm.split()[1:3] == ["encoders", "6"]  # for sentence encoders; measured minutes


def test_did_you_mean_and_verbose_after_the_subcommand(capsys):
    from hfsqueeze.cli import build_parser, main

    with pytest.raises(SystemExit) as exc:
        main(["compres"])
    assert exc.value.code == 2 and "did you mean 'compress'?" in capsys.readouterr().err
    assert main(["validate", "int9"]) == 2
    assert "did you mean 'int8'?" in capsys.readouterr().err
    for override, close in [("quantize.threshhold=5", "'threshold'"), ("quantise.threshold=5", "'quantize'"),
                            ("evaluation.max_token=64", "'max_tokens'")]:
        assert main(["validate", "int8", "--set", override]) == 2
        assert f"(did you mean {close}?)" in capsys.readouterr().err
    parser = build_parser()
    assert parser.parse_args(["validate", "int8", "-v"]).verbose is True
    assert parser.parse_args(["-v", "validate", "int8"]).verbose is True
    assert parser.parse_args(["validate", "int8"]).verbose is False
    help_text = parser._subparsers._group_actions[0].choices["compress"].format_help()
    assert "Compress a model with a recipe" in help_text and "example:\n  hfsqueeze compress --output" in help_text


def test_cli_errors_speak_in_flags_not_python_arguments(tmp_path, capsys):
    from hfsqueeze.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["compress", "--output", str(out)]) == 2  # refused before the model loads
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err and "CLI:" not in err
