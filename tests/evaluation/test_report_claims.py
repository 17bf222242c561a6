"""The report's footer and the card claim only what was measured."""

from __future__ import annotations

from conftest import SMALL_EVAL, make_tiny

import hfsqueeze  # noqa: F401  (gives models .compress)
from outputkit import BF16, _card_text


# ---- the footer and the card say only what was measured ----------------------------------------------------------


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
