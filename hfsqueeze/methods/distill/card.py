"""How the model card describes a distill stage: its recovery section (quality before training, trained, saved) and
the note a kept LoRA adapter needs beside the load code. Rendered from the stage's details in ``report.json``."""

from __future__ import annotations

from typing import Any

from ...core.formatting import fmt_number

ADAPTER_NOTE = ("This artifact holds a LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) beside the "
                "quantized base. `from_pretrained` applies it when `peft` is installed (`pip install peft`); without "
                "peft, Transformers loads the quantized base alone and the recovery is lost.")
_SHOWN = ("kl_divergence", "perplexity", "embedding_cosine")


def recovery_section(details: dict[str, Any]) -> list[str]:
    """What the recovery did to quality, per text: before training / trained / as saved; empty without ``quality``
    (a distill stage that is not a recovery, or a report written before recoveries were measured)."""
    quality = details.get("quality")
    if not quality:
        return []
    lines: list[str] = []
    if details.get("kept") == "before":
        lines += ["**Recovery made the model worse, so hfsqueeze kept the model from before recovery** "
                  f"({'; '.join(details.get('regressions') or [])}).", ""]
    elif details.get("route") == "adapter":
        lines += ["The recovery is a LoRA adapter kept unmerged beside the quantized weights (merging would "
                  "re-quantize them and round the update away).", ""]
    lines += ["| Text | Metric | Before recovery | Trained | Saved |", "|---|---|---:|---:|---:|"]
    for label, points in quality.items():
        for key in [k for k in _SHOWN if (points.get("before") or {}).get(k) is not None]:
            cells = [fmt_number(p[key]) if p and p.get(key) is not None else "" for p in
                     (points.get("before"), points.get("trained"), points.get("saved"))]
            lines.append(f"| {label} | {key.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return lines


def load_note(details: dict[str, Any]) -> str:
    """The adapter note when the recovery is a LoRA adapter kept beside quantized weights."""
    return ADAPTER_NOTE if details.get("route") == "adapter" else ""


__all__ = ["ADAPTER_NOTE", "load_note", "recovery_section"]
