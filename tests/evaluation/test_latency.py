"""Latency ratios carry their spread and an "unreliable" flag when the machine was busy or the runs disagreed;
``latency: auto``, the time budget, the bar."""

from __future__ import annotations

import json

import pytest
from conftest import SMALL_EVAL, make_tiny

import hfsqueeze  # noqa: F401  (gives models .compress)
from outputkit import BF16, _card_text, _run_cli


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
