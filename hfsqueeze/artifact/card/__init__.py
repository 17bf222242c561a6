"""Model cards for compressed artifacts, rendered from ``template.md`` with huggingface_hub's `ModelCard`.

Every number in a card comes from the artifact's report (``report.json``); a section whose data is missing is left
out rather than filled with placeholder text. Each stage adds its own words through `Stage.describe` (label, tags,
per-layer rows, a section of its own, a note beside the load code); the card never asks which stage it holds. The
generated body sits between two HTML comments, so pushing again replaces exactly that part and keeps whatever the
repository owner wrote around it (see `merge_model_card`).

- `metadata`: ``ModelCardData``: base model and relation, pipeline tag, tags, datasets, model-index, license.
- `sections`: the body's sections; `tuning`: the "Tuning" section; `usage`: load, usage and reproduce code.
- `render`: `render_model_card`, `merge_model_card`, `write_model_card`.
"""

from __future__ import annotations

from ...core.stage import BASE_MODEL_RELATIONS
from .metadata import (
    base_model_relation,
    card_datasets,
    card_tags,
    inherited_card_data,
    is_hub_id,
    pipeline_tag,
    resolve_base_model,
)
from .render import CARD_END, CARD_START, merge_model_card, render_model_card, write_model_card
from .tuning import tuning_card_section
from .usage import local_load_path

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
    "resolve_base_model",
    "tuning_card_section",
    "write_model_card",
]
