"""The card's code: how to load and use the artifact, how the upload parity check loaded it, how to reproduce it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ...core.formatting import fmt_number
from ...core.hf import auto_class_name
from .metadata import is_hub_id

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def local_load_path(path: str | Path) -> str:
    """How a card names a local artifact: relative to the current directory when it is below it, else by its
    directory name; never an absolute path of the machine it was made on."""
    given = Path(path)
    if not given.is_absolute():
        return given.as_posix()
    try:
        return given.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return given.name


def _has_chat_template(out_dir: Path | None) -> bool:
    if out_dir is None:
        return False
    if any((out_dir / n).is_file() for n in ("chat_template.jinja", "chat_template.json")):
        return True
    config = out_dir / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def how_to_use(load_code: str, usage: list[str]) -> list[str]:
    """The load code followed by the usage example, as one script: ``AutoTokenizer`` (and ``torch`` where the
    example needs it) join the imports at the top."""
    lines = load_code.strip().splitlines()
    if not usage:
        return lines
    needed = ["AutoTokenizer"]
    at = next((i for i, ln in enumerate(lines) if ln.startswith("from transformers import ")), None)
    if at is not None and "(" not in lines[at]:
        lines[at] += "".join(f", {n}" for n in needed if n not in lines[at])
    else:
        lines = ["from transformers import AutoTokenizer", *lines]
    if any("torch." in ln for ln in usage) and "import torch" not in lines:
        lines = ["import torch", *lines]
    return lines + usage


def usage(task: str, target: str | None, out_dir: Path | None, base: str | None) -> list[str]:
    """Code that continues the load code: generate (with the chat template when the tokenizer has one), embed
    (encoders) or score, with the artifact's own tokenizer (the base model's when none was saved)."""
    saved = out_dir is None or any((out_dir / n).is_file() for n in _TOKENIZER_FILES)
    source = target if saved else base
    if not source:
        return []
    lines = ["", f'tokenizer = AutoTokenizer.from_pretrained("{source}")']
    if task == "text-generation" and _has_chat_template(out_dir):
        return lines + [
            'messages = [{"role": "user", "content": "What is the capital of France?"}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
            'return_tensors="pt")',
            "outputs = model.generate(**inputs, max_new_tokens=40)",
            'print(tokenizer.decode(outputs[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        ]
    if task == "text-generation":
        return lines + [
            'inputs = tokenizer("The capital of France is", return_tensors="pt")',
            "outputs = model.generate(**inputs, max_new_tokens=40)",
            "print(tokenizer.decode(outputs[0], skip_special_tokens=True))",
        ]
    if task == "feature-extraction":
        return [*lines, "",
                'batch = tokenizer(["A first sentence.", "And a second one."], padding=True, return_tensors="pt")',
                "with torch.no_grad():", "    hidden = model(**batch).last_hidden_state",
                "# mean pooling over the real tokens: one embedding per sentence",
                'mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)',
                "embeddings = (hidden * mask).sum(1) / mask.sum(1)", "print(embeddings.shape)"]
    return [*lines, "", 'inputs = tokenizer("A first sentence.", return_tensors="pt")',
            "with torch.no_grad():", "    logits = model(**inputs).logits", "print(logits.shape)"]


def parity_note(parity: dict[str, Any] | None) -> list[str]:
    """How the upload parity check reloaded the artifact and how close its outputs came."""
    if not parity:
        return []
    return [
        "Before upload this artifact was reloaded in a fresh process with "
        + ("exactly this code" if parity.get("loader") == "the card's load code" else
           "`hfsqueeze.load_compressed` (no code from the artifact ran)")
        + f", and its "
        f"{parity.get('output', 'outputs')} on a fixed {parity.get('tokens')}-token input were compared with the "
        f"compressed model's: largest absolute difference {fmt_number(parity.get('max_abs_diff', 0.0))} "
        f"(tolerance {fmt_number(parity.get('tolerance', 0.0))}: {parity.get('relative_tolerance', 0.0):.2g} of the "
        "largest reference value)"
        + (f", top-1 agreement {parity['top1_agreement']:.2%}" if parity.get("top1_agreement") is not None
           else "") + ".", "",
    ]


def _compress_lines(head: list[str], load: list[str]) -> list[str]:
    return [
        "With Python, using the recipe file of this repository (`recipe.yaml`):", "", "```python", "import hfsqueeze",
        *head, "", *load,
        'report = hfsqueeze.compress(model, "recipe.yaml", tokenizer=tokenizer)',
        "print(report.to_markdown())",
        'hfsqueeze.save_compressed(model, "compressed", tokenizer=tokenizer)', "```", "",
    ]


def reproduce(report: dict[str, Any] | None, config: dict[str, Any], base: str | None) -> list[str]:
    """The command line that made the artifact, and the same in Python from its base model."""
    if not report or not report.get("recipe"):
        return []
    lines = ["## Reproduce", ""]
    if report.get("command"):
        lines += ["With the command line that produced this artifact:", "", "```bash", report["command"], "```", ""]
    source = base or ((report.get("model") or {}).get("name_or_path") or None)
    if source and source != "builtin" and not is_hub_id(source):
        source = local_load_path(source)  # the base model's directory on the machine that made it
    if source == "builtin":
        lines += _compress_lines(["from hfsqueeze.models import load_model"],
                                 ['model, tokenizer = load_model("builtin")  # SmolLM2-135M-Instruct, as described '
                                  'above'])
    elif source:
        archs = config.get("architectures") or [(report.get("model") or {}).get("architecture")]
        auto = auto_class_name(SimpleNamespace(architectures=archs))
        lines += _compress_lines([f"from transformers import {auto}, AutoTokenizer"],
                                 [f'model = {auto}.from_pretrained("{source}")',
                                  f'tokenizer = AutoTokenizer.from_pretrained("{source}")'])
    elif not report.get("command"):
        return []
    return lines


__all__ = ["how_to_use", "local_load_path", "parity_note", "reproduce", "usage"]
