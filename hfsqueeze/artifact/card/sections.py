"""The card's body sections, each a list of markdown lines rendered from the report: summary, results, notes on how
they were measured, quality per text, stage by stage, each stage's own section, warnings, architecture changes,
files, versions. A section whose data is missing is left out rather than filled with placeholder text."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...core.data import BUILTIN_TEXT_LABEL
from ...core.formatting import fmt_bytes, fmt_number, fmt_params
from ...evaluation.metrics import MEASURED, format_change
from .metadata import describe, is_hub_id, stages

_LATENCY_KEYS = tuple(m.key for m in MEASURED if m.latency)
# Measures against the original: the original's own value is the reference (0 or 1), not a measurement.
_AGAINST_ORIGINAL = ("kl_divergence", "top1_agreement", "embedding_cosine")

_FILE_ROLES = [
    (re.compile(r".*\.safetensors\.index\.json$"), "index of the weight shards"),
    (re.compile(r"^parity\.safetensors$"), "fixed input ids and the compressed model's outputs at save time "
                                           "(the upload parity check compares against them)"),
    (re.compile(r".*\.safetensors$"), "weights"),
    (re.compile(r"^config\.json$"), "model configuration (including `quantization_config` when quantized)"),
    (re.compile(r"^generation_config\.json$"), "generation defaults"),
    (re.compile(r"^(tokenizer.*|special_tokens_map\.json|vocab\..*|merges\.txt|chat_template\..*)$"), "tokenizer"),
    (re.compile(r"^recipe\.yaml$"), "the hfsqueeze recipe that produced these weights"),
    (re.compile(r"^report\.json$"), "every measurement behind this card"),
    (re.compile(r".*\.(png|svg)$"), "plot written by a stage"),
]


def _runs_range(metrics: dict[str, Any], key: str, fmt) -> str:
    """`` (min-max)`` of the timed runs behind a latency median, when there was more than one run."""
    spread = (metrics.get("latency_spread") or {}).get(key)
    if not spread or len(spread.get("runs") or []) < 2:
        return ""
    return f" ({fmt(spread['min'])}–{fmt(spread['max'])})"


def _text_label(text: Any) -> str:
    if text in (None, "builtin"):
        return BUILTIN_TEXT_LABEL
    if is_hub_id(text):
        return f"[{text}](https://huggingface.co/datasets/{text})"
    return f"`{Path(str(text)).name}`" if os.path.sep in str(text) else f"`{text}`"


def summary(report: dict[str, Any] | None, config: dict[str, Any], base: str | None) -> str:
    model = (report or {}).get("model") or {}
    arch = model.get("architecture") or next(iter(config.get("architectures") or []), config.get("model_type"))
    source = f"[{base}](https://huggingface.co/{base})" if base else f"a `{arch}` model"
    found = stages(report)
    if not found:
        return (f"This is {source} saved with hfsqueeze without a "
                "compression report, so no measurements are shown.")
    steps = "; then ".join(describe(s).label for s in found)
    text = f"This is {source} compressed with hfsqueeze: {steps}."
    base_m, final = (report or {}).get("baseline") or {}, (report or {}).get("final") or {}
    facts = []
    if base_m.get("disk_bytes") and final.get("disk_bytes"):
        facts.append(f"weights on disk go from {fmt_bytes(base_m['disk_bytes'])} to {fmt_bytes(final['disk_bytes'])} "
                     f"({base_m['disk_bytes'] / final['disk_bytes']:.2f}x smaller)")
    if base_m.get("parameters") and final.get("parameters") and base_m["parameters"] != final["parameters"]:
        facts.append(f"parameters from {fmt_params(base_m['parameters'])} to {fmt_params(final['parameters'])}")
    if base_m.get("perplexity") is not None and final.get("perplexity") is not None:
        facts.append(f"perplexity from {fmt_number(base_m['perplexity'])} to {fmt_number(final['perplexity'])}")
    if final.get("kl_divergence") is not None:
        facts.append(f"the KL divergence to the original model is {fmt_number(final['kl_divergence'])} nats/token")
    if final.get("top1_agreement") is not None:
        facts.append(f"it predicts the same next token as the original {final['top1_agreement']:.2%} of the time")
    if final.get("embedding_cosine") is not None:
        facts.append(f"its embeddings have cosine similarity {final['embedding_cosine']:.4f} to the original's")
    if facts:
        text += " Measured on the same text and machine: " + "; ".join(facts) + "."
    return text


def results_table(report: dict[str, Any]) -> list[str]:
    baseline, final = report.get("baseline") or {}, report.get("final") or {}
    if not baseline and not final:
        return []
    check = report.get("latency")
    unreliable = bool(check) and not check.get("reliable", True)
    lines = ["## Results", "", "| Metric | Original | Compressed | Change |", "|---|---:|---:|---|"]
    for metric in MEASURED:
        key, fmt = metric.key, metric.fmt
        before, after = baseline.get(key), final.get(key)
        if before is None and after is None:
            continue
        if key in _AGAINST_ORIGINAL and before in (0, 0.0, 1, 1.0):
            shown_before = f"{fmt(before)} (reference)"
        else:
            shown_before = fmt(before) if before is not None else "not measured"
        shown_after = fmt(after) if after is not None else "not measured"
        change = format_change(metric.change, before, after, fmt)
        if metric.latency:
            shown_before += _runs_range(baseline, key, fmt)
            shown_after += _runs_range(final, key, fmt)
            if change and unreliable:
                change += " **(unreliable, see below)**"
        lines.append(f"| {metric.label} | {shown_before} | {shown_after} | {change} |")
    return lines + ["", *_measurement_notes(report)]


def _latency_note(report: dict[str, Any]) -> str | None:
    ev, check = report.get("evaluation") or {}, report.get("latency")  # absent from reports before latency checks
    measured = any((report.get(which) or {}).get(key) is not None
                   for which in ("baseline", "final") for key in _LATENCY_KEYS)
    if not measured and report.get("latency_skipped"):  # `latency: auto` left it out, and says why
        return f"- **Latency:** not measured: {report['latency_skipped']}."
    if not measured:  # not without a tokenizer, not with `latency: false`
        return None
    # The runs really timed (`latency_seconds` may stop before `repeats`), as the report's footer counts them.
    counts = sorted({len(spread.get("runs") or []) for which in ("baseline", "final")
                     for spread in ((report.get(which) or {}).get("latency_spread") or {}).values()})
    count = ev.get("repeats") if not counts else counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    runs = f"{count} run{'s' if str(count) != '1' else ''}"
    how = ""
    if check:
        how = (", the original and the compressed model timed in alternating runs" if check.get("interleaved")
               else ", the original timed before compression, the compressed model after")
    note = (f"- **Latency:** median of {runs} (range in brackets){how}; prefill of a "
            f"{ev.get('prompt_tokens')}-token prompt and {ev.get('decode_tokens')} greedy decode steps, batch "
            "size 1.")
    if check and not check.get("reliable", True):
        note += " **The latency ratios are unreliable:** " + "; ".join(check.get("reasons") or []) + "."
    return note


def _measurement_notes(report: dict[str, Any]) -> list[str]:
    env, ev = report.get("environment") or {}, report.get("evaluation") or {}
    notes = []
    hw = [env.get("cpu")] if env.get("cpu") else []
    if env.get("threads"):
        hw.append(f"{env['threads']} threads")
    if env.get("device"):
        hw.append(f"device `{env['device']}`")
    libs = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "bitsandbytes") if env.get(k))
    if hw:
        notes.append(f"- **Hardware:** {', '.join(hw)}" + (f" ({libs})" if libs else "") + ".")
    tokens = ev.get("eval_tokens") or (report.get("final") or {}).get("eval_tokens")
    if tokens:
        notes.append(f"- **Quality:** {tokens:,} tokens of {_text_label(ev.get('text'))}, scored in windows of "
                     f"{ev.get('seq_len')} tokens; KL divergence and top-1 agreement compare every next-token "
                     "distribution with the original model's on the same tokens.")
    latency = _latency_note(report)
    if latency:
        notes.append(latency)
    if report.get("command"):
        notes.append(f"- **Command:** `{report['command']}`")
    if report.get("created"):
        notes.append(f"- **Measured:** {report['created']}")
    return notes


def stage_table(report: dict[str, Any]) -> list[str]:
    shown_stages = [s for s in stages(report) if s.get("metrics") or s.get("seconds") is not None]
    if len(shown_stages) < 2 and not any(s.get("details") for s in shown_stages):
        return []
    shown = [m for m in MEASURED if len(shown_stages) > 1 and m.per_stage
             and any((s.get("metrics") or {}).get(m.key) is not None for s in shown_stages)]
    head = ["#", "Stage", "Time (s)", *[m.label for m in shown], "Details"]
    lines = ["### Stage by stage", "", "| " + " | ".join(head) + " |",
             "|---:|---|---:|" + "---:|" * len(shown) + "---|"]
    for s in shown_stages:
        m = s.get("metrics") or {}
        details = ", ".join(
            f"{k.replace('_', ' ')}: {f'{v:,}' if isinstance(v, int) else v}" for k, v in s["details"].items()
            if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k not in ("artifacts", "seconds")
        )
        seconds = f"{s['seconds']:.1f}" if s.get("seconds") is not None else ""
        cells = [str(s.get("index", "")), describe(s).label, seconds,
                 *[row.fmt(m[row.key]) if m.get(row.key) is not None else "" for row in shown], details]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def texts_table(report: dict[str, Any]) -> list[str]:
    """Quality on every evaluation text when the recipe named several (``evaluation.text`` as a list)."""
    before, after = (report.get("baseline") or {}).get("texts") or {}, (report.get("final") or {}).get("texts") or {}
    if len(after) < 2:
        return []
    lines = ["### Quality on each evaluation text", "", "| Text | Metric | Original | Compressed |",
             "|---|---|---:|---:|"]
    for label, metrics in after.items():
        for metric in MEASURED:
            if metrics.get(metric.key) is None:
                continue
            b = (before.get(label) or {}).get(metric.key)
            shown = metric.fmt(b) if b is not None else "not measured"
            lines.append(f"| {label} | {metric.label} | {shown} | {metric.fmt(metrics[metric.key])} |")
    return lines


def stage_sections(report: dict[str, Any]) -> list[str]:
    """Each stage's own section (`Description.section`), in stage order."""
    lines: list[str] = []
    for stage in stages(report):
        described = describe(stage)
        if described.section:
            lines += [f"### {described.section_title} (stage {stage.get('index')})", "", *described.section, ""]
    return lines


def load_notes(report: dict[str, Any] | None) -> list[str]:
    """What loading needs beyond the code, from the stages (`Description.load_note`), each said once."""
    notes = dict.fromkeys(describe(s).load_note for s in stages(report))
    return [line for note in notes if note for line in (note, "")]


def warnings_section(report: dict[str, Any]) -> list[str]:
    """What the recipe asked for but did not get (e.g. a prune target that rounded), from ``report["warnings"]``."""
    notes = report.get("warnings") or []
    if not notes:
        return []
    return ["## Warnings", "", "The recipe did not run exactly as written:", "", *[f"- {n}" for n in notes], ""]


def architecture_diff(report: dict[str, Any] | None) -> list[str]:
    """The per-layer tables the stages give (`Description.layer_rows`)."""
    lines: list[str] = []
    for stage in stages(report):
        described = describe(stage)
        rows = described.layer_rows
        if not rows:
            continue
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns and not isinstance(row[k], (dict, list))]
        if not lines:
            lines = ["## Architecture changes", ""]
        lines += [f"Per-layer result of stage {stage.get('index')} ({described.label}):", "",
                  "| " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|" + "---:|" * len(columns)]
        for row in rows:
            lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
        lines.append("")
    return lines


def files_table(out_dir: Path | None, files: Sequence[str] | None = None) -> list[str]:
    if out_dir is None or not out_dir.is_dir():
        return []
    rows = ["| `README.md` |  | this card |"]
    if files is None:
        files = [p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*")
                 if p.is_file() and not p.name.startswith(".")]
    for name in sorted(files):
        path = out_dir / name
        if name == "README.md":
            continue
        role = next((r for pat, r in _FILE_ROLES if pat.match(path.name)), "")
        rows.append(f"| `{name}` | {fmt_bytes(path.stat().st_size)} | {role} |")
    return ["## Files", "", "| File | Size | Contents |", "|---|---:|---|", *sorted(rows), ""]


def versions(report: dict[str, Any] | None) -> list[str]:
    env = (report or {}).get("environment") or {}
    skip = {"cpu", "threads", "device"}
    rows = [f"| {k} | {v} |" for k, v in env.items() if k not in skip and v is not None]
    return ["## Library versions", "", "| Package | Version |", "|---|---|", *rows, ""] if rows else []


__all__ = ["architecture_diff", "files_table", "load_notes", "results_table", "stage_sections", "stage_table",
           "summary", "texts_table", "versions", "warnings_section"]
