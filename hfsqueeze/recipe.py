"""Recipes: an ordered list of stages plus evaluation settings, loaded strictly from YAML, a dict or an object.

```yaml
name: int8
evaluation: {max_tokens: 4096}
stages:
  - method: quantize
    bits: 8
```
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Union

import yaml

from .core.config import ConfigBase, StageConfig, builtin_recipes_dir, did_you_mean
from .core.errors import RecipeError, prefixed
from .core.hf import check_placement
from .core.stage import ModelInfo
from .evaluation.config import EvaluationConfig
from .registry import available_stages, get_stage, stages

RECIPE_VERSION = 1
# Recipes are a few KB and a few levels deep. Larger or deeper input is refused before parsing goes far: PyYAML's
# composer recurses per level (a 5000-deep list was a RecursionError) and parses ~1 MB/s (a 51 MB file took minutes).
MAX_RECIPE_BYTES = 256 * 1024
MAX_RECIPE_DEPTH = 32


RECIPES_DIR = builtin_recipes_dir()


@dataclasses.dataclass
class Recipe(ConfigBase):
    """An ordered list of compression stages.

    Example:

    ```python
    recipe = Recipe.load({"stages": [{"method": "quantize", "bits": 4, "quant_type": "nf4"}]})
    recipe = Recipe.load("recipes/int8.yaml", overrides=["quantize.threshold=5.0"])
    ```
    """

    stages: list[StageConfig] = dataclasses.field(default_factory=list)
    name: str | None = None
    description: str | None = None
    models: str | None = dataclasses.field(
        default=None, metadata={"help": "which models the recipe is meant for (shown by `hfsqueeze recipes`)"})
    takes: str | None = dataclasses.field(
        default=None, metadata={"help": "measured wall time of the whole `hfsqueeze compress` with this recipe on "
                                "the built-in model, idle 2-core CPU (shown by `hfsqueeze recipes`)"})
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    version: int = RECIPE_VERSION
    recover: Any = dataclasses.field(
        default=None, metadata={"help": "'auto' or a mapping of distill options: a recovery (distill) stage after "
                                "each prune stage (see hfsqueeze.methods.distill.expand_recovery)"},
    )

    def __post_init__(self):
        if self.version != RECIPE_VERSION:
            self.fail("version", f"got {self.version}; this hfsqueeze reads recipe version {RECIPE_VERSION}")

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, source: "RecipeLike", overrides: list[str] | None = None) -> "Recipe":
        """Load from a `Recipe`, a dict, a YAML path, a built-in recipe name (``"int8"``) or a YAML string."""
        if isinstance(source, Recipe):
            if not overrides:
                return copy.deepcopy(source)  # parsed and checked when it was made: not parsed again
            data = source.to_dict()
        elif isinstance(source, dict):
            check_depth(source)
            data = copy.deepcopy(source)
        elif isinstance(source, (str, os.PathLike)):
            data = _read_yaml(source)
        else:
            raise RecipeError(f"a recipe must be a Recipe, a dict or a YAML path; got {type(source).__name__}")
        for item in overrides or []:
            _apply_override(data, item)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping with a 'stages' list; got {type(data).__name__}")
        data = dict(data)
        stages = data.pop("stages", None)
        if not isinstance(stages, list) or not stages:
            raise RecipeError("a recipe needs 'stages': a non-empty list of stages, each with a 'method'")
        parsed = [_parse_stage(i, s) for i, s in enumerate(stages, start=1)]
        base = super().from_dict(data, where="recipe")
        base.stages = parsed
        return base

    def to_dict(self) -> dict[str, Any]:
        out = {"version": self.version}
        if self.name is not None:
            out["name"] = self.name
        for key in ("description", "models", "takes"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.recover is not None:
            out["recover"] = self.recover
        out["evaluation"] = self.evaluation.to_dict()
        out["stages"] = [s.to_dict() for s in self.stages]
        return out

    def expanded(self) -> "Recipe":
        """The recipe as it will run: every registered stage may rewrite it (``recover:`` inserts distill stages)."""
        recipe = self
        for stage in stages():
            recipe = stage.expand(recipe)
        return recipe

    def validate(self, model: Any = None) -> "Recipe":
        """Check, before anything runs, what the recipe (and ``model``, when given) allow; return `expanded`.

        Every stage's `Stage.validate` runs in recipe order and sees the model as the stages before it leave it
        (`ModelInfo`): impossible orders (prune after a bitsandbytes quantize), bad ``recover`` values, unreadable
        local data files and, with a model, unsupported model types and targets the model cannot meet. The error
        names the stage.
        """
        return self.validated(model)[0]

    def validated(self, model: Any = None) -> tuple["Recipe", ModelInfo]:
        """`validate`, and the `ModelInfo` the stages say the model will have once the recipe ran (``quantized``
        by which backend, layer count...), e.g. to choose what is worth measuring before anything runs."""
        expanded = self.expanded()
        if model is not None:
            check_placement(model)  # offloaded weights: every stage rewrites weights in place and would fail midway
        info = ModelInfo.of(model) if model is not None else ModelInfo()
        for index, config in enumerate(expanded.stages, start=1):
            with prefixed(f"stage {index} ({config.method})"):
                info = get_stage(config.method).validate(config, info) or info
        return expanded, info

    def keeps_tensors(self, model: Any) -> bool:
        """Whether every stage leaves the tensors of ``model`` as it finds them (`StageConfig.keeps_tensors`, each
        stage seeing the model as the stages before it leave it), so a frozen original may share them."""
        info = ModelInfo.of(model)
        for config in self.expanded().stages:
            if not config.keeps_tensors(info):
                return False
            info = get_stage(config.method).validate(config, info) or info
        return True

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())


RecipeLike = Union[Recipe, dict, str, os.PathLike]


def _parse_stage(index: int, raw: Any) -> StageConfig:
    if not isinstance(raw, dict):
        raise RecipeError(f"stage {index}: expected a mapping with a 'method' key; got {raw!r}")
    raw = dict(raw)
    method = raw.pop("method", None)
    if method is None:
        raise RecipeError(f"stage {index}: missing key 'method'")
    try:
        spec = get_stage(method)
    except RecipeError as exc:
        raise RecipeError(f"stage {index}: {exc}") from None
    if not spec.applies:
        runnable = ", ".join(name for name in available_stages() if get_stage(name).applies)
        raise RecipeError(f"stage {index}: method {method!r} registers save/load hooks only and cannot be a recipe "
                          f"step; allowed: {runnable}")
    return spec.config_cls.from_dict(raw, where=f"stage {index} ({method})")


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (plain YAML keeps the last one silently, so
    ``bits: 8`` then ``bits: 4`` would run 4-bit), and nesting deeper than `MAX_RECIPE_DEPTH`. Keys brought in by a
    ``<<`` merge may still be overridden."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_RECIPE_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_RECIPE_DEPTH} levels (recipes need a few)",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.setdefault(key, line)
        except TypeError:  # an unhashable key: SafeLoader reports it itself
            continue
        if first != line:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {first}); each key may appear once",
                key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def safe_load_strict(text: str) -> Any:
    """`yaml.safe_load` with duplicate keys and nesting deeper than `MAX_RECIPE_DEPTH` refused (`StrictLoader`), and
    text over `MAX_RECIPE_BYTES` refused as a `RecipeError` before parsing."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{_kib(len(text))} of YAML is too large for a recipe or space file (at most "
                          f"{_kib(MAX_RECIPE_BYTES)}; built-in recipes are under 2 KiB)")
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass: no arbitrary objects


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def check_depth(data: Any, where: str = "recipe") -> None:
    """Refuse a dict/list nested deeper than `MAX_RECIPE_DEPTH` (a recipe given as a Python object), iteratively."""
    todo = [(data, 1)]
    while todo:
        item, depth = todo.pop()
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"{where} is nested deeper than {MAX_RECIPE_DEPTH} levels (recipes need a few)")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else ()
        todo.extend((child, depth + 1) for child in children)


def builtin_recipe_path(name: str) -> Path | None:
    path = RECIPES_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def _read_yaml(source: str | os.PathLike) -> dict:
    is_yaml_text = isinstance(source, str) and "\n" in source
    where = "the recipe text" if is_yaml_text else f"recipe {source}"  # never echo a whole YAML text
    path = Path(source)
    builtin = builtin_recipe_path(str(source)) if isinstance(source, str) and not is_yaml_text else None
    if is_yaml_text:
        text = source
    elif path.is_file():
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {source} is {_kib(size)}; a recipe is at most {_kib(MAX_RECIPE_BYTES)} "
                              "(built-in recipes are under 2 KiB)")
        text = path.read_text()
    elif builtin is not None:
        text = builtin.read_text()
    else:
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
        raise RecipeError(f"recipe not found: {str(source)!r}{did_you_mean(source, names)} is neither a file nor a "
                          f"built-in recipe ({', '.join(names)})")
    try:
        data = safe_load_strict(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{where} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping with a 'stages' list")
    return data


def _apply_override(data: dict, item: str) -> None:
    """Apply ``a.b=c``: ``quantize.threshold=5``, ``stages.2.bits=4`` (1-based), ``evaluation.max_tokens=512``."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key.path=value, e.g. quantize.threshold=5.0")
    path, _, raw_value = item.partition("=")
    try:
        value = safe_load_strict(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise RecipeError(f"override {item!r} has an empty key path")
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    head, rest = keys[0], keys[1:]
    if head == "stages":
        if not rest or not rest[0].isdigit() or not 1 <= int(rest[0]) <= len(stages):
            raise RecipeError(f"override {item!r}: 'stages.N' needs N between 1 and {len(stages)}")
        target, rest = stages[int(rest[0]) - 1], rest[1:]
    elif head in {s.get("method") for s in stages if isinstance(s, dict)}:
        matches = [s for s in stages if isinstance(s, dict) and s.get("method") == head]
        if len(matches) > 1:
            numbers = [str(i) for i, s in enumerate(stages, 1) if s in matches]
            raise RecipeError(f"override {item!r}: the recipe has {len(matches)} '{head}' stages "
                              f"(stages {', '.join(numbers)}); write stages.N.{'.'.join(rest)}=... instead")
        target = matches[0]
    elif head in ("evaluation", "name", "description", "recover"):
        target, rest = data, keys
    else:
        methods = sorted({s.get("method") for s in stages if isinstance(s, dict)})
        allowed = methods + ["stages.N", "evaluation", "name", "description", "recover"]
        raise RecipeError(f"override {item!r}: '{head}' is not a stage of this recipe"
                          f"{did_you_mean(head, allowed)}; use one of {', '.join(allowed)}")
    if not rest:
        raise RecipeError(f"override {item!r} names a stage but no key inside it")
    for key in rest[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise RecipeError(f"override {item!r}: '{key}' is not a mapping (set it as a whole: {key}=...)")
    target[rest[-1]] = value
