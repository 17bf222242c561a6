"""`Stage`: the one object through which a compression method meets the rest of hfsqueeze.

A stage owns its method's whole life, the way Transformers' ``HfQuantizer`` owns a quantization method's: what it can
check before the model runs (`Stage.validate`), the work itself (`Stage.apply`), recipe rewriting (`Stage.expand`),
how the report and the model card describe it (`Stage.describe`), what a saved artifact needs beyond
``save_pretrained`` (`Stage.on_save`, `Stage.load`, `Stage.load_snippet`, `Stage.verify_code`) and what a tuner may
vary (`Stage.search_space`). Generic code (compress, save, card, hub) asks the registered stages and never branches
on a method's name. Every hook but `apply` has a default that does nothing.

```python
class CastStage(Stage):
    name, config_cls = "cast", CastConfig

    def apply(self, model, config, ctx):
        model.to(torch.bfloat16)
        return {"format": "bf16"}

hfsqueeze.register_stage(CastStage())
```
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from .config import StageConfig
from .errors import UnsupportedModelError
from .hf import num_layers, quantization_method
from .search import Param

if TYPE_CHECKING:
    from torch import nn

    from .context import CompressionContext

# base_model_relation values the Hub accepts (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model)
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a stage can check before anything runs: the model as it will enter the stage.

    `Recipe.validate` builds it from the loaded model (or leaves it empty when only the recipe is checked, as
    ``hfsqueeze validate`` does), and each stage's `Stage.validate` returns it changed for the stages after it.
    ``None`` means unknown: check only what is known.

    Attributes:
        model_type, architecture, num_layers: the model's type, class name and layer count.
        quantized: the method its weights are quantized with (``"bitsandbytes"``), by the load or an earlier stage.
        frozen_by: the earlier stage that quantized them (``"bitsandbytes int8"``), for messages about stage order.
        model: the loaded model while no earlier stage has changed its shapes (for checks that read its layers).
    """

    model_type: str | None = None
    architecture: str | None = None
    num_layers: int | None = None
    quantized: str | None = None
    frozen_by: str | None = None
    model: Any = None

    @classmethod
    def of(cls, model: "nn.Module") -> "ModelInfo":
        config = getattr(model, "config", None)
        try:
            layers = num_layers(model)
        except UnsupportedModelError:  # a model without a layer count: leave it unknown
            layers = None
        return cls(getattr(config, "model_type", None), type(model).__name__, layers, quantization_method(model),
                   None, model)

    @property
    def known(self) -> bool:
        """Whether a model was given at all (``hfsqueeze validate`` checks a recipe without one)."""
        return self.model_type is not None

    def replace(self, **changes: Any) -> "ModelInfo":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class Description:
    """How the report and the model card name one applied stage.

    Attributes:
        label: a phrase for prose and tables (``8-bit LLM.int8 (bitsandbytes, outlier threshold 6.0)``).
        short: a word for titles and commit messages (``int8``, ``pruned``).
        tags: Hub tags this stage adds to the card.
        relation: the card's ``base_model_relation`` if this were the only stage (``quantized`` or ``finetune``).
        layer_rows: per-layer architecture changes, one dict per layer, shown as a table in the card.
        section_title, section: a card section of the stage's own (markdown lines), headed
            ``### {section_title} (stage N)``; none when ``section`` is empty.
        load_note: a paragraph the card puts after its load code (what loading this artifact needs).
    """

    label: str
    short: str
    tags: list[str] = dataclasses.field(default_factory=list)
    relation: str = "finetune"
    layer_rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    section_title: str = ""
    section: list[str] = dataclasses.field(default_factory=list)
    load_note: str = ""


def format_of(details: dict[str, Any]) -> str | None:
    """The short format a stage reported in its details (``int8``, ``nf4-dq``), if any."""
    value = details.get("format") if isinstance(details, dict) else None
    return value if isinstance(value, str) and value else None


class Stage:
    """Base class of every compression method. Subclasses set `name` and `config_cls` and implement `apply`."""

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[StageConfig]] = StageConfig

    def validate(self, config: StageConfig, info: ModelInfo) -> ModelInfo | None:
        """Check ``config`` against the model before anything runs; raise `RecipeError` (or `UnsupportedModelError`).

        `compress` calls this for every stage before measuring the baseline, so a recipe that cannot run fails in a
        second. Return ``info`` changed when the stage changes what later stages can check (``None``: unchanged).
        """
        return None

    @property
    def applies(self) -> bool:
        """Whether this stage can be a recipe step. A stage may register only save/load hooks (no `apply`); a recipe
        naming it is refused when it is parsed, before any work."""
        return type(self).apply is not Stage.apply

    def apply(self, model: "nn.Module", config: StageConfig, ctx: "CompressionContext") -> dict[str, Any]:
        """Compress ``model`` in place; return the details for the report (JSON-friendly values)."""
        # Unreachable through recipes (see `applies`); only a direct call on a hook-only stage gets here.
        raise NotImplementedError(f"stage {self.name!r} registers save/load hooks only; it has no apply")

    def expand(self, recipe: Any) -> Any:
        """Return the recipe, rewritten when this stage adds stages of its own (e.g. recovery after pruning)."""
        return recipe

    def describe(self, config: dict[str, Any], details: dict[str, Any]) -> Description:
        """Name one applied stage from its saved ``config`` and ``details`` (dicts from ``report.json``)."""
        return Description(label=self.name, short=format_of(details) or self.name, tags=[self.name])

    def on_save(self, model: "nn.Module", directory: Path) -> None:
        """Write what the artifact needs beyond ``save_pretrained`` into ``directory`` (not yet moved into place)."""

    def load(self, path: str, config: Any, **kwargs: Any) -> "nn.Module | None":
        """Load an artifact this stage wrote files for (`hfsqueeze.load_compressed`); ``None``: not this stage's."""
        return None

    def load_snippet(self, config: Any, path_or_repo: str) -> str | None:
        """The Python code that loads such an artifact without hfsqueeze (it defines ``model``); ``None``: stock."""
        return None

    def verify_code(self, file: Path, config: Any) -> bool | None:
        """Claim a Python file of an artifact: ``True`` when this stage wrote it and it is byte for byte what this
        version writes for ``config``; raise `ArtifactError` when it is this stage's file but altered; ``None``: not
        this stage's. A file no stage claims is never run or uploaded unless the user trusts it."""
        return None

    def search_space(self, info: ModelInfo | None = None) -> dict[str, Param]:
        """What a tuner may vary in this stage's config (see `hfsqueeze.core.search`).

        A drawn point is a config dict for ``config_cls.from_dict``; the config may still refuse a combination
        (a `RecipeError`), which a tuner counts as an infeasible trial.
        """
        return {}


class FunctionStage(Stage):
    """A stage made from an ``apply(model, config, ctx)`` function (``@register_stage(name, ConfigClass)``)."""

    def __init__(self, name: str, config_cls: type[StageConfig],
                 fn: Callable[["nn.Module", StageConfig, "CompressionContext"], dict[str, Any]],
                 validate: Callable[[StageConfig, ModelInfo], "ModelInfo | None"] | None = None):
        self.name, self.config_cls, self.fn, self._validate = name, config_cls, fn, validate

    def validate(self, config: StageConfig, info: ModelInfo) -> ModelInfo | None:
        return self._validate(config, info) if self._validate is not None else None

    def apply(self, model: "nn.Module", config: StageConfig, ctx: "CompressionContext") -> dict[str, Any]:
        return self.fn(model, config, ctx)


__all__ = ["BASE_MODEL_RELATIONS", "Description", "FunctionStage", "ModelInfo", "Stage", "format_of"]
