"""`Stage`: the one object through which a compression method meets the rest of hfsqueeze.

A stage owns its method's whole life, the way Transformers' ``HfQuantizer`` owns a quantization method's: what it can
check before the model runs (`Stage.validate`), the work itself (`Stage.apply`), recipe rewriting (`Stage.expand`),
how the report and the model card describe it (`Stage.describe`), what a saved artifact needs beyond
``save_pretrained`` (`Stage.saving`, `Stage.on_save`, `Stage.side_files` and the hooks after it, `Stage.load`,
`Stage.load_snippet`, `Stage.verify_code`) and what a tuner may vary and how it names and reaches the stage
(`Stage.search_space`, `Stage.search_section`, `Stage.label`, `Stage.targets`, `Stage.quantized_module`). Generic code
(compress, tune, save, card, hub) asks the registered stages and never branches on a method's name. Every hook but
`apply` has a default that does nothing.

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

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
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


@dataclasses.dataclass(frozen=True)
class SideFiles:
    """Files a stage writes into an artifact beside ``save_pretrained``'s (`Stage.on_save`), and how the generic code
    treats them: the disk size counts them when they are ``weights``, the parity file records their checksums under
    ``key`` (``null`` when the model had none) and refuses them changed, missing or added, the Hub push uploads
    `Stage.hub_file`'s bytes for them, and loading refuses them when ``backend`` is missing (it would drop them).

    Attributes:
        key: their entry in the parity file's metadata (``adapter``).
        name: how one-line errors name them (``LoRA adapter``: "holds a LoRA adapter", "the LoRA adapter's ...").
        names: their file names at the artifact's top.
        checksums: the keys of `Stage.side_file_checksums`, one per file of ``names``, in the same order.
        weights: they hold weights (counted in the disk size).
        backend: the package loading them needs; ``None``: nothing beyond Transformers.
        why: what they are, after ``holds a {name}`` when that package is missing.
        lost: what a model loaded without them lacks (``its recovery``).
    """

    key: str
    name: str
    names: tuple[str, ...]
    checksums: tuple[str, ...] = ()
    weights: bool = True
    backend: str | None = None
    why: str = ""
    lost: str = "them"


@dataclasses.dataclass(frozen=True)
class SearchSection:
    """Where a stage's keys sit in a tuning space file and how a tuner places the stage in a trial's recipe.

    Attributes:
        name: the space file's section (``recover`` for distill: it is tuned as recovery after pruning).
        via: the config key of other stages through which this stage enters a recipe (distill: prune's ``recover``,
            which `Stage.expand` turns into distill stages); ``None``: a stage of its own.
        not_searched: config keys a space file may not set (the solver picks them, or they are settings).
    """

    name: str
    via: str | None = None
    not_searched: tuple[str, ...] = ()


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

    @contextlib.contextmanager
    def saving(self, model: "nn.Module") -> Iterator["nn.Module"]:
        """Set aside, while ``save_pretrained`` writes the weights, what must not be in them (distill: the kept LoRA
        layers, written by `on_save` as side files)."""
        yield model

    def on_save(self, model: "nn.Module", directory: Path) -> None:
        """Write what the artifact needs beyond ``save_pretrained`` into ``directory`` (not yet moved into place)."""

    def side_files(self) -> SideFiles | None:
        """The files `on_save` may write beside the weights that save, disk size, parity and the Hub must know of."""
        return None

    def has_side_files(self, model: "nn.Module") -> bool:
        """Whether `on_save` writes this stage's `side_files` for ``model`` (distill: it carries a kept adapter)."""
        return False

    def side_file_checksums(self, directory: Path) -> dict[str, str]:
        """The checksums of the `side_files` in ``directory`` the parity file records and compares."""
        return {}

    def kept_side_files(self, stages: list[dict[str, Any]]) -> bool:
        """Whether a saved report's ``stages`` (dicts from ``report.json``) say the model was saved with this stage's
        `side_files`, so a missing one is refused before anything loads."""
        return False

    def hub_file(self, path: Path, repo_id: str) -> bytes | None:
        """What the Hub gets for the side file ``path`` when pushed to ``repo_id``; ``None``: the file as it is."""
        return None

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

    def search_section(self) -> SearchSection | None:
        """Where `search_space` goes in a tuning space file; ``None``: a tuner does not vary this stage."""
        return None

    def label(self, config: dict[str, Any]) -> str:
        """A few words naming one config of this stage in a list of trials (``prune h0.12/f0.1 (kl)``)."""
        return self.name

    def calibrated(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The same conversion fitted to calibration text (same format, same size on disk), for a tuner to try on its
        chosen point and keep when it measures better; ``None`` when this stage has no such variant for ``config``."""
        return None

    @property
    def per_module(self) -> bool:
        """Whether this stage converts modules one by one (`targets`, `quantized_module`), so a tuner can score and
        size each module in each format and pick which stay unconverted."""
        return type(self).quantized_module is not Stage.quantized_module

    def targets(self, model: "nn.Module", config: StageConfig) -> list[tuple[str, "nn.Module"]]:
        """The ``(name, module)`` pairs `apply` would convert for ``config``; empty unless `per_module`."""
        return []

    def quantized_module(self, module: "nn.Module", config: StageConfig) -> "nn.Module | None":
        """The module `apply` would put in place of ``module`` for ``config``; ``None`` unless `per_module`."""
        return None


def save_weights(model: "nn.Module", directory: str | Path, stages: Iterable[Stage], *,
                 side_files: bool = True) -> None:
    """Write the weights of an artifact as `save_compressed` does: ``model.save_pretrained(directory)`` with what each
    stage sets aside meanwhile (`Stage.saving`), then (``side_files``) each stage's `Stage.side_files` that hold
    weights, through its `Stage.on_save` (a kept LoRA adapter). The disk size is measured on exactly this."""
    stages = list(stages)
    with contextlib.ExitStack() as stack:
        for stage in stages:
            stack.enter_context(stage.saving(model))
        model.save_pretrained(directory)
    for stage in stages if side_files else ():
        declared = stage.side_files()
        if declared is not None and declared.weights and stage.has_side_files(model):
            stage.on_save(model, Path(directory))


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


__all__ = ["BASE_MODEL_RELATIONS", "Description", "FunctionStage", "ModelInfo", "SearchSection", "SideFiles", "Stage",
           "format_of", "save_weights"]
