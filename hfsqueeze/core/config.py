"""Strict dataclass configs: the base class every stage config derives from.

A config is a dataclass whose fields carry ``metadata={"help": ...}``. `from_dict` refuses unknown keys and wrong
types with one line naming the key, the value received and what is allowed; `to_dict` gives the one canonical dict
(``method`` first, then the fields in declaration order). Value checks that need more than a type live in
``__post_init__`` and raise `RecipeError` through `ConfigBase.fail`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import RecipeError


def builtin_recipes_dir() -> Path:
    """The built-in recipes: ``hfsqueeze/recipes`` in an installed wheel (package data mapped from the top-level
    ``recipes/`` folder, see pyproject), else ``recipes/`` next to the package (a source checkout or editable
    install). Here, importing nothing heavy, so ``hfsqueeze recipes`` answers without torch."""
    packaged = Path(__file__).resolve().parent.parent / "recipes"
    return packaged if packaged.is_dir() else packaged.parent.parent / "recipes"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_describe(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked against (and, for nested configs, converted to) ``tp``; raise RecipeError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
        raise RecipeError(f"{where}: got {value!r}; expected {_describe(tp)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise RecipeError(f"{where}: got {value!r}; allowed: {_describe(tp)}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: got {value!r}; expected {_describe(tp)}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: got {value!r}; expected a mapping")
        return dict(value)
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{where}: got {value!r}; expected null")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: got {value!r}; expected {_describe(tp)}")
        return tp.from_dict(value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "5e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r}")
    raise RecipeError(f"{where}: got {value!r}; expected {_describe(tp)}")


def did_you_mean(word: Any, choices: Any) -> str:
    """``" (did you mean 'bits'?)"`` for a close match of a mistyped ``word`` among ``choices``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class ConfigBase:
    """A strict, round-trippable dataclass config."""

    def fail(self, key: str, message: str) -> typing.NoReturn:
        """Raise a `RecipeError` about field ``key`` (the recipe loader prefixes the stage)."""
        raise RecipeError(f"key '{key}': {message}")

    @classmethod
    def allowed_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "") -> "ConfigBase":
        """Build a config from a plain dict, refusing unknown keys and wrong types."""
        prefix = f"{where}: " if where else ""
        if not isinstance(data, dict):
            raise RecipeError(f"{prefix}expected a mapping, got {data!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in data.items():
            if key not in known:
                raise RecipeError(f"{prefix}unknown key '{key}'{did_you_mean(key, known)}; allowed keys: "
                                  f"{', '.join(sorted(known))}")
            kwargs[key] = _coerce(value, hints[key], f"{prefix}key '{key}'")
        try:
            return cls(**kwargs)
        except RecipeError as exc:
            raise RecipeError(f"{prefix}{exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class StageConfig(ConfigBase):
    """Base of every stage's config. Subclasses set the class attribute ``method``.

    A config that declares a ``recover`` field (prune's does) takes part in recovery: the recipe may ask for a
    recovery stage right after such a stage, and the distill stage's `expand` inserts it.
    """

    method: ClassVar[str] = ""

    def snapshot_needed(self) -> str | None:
        """``"original"`` or ``"previous"`` when the stage needs a frozen copy of the model (a teacher)."""
        return None

    def keeps_tensors(self, info: Any) -> bool:
        """Whether the stage, on the model ``info`` (a `ModelInfo`) describes, leaves every tensor it finds as it is:
        it may add or replace modules and rebind a parameter's ``.data`` (a cast), but never writes into one. When
        every stage does, a frozen original shares the model's tensors instead of copying them."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **super().to_dict()}
