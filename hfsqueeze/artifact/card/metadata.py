"""The card's metadata (``ModelCardData``): base model and relation, pipeline tag, tags, datasets, the model-index,
and what a compressed model inherits from its base model's card (license, language)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ...core.data import BUILTIN_DATASETS
from ...core.hf import CAUSAL_LM_SUFFIXES
from ...builtin.models import BUILTIN_CARD_DATA, DEFAULT_MODEL_ID, is_builtin_default
from ...core.stage import Description, format_of
from ...evaluation.metrics import MEASURED
from ...registry import find_stage

logger = logging.getLogger("hfsqueeze")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".yaml", ".yml", ".gguf", ".safetensors", ".bin")
_DATA_KEYS = {"text", "dataset", "dataset_name", "calibration", "data", "train_data"}
_INHERITED_KEYS = ("license", "language")

_PIPELINES = [
    (CAUSAL_LM_SUFFIXES, "text-generation"),
    (("ForSequenceClassification",), "text-classification"),
    (("ForTokenClassification",), "token-classification"),
    (("ForQuestionAnswering",), "question-answering"),
    (("ForMaskedLM",), "fill-mask"),
]


def is_hub_id(value: Any) -> bool:
    """Whether ``value`` looks like a Hub repository id (and is not a local path or a built-in name)."""
    if not isinstance(value, str) or not value or value in ("builtin",) or value.startswith("builtin:"):
        return False
    if value.lower().endswith(_FILE_SUFFIXES) or os.path.exists(value):
        return False
    return bool(_HUB_ID.match(value)) and "/" in value


def resolve_base_model(name_or_path: Any) -> str | None:
    """The Hub id of the base model: ``name_or_path`` if it is one, SmolLM2's for the built-in model, else None."""
    if is_hub_id(name_or_path):
        return name_or_path
    return DEFAULT_MODEL_ID if is_builtin_default(name_or_path) else None


def pipeline_tag(report: dict[str, Any] | None, config: dict[str, Any]) -> str:
    """The Hub pipeline tag for the architecture (text-generation for causal LMs, feature-extraction otherwise)."""
    arch = ((report or {}).get("model") or {}).get("architecture") or next(iter(config.get("architectures") or []), "")
    for suffixes, tag in _PIPELINES:
        if arch.endswith(suffixes):
            return tag
    if ((report or {}).get("model") or {}).get("task") == "causal-lm":
        return "text-generation"
    return "feature-extraction"


def stages(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The report's stages with ``config`` and ``details`` always dicts (a report without results: its recipe's)."""
    if not report:
        return []
    found = report.get("stages") or []
    if found:
        return [{**s, "config": s.get("config") or {}, "details": s.get("details") or {}} for s in found]
    return [{"index": i, "method": s.get("method"), "config": s, "details": {}}
            for i, s in enumerate((report.get("recipe") or {}).get("stages") or [], start=1)]


def describe(stage: dict[str, Any]) -> Description:
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
    for stage in stages(report):
        tags += describe(stage).tags
    return list(dict.fromkeys(tags))


def base_model_relation(report: dict[str, Any] | None) -> str:
    """The relation all stages agree on (``quantized`` when every stage only quantizes); otherwise ``finetune``, the
    closest value the Hub allows for weights that were pruned or trained (``adapter`` and ``merge`` describe other
    things)."""
    relations = {describe(s).relation for s in stages(report)}
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
        for stage in stages(report):
            walk(stage["config"])
    return found


def _eval_dataset(text: Any) -> tuple[str, str]:
    """The model-index ``(dataset type, dataset name)`` of an evaluation text source."""
    if is_hub_id(text):
        return text, text
    if text is None or str(text) in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[str(text or "builtin")]
    name = Path(str(text)).name
    return name, name


def eval_results(report: dict[str, Any], task_type: str) -> list:
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
        for metric in MEASURED:
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


__all__ = ["base_model_relation", "card_datasets", "card_tags", "describe", "eval_results", "inherited_card_data",
           "is_hub_id", "pipeline_tag", "resolve_base_model", "stages"]
