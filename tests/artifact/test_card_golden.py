"""Cards rendered from fixed reports are byte for byte the golden files in ``tests/data/cards``.

The reports were written once by tiny compressions (int8; nf4 from the built-in model; prune with recovery; int8
with a LoRA recovery and two evaluation texts; the same with the recovery dropped by the guard; a tuned artifact; an
``evaluate`` report). A change to the card's text must show up here as a changed golden file, reviewed in the diff:
regenerate them with ``HFSQUEEZE_UPDATE_GOLDEN=1 pytest tests/artifact/test_card_golden.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hfsqueeze.artifact.card import render_model_card

DATA = Path(__file__).resolve().parents[1] / "data" / "cards"
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 400}
LOAD = 'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained("acme/x")\n'
PARITY = {"loader": "the card's load code", "output": "logits", "tokens": 32, "max_abs_diff": 1.5e-6,
          "tolerance": 2.4e-4, "relative_tolerance": 1e-5, "top1_agreement": 1.0}

# (golden name, report, keyword arguments of render_model_card)
CASES = [
    ("int8", "int8", {"repo_id": "acme/tiny-int8", "parity": PARITY}),
    ("nf4", "nf4", {}),
    ("prune_recover", "prune_recover", {"repo_id": "acme/tiny-pruned"}),
    ("distill_lora", "distill_lora", {"repo_id": "acme/tiny-lora", "load_path": "acme/tiny-lora"}),
    ("distill_guard", "distill_guard", {}),
    ("tuned", "tuned", {"repo_id": "acme/tiny-tuned"}),
    ("tuned_plot_left_local", "tuned", {"repo_id": "acme/tiny-tuned", "files": []}),
    ("eval", "eval", {}),
]


@pytest.mark.parametrize(("golden", "report", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_card_is_byte_identical_to_its_golden_file(golden, report, kwargs):
    data = json.loads((DATA / f"{report}.report.json").read_text())
    card = str(render_model_card(CONFIG, data, load_code=LOAD, **kwargs))
    path = DATA / f"{golden}.README.md"
    if os.environ.get("HFSQUEEZE_UPDATE_GOLDEN"):
        path.write_text(card)
    assert card == path.read_text(), f"the card of {report}.report.json changed; see {path}"


def test_the_card_asks_the_stages_and_names_no_method():
    """The card package renders what `Stage.describe` gives: no method's name, no method's detail keys, and no file
    doing several jobs (each under 300 lines)."""
    import ast

    import hfsqueeze.artifact.card as card
    from hfsqueeze.registry import stages

    methods = {stage.name for stage in stages()}
    for path in Path(card.__file__).parent.glob("*.py"):
        source = path.read_text()
        assert len(source.splitlines()) <= 300, path.name
        strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)
                   and isinstance(n.value, str)}
        assert not strings & (methods | {"route", "kept", "quality", "regressions"}), path.name
