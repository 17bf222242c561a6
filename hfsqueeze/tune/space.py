"""The search space of `hfsqueeze.tune`, and the one place where tuning talks to the stages.

Each stage declares what a tuner may vary in its config (its ``search_space()``) and under which section of a space
file (its ``search_section()``); the sections' roles come from the stages' hooks too (the stage that converts modules
one by one, the stage recovery enters through), never from a method's name. Tuning adds two knobs of its own to
``quantize``: ``rest_dtype``, the dtype
of everything bitsandbytes leaves unquantized (a 16-bit stage before the 8/4-bit one), and ``keep``, how much of the
solver's capacity goes to modules kept unquantized (see `hfsqueeze.tune.solve`). A point of the space becomes an
explicit recipe: stages with plain values, nothing left to chance.

A space file is YAML shaped like a recipe, with choices (a list) or ranges (``{low, high, step, log}``) in place of
values; a plain value fixes the key, and keys left out keep the stage's default. It is read as strictly as a recipe
(a key given twice is refused) and checked before anything runs: numbers are finite, every choice and both ends of
every range pass the stage config's own checks, and a key that applies only when another takes some value
(``threshold`` when ``bits`` is 8, prune's keys when ``enabled`` is true) needs that key set, so a file that would
search nothing is one line, not a run of trials on the uncompressed original:

```yaml
quantize:
  bits: [8, 4]
  threshold: {low: 1.0, high: 6.0, step: 0.5}
  rest_dtype: bf16
prune:
  enabled: [false, true]
  heads: {low: 0.0, high: 0.25, step: 0.0625}
```
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..core.config import _coerce
from ..core.context import CompressionContext
from ..core.errors import RecipeError
from ..core.hf import frozen_copy, to_device
from ..core.runner import run_stages as run_staged
from ..core.search import OPTIONAL, Param, nested
from ..core.stage import Stage
from ..recipe import Recipe, safe_load_strict
from ..registry import get_stage, stages


def _sections() -> dict[str, Stage]:
    """Each section a space file may have -> the stage that declares it (`Stage.search_section`), in the order the
    registry holds the stages."""
    return {section.name: stage for stage in stages() if (section := stage.search_section()) is not None}


def _roles() -> tuple[str, str, str]:
    """The sections by what tuning does with them, found by asking the stages: the stage that converts modules one by
    one (`Stage.per_module`: the solver's), the stage whose config holds another stage's keys (it has the key named
    by that stage's `SearchSection.via`: pruning's ``recover``), and that other stage (recovery)."""
    sections = _sections()
    per_module = next(name for name, stage in sections.items() if stage.per_module)
    rider = next(name for name, stage in sections.items() if stage.search_section().via)
    via = sections[rider].search_section().via
    host = next(name for name, stage in sections.items() if via in stage.config_cls.allowed_keys())
    return per_module, host, rider


QUANTIZE, PRUNE, RECOVER = _roles()
SECTIONS = (QUANTIZE, PRUNE, RECOVER)
BUILTIN_SPACES = {QUANTIZE: (QUANTIZE,), PRUNE: (PRUNE, RECOVER), "all": SECTIONS}
DEFAULT_SPACE = QUANTIZE  # `hfsqueeze tune` without --space
ENABLED = OPTIONAL  # a boolean knob: the stage is in the recipe
REST_DTYPES = ("fp32", "bf16", "fp16")
_REST_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Tuning's own knobs for the per-module section: the dtype of what bitsandbytes leaves unquantized, and the solver's
# share (solve.py).
_TUNER_KNOBS = {
    "rest_dtype": Param.choice("fp32", "bf16", "fp16", when={"bits": (8, 4)}),
    "keep": Param.range(0.0, 1.0, step=0.05, when={"bits": (8, 4)}),
}


def _stage(section: str) -> Stage:
    return _sections()[section]


def _not_searched(section: str) -> set[str]:
    """Config keys a tuner never draws (`SearchSection.not_searched`: the solver picks skip_modules; the rest are
    settings, not compression choices)."""
    return set(_stage(section).search_section().not_searched)


def stage_space(section: str) -> dict[str, Param]:
    """The section's space as its stage declares it (`Stage.search_space`), plus tuning's own quantize knobs;
    ``prune`` and ``recover`` get an on/off knob (``enabled``) that the other keys depend on."""
    if section not in SECTIONS:
        raise RecipeError(f"space: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
    declared = {k: v for k, v in _stage(section).search_space().items() if k not in _not_searched(section)}
    if section == QUANTIZE:
        return {**declared, **_TUNER_KNOBS}
    space = {ENABLED: declared.pop(ENABLED, Param.choice(False, True))}
    for key, param in declared.items():
        space[key] = dataclasses.replace(param, when={ENABLED: (True,), **param.when})
    return space


def _fixed(param: Param) -> bool:
    return param.choices is not None and len(param.choices) == 1


def _contains(param: Param, value: Any) -> bool:
    if param.choices is not None:
        return any(value == c and type(value) is type(c) for c in param.choices)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and param.low <= value <= param.high


def param_dict(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {"choices": list(param.choices)} if param.choices is not None else {
        "low": param.low, "high": param.high, **({"step": param.step} if param.step else {}),
        **({"log": True} if param.log else {}), **({"integer": True} if param.integer else {})}
    if param.when:
        out["when"] = {k: list(v) for k, v in param.when.items()}
    return out


def param_from_dict(data: dict[str, Any]) -> Param:
    when = {k: tuple(v) for k, v in data.get("when", {}).items()}
    if "choices" in data:
        return Param.choice(*data["choices"], when=when)
    return Param.range(data["low"], data["high"], step=data.get("step"), log=data.get("log", False),
                       integer=data.get("integer", False), when=when)


# ---- the space: built-in names and YAML files ----------------------------------------------------------------
@dataclasses.dataclass
class Space:
    """Sections (``quantize``, ``prune``, ``recover``) mapping keys to `Param` s; flat names are ``section.key``."""

    sections: dict[str, dict[str, Param]]
    name: str = "custom"

    def flat(self) -> dict[str, Param]:
        """``section.key`` -> `Param`, with ``when`` keys qualified (``recover`` also needs ``prune.enabled``)."""
        out = {}
        for section, params in self.sections.items():
            for key, param in params.items():
                when = {f"{section}.{k}": v for k, v in param.when.items()}
                if section == RECOVER and PRUNE in self.sections:
                    when.setdefault(f"{PRUNE}.{ENABLED}", (True,))
                out[f"{section}.{key}"] = dataclasses.replace(param, when=when)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Space:
        """Inverse of `to_dict` (a space written by this version, e.g. in ``tuning/run.json``)."""
        sections = {section: {key: param_from_dict(p) for key, p in params.items()}
                    for section, params in data["sections"].items()}
        return cls(sections, name=data.get("name", "custom"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sections": {s: {k: param_dict(p) for k, p in ps.items()}
                                                for s, ps in self.sections.items()}}


def load_space(spec: str | os.PathLike | dict[str, Any] | Space) -> Space:
    """``quantize``, ``prune``, ``all``, a YAML path, or a dict shaped like the YAML; validated strictly."""
    if isinstance(spec, Space):
        return spec
    if isinstance(spec, str) and spec in BUILTIN_SPACES:
        return Space({s: stage_space(s) for s in BUILTIN_SPACES[spec]}, name=spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise RecipeError(f"space {str(spec)!r}: not a file and not one of {', '.join(BUILTIN_SPACES)}")
        try:
            data = safe_load_strict(path.read_text())  # the recipes' loader: a key given twice is refused
        except yaml.YAMLError as exc:
            raise RecipeError(f"space {path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        return _space_from_dict(data, str(path))
    if isinstance(spec, dict):
        return _space_from_dict(spec, "space")
    raise RecipeError(f"space: got {spec!r}; expected quantize, prune, all, a YAML path or a mapping")


def _space_from_dict(data: Any, where: str) -> Space:
    if not isinstance(data, dict) or not data:
        raise RecipeError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)}); got {data!r}")
    sections = {}
    for section, body in data.items():
        if section not in SECTIONS:
            raise RecipeError(f"{where}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise RecipeError(f"{where}: section {section!r} must be a mapping of keys to values, lists (choices) or "
                              f"{{low, high}} ranges; got {body!r}")
        sections[section] = _section_params(section, body, f"{where}: {section}")
    if RECOVER in sections and PRUNE not in sections:
        raise RecipeError(f"{where}: section '{RECOVER}' needs a '{PRUNE}' section (recovery follows pruning)")
    return Space(sections, name=str(where))


def _field_types(section: str) -> dict[str, Any]:
    """The type of every key a space section may set: the stage config's fields (``recover``: the keys the distill
    stage declares, some nested like ``training_args.max_steps``), plus tuning's own knobs."""
    if section == RECOVER:
        return {key: _declared_type(param) for key, param in stage_space(section).items()}
    config_cls = _stage(section).config_cls
    hints = typing.get_type_hints(config_cls)
    types = {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}
    if section == QUANTIZE:
        types.update({"rest_dtype": typing.Literal["fp32", "bf16", "fp16"], "keep": float})
    else:
        types[ENABLED] = bool
    for key in _not_searched(section):
        types.pop(key, None)
    return types


def _declared_type(param: Param) -> Any:
    if param.choices is not None:
        return type(param.choices[0])
    return int if param.integer else float


def _section_params(section: str, body: dict[str, Any], where: str) -> dict[str, Param]:
    types = _field_types(section)
    declared = stage_space(section)
    params: dict[str, Param] = {}
    for key, value in body.items():
        if key not in types:
            raise RecipeError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(types))}")
        tp, at = types[key], f"{where}: key '{key}'"
        when = declared[key].when if key in declared else {}
        if isinstance(value, dict):
            params[key] = _range_param(value, tp, at, when)
        elif isinstance(value, list):
            if not value:
                raise RecipeError(f"{at}: an empty list of choices")
            params[key] = Param.choice(*[_finite(_coerce(v, tp, f"{at}[{i}]"), f"{at}[{i}]")
                                         for i, v in enumerate(value)], when=when)
        else:
            params[key] = Param.choice(_finite(_coerce(value, tp, at), at), when=when)
    keep = params.get("keep") if section == QUANTIZE else None
    if keep is not None and any(v < 0 or v > 1 for v in (keep.choices or (keep.low, keep.high))):
        raise RecipeError(f"{where}: key 'keep': a fraction of the solver's capacity, within 0..1")
    _check_values(section, params, declared, where)
    _check_searched(params, where)
    return params


def _finite(value: Any, at: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{at}: got {value}; expected a finite number")
    return value


def _candidates(param: Param) -> tuple[Any, ...]:
    """The values to check a param by: every choice, or a range's two ends (the stage configs' checks are bounds, so
    a range is valid when both ends are)."""
    return param.choices if param.choices is not None else (param.low, param.high)


def _check_values(section: str, params: dict[str, Param], declared: dict[str, Param], where: str) -> None:
    """Refuse a value the stage's own config would refuse in a trial (``heads: 5.0``, ``alpha: 2``), and a negative
    or zero value for a key the stage declares on a log scale (``training_args.max_steps``: a step count; -1 would
    mean "train by epochs" to Transformers).

    Each value is checked in a config holding that key, the keys its ``when`` needs (``threshold`` with ``bits: 8``)
    and, where the config needs them to be valid at all, values the section allows for other keys (prune refuses a
    config that removes nothing). An error that the same config without the key raises as well (``heads: 0`` when
    nothing else is pruned) is not the value's: such a point leaves the stage out of the trial's recipe."""
    stage = _stage(section)
    config_cls = stage.config_cls
    fields = set(config_cls.allowed_keys())
    for key, param in params.items():
        positive = key in declared and declared[key].log
        context = _valid_context(config_cls, fields, params, key)
        for value in _candidates(param):
            if positive and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise RecipeError(f"{where}: key '{key}': got {value}; must be > 0")
            if key.split(".", 1)[0] not in fields:
                continue  # tuning's own knobs (rest_dtype, keep, enabled), checked as they were parsed
            error = _config_error(config_cls, {**context, key: value})
            if error is not None and error != _config_error(config_cls, context):
                raise RecipeError(f"{where}: {error}" + ("" if param.choices is not None else
                                                        f" (in the range {param.low}..{param.high})"))
    error = _config_error(config_cls, _valid_context(config_cls, fields, params, None))
    if error is not None:  # e.g. a prune section that removes nothing anywhere: every trial leaves the stage out
        raise RecipeError(f"{where}: this section searches nothing: the {stage.name} stage refuses every "
                          f"point of it ({error})")


def _valid_context(config_cls: Any, fields: set[str], params: dict[str, Param], key: str | None) -> dict[str, Any]:
    """The keys ``key`` needs (its ``when``), plus, one by one, a value of another key of the section that turns a
    config the stage refuses into one it accepts."""
    context = {k: v[0] for k, v in params[key].when.items() if k in fields} if key is not None else {}
    for other, param in params.items():
        if other == key or other in context or other.split(".", 1)[0] not in fields:
            continue
        if _config_error(config_cls, context) is None:
            break
        for value in _candidates(param):
            if _config_error(config_cls, {**context, other: value}) is None:
                context[other] = value
                break
    return context


def _config_error(config_cls: Any, flat: dict[str, Any]) -> str | None:
    try:
        config_cls.from_dict(nested(flat))
    except RecipeError as exc:
        return str(exc)
    return None


def _check_searched(params: dict[str, Param], where: str) -> None:
    """Refuse keys that no trial would ever draw: a key applies only when others take certain values (``threshold``
    when ``bits`` is 8, prune's keys when ``enabled`` is true), and a section that does not set those, or allows
    none of those values, would silently search nothing (every trial the uncompressed original)."""
    reachable: dict[str, bool] = {}

    def drawn(key: str) -> bool:
        if key not in reachable:
            reachable[key] = False  # a `when` that names itself (never declared) stays unreachable
            reachable[key] = all(k in params and drawn(k) and any(_contains(params[k], v) for v in values)
                                 for k, values in params[key].when.items())
        return reachable[key]

    dead = [key for key in params if not drawn(key)]
    if not dead:
        return
    key = dead[0]
    needs = next((k, v) for k, v in params[key].when.items()
                 if not (k in params and drawn(k) and any(_contains(params[k], x) for x in v)))
    wanted = " or ".join(_plain_value(v) for v in needs[1])
    if needs[0] not in params:
        why = f"the section does not set {needs[0]}; add {needs[0]}: {_plain_value(needs[1][0])}"
    else:
        allowed = ", ".join(_plain_value(v) for v in _candidates(params[needs[0]]))
        why = f"{needs[0]} allows only {allowed} here"
    if len(dead) == len(params):
        what = f"this section searches nothing: {', '.join(repr(k) for k in dead)} apply"
    else:
        what = f"key '{key}' is never searched: it applies"
    raise RecipeError(f"{where}: {what} only when {needs[0]} is {wanted}, and {why}")


def _plain_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _range_param(value: dict[str, Any], tp: Any, at: str, when: Mapping[str, tuple]) -> Param:
    allowed = {"low", "high", "step", "log"}
    unknown = sorted(set(value) - allowed)
    if unknown or "low" not in value or "high" not in value:
        raise RecipeError(f"{at}: a range needs low and high (optional step, log); got {value!r}")
    numeric = [a for a in typing.get_args(tp) or (tp,) if a in (int, float)]
    if not numeric:
        raise RecipeError(f"{at}: a range needs a numeric key; this key takes {tp}; give a list of choices")
    integer = numeric == [int]
    low = _coerce(value["low"], int if integer else float, f"{at}: low")
    high = _coerce(value["high"], int if integer else float, f"{at}: high")
    for end, number in (("low", low), ("high", high)):
        if not math.isfinite(number):
            raise RecipeError(f"{at}: {end} must be a finite number; got {number}")
    if low > high:
        raise RecipeError(f"{at}: low {low} is above high {high}")
    step = value.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step)
                             or step <= 0):
        raise RecipeError(f"{at}: step must be a positive number; got {step!r}")
    log = value.get("log", False)
    if not isinstance(log, bool) or (log and low <= 0):
        raise RecipeError(f"{at}: log must be true/false and needs low > 0; got log={log!r}, low={low}")
    return Param.range(low, high, step=step, log=log, integer=integer, when=when)


# ---- points and recipes --------------------------------------------------------------------------------------
def applies(param: Param, point: Mapping[str, Any]) -> bool:
    """Whether ``param`` is drawn, given the ``section.key`` values drawn before it (see `Space.flat`)."""
    return param.applies(point)


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    """Draw a point with an optuna ``trial`` (fixed keys are set, not drawn); keys whose ``when`` fails are left
    out."""
    point: dict[str, Any] = {}
    for name, param in space.flat().items():
        if not applies(param, point):
            continue
        if _fixed(param):
            point[name] = param.choices[0]
        elif param.choices is not None:
            point[name] = trial.suggest_categorical(name, list(param.choices))
        elif param.integer:
            point[name] = trial.suggest_int(name, int(param.low), int(param.high), step=int(param.step or 1),
                                            log=param.log)
        else:
            point[name] = trial.suggest_float(name, param.low, param.high, step=param.step, log=param.log)
    return point


def enqueue_params(space: Space, point: dict[str, Any]) -> dict[str, Any] | None:
    """The drawn (non-fixed) params of ``point`` for ``study.enqueue_trial``, or ``None`` when it lies outside."""
    params: dict[str, Any] = {}
    for name, param in space.flat().items():
        if not applies(param, point):
            continue
        if name not in point:
            return None
        if not _contains(param, point[name]):
            return None
        if not _fixed(param):
            params[name] = point[name]
    extra = set(point) - set(space.flat())
    return None if extra else params


@dataclasses.dataclass
class Plan:
    """A point of the space as stages: what runs before quantizing, and the 8/4-bit format with its rest dtype.

    The quantize stage's ``skip_modules`` is not known yet: the solver picks it on the model after ``pre_stages``.
    """

    pre_stages: list[dict[str, Any]]
    quantize: dict[str, Any] | None  # the 8/4/16-bit stage's keys (without skip_modules)
    rest_dtype: str = "fp32"
    keep: float = 1.0

    @property
    def bits(self) -> int | None:
        return None if self.quantize is None else self.quantize["bits"]

    def stages(self, skip_modules: list[str] | None = None) -> list[dict[str, Any]]:
        """The explicit stage list; ``skip_modules`` goes into the 8/4-bit stage (``lm_head`` must be in it)."""
        out = copy.deepcopy(self.pre_stages)
        if self.quantize is None:
            return out
        method = _stage(QUANTIZE).name
        if self.bits in (4, 8) and self.rest_dtype != "fp32":
            out.append({"method": method, "bits": 16, "dtype": self.rest_dtype})
        stage = {"method": method, **self.quantize}
        if self.bits in (4, 8) and skip_modules is not None:
            stage["skip_modules"] = list(skip_modules)
        out.append(stage)
        return out


def plan_of(point: Mapping[str, Any]) -> Plan:
    """Turn a point (``section.key`` -> value) into a `Plan`."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in point.items():
        section, key = name.split(".", 1)
        sections.setdefault(section, {})[key] = value
    pre = []
    prune = sections.get(PRUNE, {})
    amounts = [prune.get(k, 0) for k in ("heads", "ffn", "layers")]
    if prune.pop(ENABLED, True) and any(amounts):  # nothing to remove: the stage is left out
        recover = sections.get(RECOVER, {})
        if recover.pop(ENABLED, False):
            prune[_stage(RECOVER).search_section().via] = nested(recover) or "auto"
        pre.append({"method": _stage(PRUNE).name, **prune})
    quant = dict(sections.get(QUANTIZE, {}))
    if not quant:
        return Plan(pre, None)
    rest = quant.pop("rest_dtype", "fp32")
    keep = float(quant.pop("keep", 1.0))
    config_cls = _stage(QUANTIZE).config_cls
    if quant.get("bits", config_cls.bits) == 16:
        quant = {"bits": 16, "dtype": quant.get("dtype", "bf16")}
    fmt = config_cls.from_dict(quant, where=f"space point ({QUANTIZE})").to_dict()
    return Plan(pre, {k: v for k, v in fmt.items() if k not in ("method", "skip_modules")}, rest, keep)


# ---- running stages ------------------------------------------------------------------------------------------
def run_stages(model: nn.Module, stages: list[dict[str, Any]], ctx: CompressionContext) -> list[dict[str, Any]]:
    """Apply ``stages`` to ``model`` in place with `compress`'s runner (`hfsqueeze.core.runner.run_stages`), the
    recipe expanded first (``recover:`` becomes distill stages), without measuring. Returns each stage's details."""
    if not stages:
        return []
    applied = run_staged(model, Recipe.load({"stages": stages}).expanded().stages, ctx, get_stage)
    return [{"method": a.config.method, **a.details} for a in applied]


# ---- talking to the per-module stage (its per-module hooks) --------------------------------------------------
def _quantize_config(fmt: dict[str, Any]) -> Any:
    return _stage(QUANTIZE).config_cls.from_dict({k: v for k, v in fmt.items() if k != "method"})


def quantize_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules the per-module stage converts with its default skip list (``lm_head`` stays)."""
    return _stage(QUANTIZE).targets(model, _quantize_config({"bits": 8}))


def default_skip_modules() -> list[str]:
    return list(_quantize_config({"bits": 8}).skip_modules)


def quantized_module(module: nn.Module, fmt: dict[str, Any]) -> nn.Module:
    """The bitsandbytes module the per-module stage would put in place of ``module`` for format ``fmt``."""
    return _stage(QUANTIZE).quantized_module(module, _quantize_config(fmt))


def rest_torch_dtype(rest: str) -> torch.dtype:
    return _REST_TORCH[rest]


__all__ = ["BUILTIN_SPACES", "DEFAULT_SPACE", "Plan", "Space", "applies", "enqueue_params", "load_space",
           "plan_of", "quantize_targets", "quantized_module", "run_stages", "stage_space", "suggest"]


# ---- fp16 that overflows ------------------------------------------------------------------------------------------
# Choices that run the model (or what bitsandbytes leaves unquantized) in float16.
_FP16_CHOICES = {"dtype": "fp16", "rest_dtype": "fp16", "compute_dtype": "float16"}


def draws_fp16(space: Space) -> bool:
    """Whether ``space`` can draw a float16 choice."""
    quant = space.sections.get(QUANTIZE, {})
    return any(key in quant and quant[key].choices and value in quant[key].choices
               for key, value in _FP16_CHOICES.items())


@torch.no_grad()
def fp16_overflows(model: nn.Module, block: torch.Tensor) -> bool:
    """Whether ``model`` cast to float16 gives non-finite logits on ``block`` ([1, T] token ids).

    Models trained in bfloat16 can have activations beyond float16's 65504 (Gemma-3 does: every fp16 trial came out
    NaN); one forward on a copy finds out before a trial is spent on it."""
    half = frozen_copy(model).to(torch.float16)
    try:
        return not bool(torch.isfinite(half(input_ids=to_device(block, half)).logits).all())
    finally:
        del half


def without_fp16(space: Space) -> Space:
    """``space`` with every float16 choice removed (one-line error if a knob is left with no choice)."""
    sections = {section: dict(params) for section, params in space.sections.items()}
    quant = sections.get(QUANTIZE, {})
    for key, value in _FP16_CHOICES.items():
        param = quant.get(key)
        if param is None or not param.choices or value not in param.choices:
            continue
        kept = tuple(c for c in param.choices if c != value)
        if not kept:
            raise RecipeError(f"space: {QUANTIZE}.{key} allows only {value}, but this model overflows in float16 "
                              "(non-finite logits on the calibration text); allow bf16 or fp32 instead")
        quant[key] = dataclasses.replace(param, choices=kept)
    return Space(sections, name=space.name)
