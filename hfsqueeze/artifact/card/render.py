"""Render, merge and write a card: the sections become the variables of ``template.md`` (shipped as package data),
rendered with `huggingface_hub.ModelCard.from_template`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ...builtin.models import BUILTIN_CARD_NOTE, is_builtin_default
from ..load import load_snippet
from . import sections
from .metadata import (
    base_model_relation,
    card_datasets,
    card_tags,
    describe,
    eval_results,
    inherited_card_data,
    is_hub_id,
    pipeline_tag,
    resolve_base_model,
    stages,
)
from .tuning import tuning_card_section
from .usage import how_to_use, local_load_path, parity_note, reproduce, usage

logger = logging.getLogger("hfsqueeze")

CARD_START = "<!-- hfsqueeze:card:start -->"
CARD_END = "<!-- hfsqueeze:card:end -->"
TEMPLATE = Path(__file__).with_name("template.md")


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    if isinstance(report, dict):
        return report
    if hasattr(report, "to_dict"):
        return report.to_dict()
    raise TypeError(f"report must be a CompressionReport, a dict or None; got {type(report).__name__}")


def _block(lines: list[str]) -> str:
    """One section as text: runs of blank lines squeezed to one, none at either end."""
    out: list[str] = []
    for line in lines:
        if line == "" and (not out or out[-1] == ""):
            continue
        out.append(line)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out)


def _title(report: dict[str, Any] | None, cfg: dict[str, Any], base: str | None, repo_id: str | None) -> str:
    short = " + ".join(describe(s).short for s in stages(report))
    name = (base.split("/")[-1] if base else ((report or {}).get("model") or {}).get("architecture")
            or next(iter(cfg.get("architectures") or []), "model"))
    return repo_id.split("/")[-1] if repo_id else f"{name} ({short}, hfsqueeze)" if short else name


def _report_blocks(report: dict[str, Any] | None, files: Sequence[str] | None) -> dict[str, list[str]]:
    """The sections rendered from the measurements (none without a report)."""
    if not report:
        return {}
    tuning = report.get("tuning")
    if tuning and files is not None and tuning.get("plot") not in files:
        tuning = {**tuning, "plot": None}  # it stayed local with tuning/: no broken image on the Hub
    return {"results": sections.results_table(report), "texts": sections.texts_table(report),
            "stages": sections.stage_table(report), "tuning": tuning_card_section(tuning),
            "stage_sections": sections.stage_sections(report), "warnings": sections.warnings_section(report),
            "architecture": sections.architecture_diff(report)}


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
    from huggingface_hub import ModelCard, ModelCardData

    report_d = _report_dict(report)
    cfg = config if isinstance(config, dict) else {} if config is None else config.to_dict()
    name_or_path = ((report_d or {}).get("model") or {}).get("name_or_path") or cfg.get("_name_or_path")
    base = resolve_base_model(name_or_path)
    builtin = is_builtin_default(name_or_path)
    if recipe_yaml is None and report_d and report_d.get("recipe"):
        recipe_yaml = yaml.safe_dump(report_d["recipe"], sort_keys=False)
    task = pipeline_tag(report_d, cfg)
    title = _title(report_d, cfg, base, repo_id)
    extra: dict[str, Any] = inherited_card_data(name_or_path, out_dir)
    if base:
        extra.update(base_model=base, base_model_relation=base_model_relation(report_d))
    results = (eval_results(report_d, task) or None) if report_d and report_d.get("final") else None
    data = ModelCardData(
        library_name="transformers", pipeline_tag=task, tags=card_tags(report_d, cfg),
        datasets=card_datasets(report_d) or None,
        model_name=(repo_id.split("/")[-1] if repo_id else title) if results else None, eval_results=results,
        **extra,
    )
    out = Path(out_dir) if out_dir is not None else None
    blocks = {
        "title": [f"# {title}"], "summary": [sections.summary(report_d, cfg, base)],
        "builtin_note": [BUILTIN_CARD_NOTE] if builtin else [], **_report_blocks(report_d, files),
        "code": how_to_use(load_code, usage(task, load_path or repo_id, out, base)),
        "load_notes": sections.load_notes(report_d), "parity": parity_note(parity),
        "reproduce": reproduce(report_d, cfg, "builtin" if builtin else base),
        "files": sections.files_table(out, files), "versions": sections.versions(report_d),
    }
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE), card_start=CARD_START, card_end=CARD_END,
        recipe=recipe_yaml.strip() if recipe_yaml else "", **{k: _block(v) for k, v in blocks.items()},
    )


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
    """A merged card, in the layout ``template.md`` gives a fresh one, so merging twice gives the same bytes."""
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


__all__ = ["CARD_END", "CARD_START", "merge_model_card", "render_model_card", "write_model_card"]
