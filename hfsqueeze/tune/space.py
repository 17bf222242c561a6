"""The search space of `hfsqueeze.tune`, and the one place where tuning talks to the stages.

Each stage declares what a tuner may vary in its config (its ``search_space()``; a built-in declaration below stands in
for stages that do not declare one yet). Tuning adds two knobs of its own to ``quantize``: ``rest_dtype``, the dtype
of everything bitsandbytes leaves unquantized (a 16-bit stage before the 8/4-bit one), and ``keep``, how much of the
solver's capacity goes to modules kept unquantized (see `hfsqueeze.tune.solve`). A point of the space becomes an
explicit recipe: stages with plain values, nothing left to chance.

A space file is YAML shaped like a recipe, with choices (a list) or ranges (``{low, high, step, log}``) in place of
values; a plain value fixes the key, and keys left out keep the stage's default:

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
import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..api import frozen_copy
from ..config import _coerce
from ..context import CompressionContext
from ..errors import RecipeError
from ..methods.distill.recover import expand_recovery
from ..methods.prune import PruneConfig, apply_prune
from ..methods.quantize import QuantizeConfig
from ..methods.quantize.apply import _bnb, _new_module, bnb_config
from ..recipe import Recipe
from ..registry import get_stage

SECTIONS = ("quantize", "prune", "recover")
BUILTIN_SPACES = {"quantize": ("quantize",), "prune": ("prune", "recover"), "all": ("quantize", "prune", "recover")}
ENABLED = "enabled"  # a boolean knob: the stage is in the recipe (same key as hfsqueeze.core.search.OPTIONAL)
REST_DTYPES = ("fp32", "bf16", "fp16")
_REST_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Keys a tuner never draws: the solver picks skip_modules; the rest are settings, not compression choices.
_NOT_SEARCHED = {"quantize": {"skip_modules"}, "prune": {"recover", "calibration"}}


@dataclasses.dataclass(frozen=True)
class Param:
    """One dimension: ``choices``, or numbers from ``low`` to ``high`` (on a ``step`` grid, or ``log``); drawn only
    when the keys in ``when`` took one of the listed values. Same shape as `hfsqueeze.core.search.Param`."""

    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False
    when: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    @classmethod
    def choice(cls, *choices: Any, when: Mapping[str, tuple[Any, ...]] | None = None) -> Param:
        return cls(choices=tuple(choices), when=dict(when or {}))

    @classmethod
    def range(cls, low: float, high: float, *, step: float | None = None, log: bool = False, integer: bool = False,
              when: Mapping[str, tuple[Any, ...]] | None = None) -> Param:
        return cls(low=low, high=high, step=step, log=log, integer=integer, when=dict(when or {}))

    @property
    def fixed(self) -> bool:
        return self.choices is not None and len(self.choices) == 1

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return any(value == c and type(value) is type(c) for c in self.choices)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"choices": list(self.choices)} if self.choices is not None else {
            "low": self.low, "high": self.high, **({"step": self.step} if self.step else {}),
            **({"log": True} if self.log else {}), **({"integer": True} if self.integer else {})}
        if self.when:
            out["when"] = {k: list(v) for k, v in self.when.items()}
        return out


def _fallback_space(section: str) -> dict[str, Param]:
    """Declarations for stages that do not declare ``search_space()`` themselves (keys are within the section)."""
    if section == "quantize":
        q48 = {"bits": (8, 4)}
        return {
            "bits": Param.choice(8, 4, 16),
            "dtype": Param.choice("bf16", "fp16", when={"bits": (16,)}),
            # Measured on SmolLM2 (NOTES): lower thresholds trade prefill/decode speed for quality.
            "threshold": Param.range(0.0, 8.0, step=0.5, when={"bits": (8,)}),
            "quant_type": Param.choice("nf4", "fp4", when={"bits": (4,)}),
            "double_quant": Param.choice(False, True, when={"bits": (4,)}),
            "compute_dtype": Param.choice("float32", "bfloat16", "float16", when={"bits": (4,)}),
            "rest_dtype": Param.choice("fp32", "bf16", "fp16", when=q48),
            "keep": Param.range(0.0, 1.0, step=0.05, when=q48),
        }
    if section == "prune":
        on = {ENABLED: (True,)}
        return {
            ENABLED: Param.choice(False, True),
            "heads": Param.range(0.0, 0.5, step=0.0625, when=on),
            "ffn": Param.range(0.0, 0.5, step=0.05, when=on),
            "importance": Param.choice("magnitude", "activation", "gradient", when=on),
        }
    if section == "recover":
        on = {ENABLED: (True,)}
        return {ENABLED: Param.choice(False, True), "max_steps": Param.choice(10, 25, 50, when=on)}
    raise RecipeError(f"space: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")


def stage_space(section: str) -> dict[str, Param]:
    """The section's declared space: the stage's own ``search_space()`` when it has one, else the fallback.

    Tuning's own quantize knobs (``rest_dtype``, ``keep``) are added to whatever the stage declares.
    """
    space = _fallback_space(section)
    stage_name = {"recover": None}.get(section, section)
    declared = getattr(get_stage(stage_name), "search_space", None) if stage_name else None
    if callable(declared):
        own = {k: v for k, v in declared().items() if k not in _NOT_SEARCHED.get(section, set())}
        extra = {k: v for k, v in space.items() if k in ("rest_dtype", "keep")} if section == "quantize" else {}
        space = {**own, **extra}
    return space


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
                if section == "recover" and "prune" in self.sections:
                    when.setdefault("prune.enabled", (True,))
                out[f"{section}.{key}"] = dataclasses.replace(param, when=when)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Space:
        """Inverse of `to_dict` (a space written by this version, e.g. in ``tuning/run.json``)."""
        sections = {}
        for section, params in data["sections"].items():
            sections[section] = {}
            for key, p in params.items():
                when = {k: tuple(v) for k, v in p.get("when", {}).items()}
                if "choices" in p:
                    sections[section][key] = Param.choice(*p["choices"], when=when)
                else:
                    sections[section][key] = Param.range(p["low"], p["high"], step=p.get("step"),
                                                         log=p.get("log", False), integer=p.get("integer", False),
                                                         when=when)
        return cls(sections, name=data.get("name", "custom"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sections": {s: {k: p.to_dict() for k, p in ps.items()}
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
            data = yaml.safe_load(path.read_text())
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
    if "recover" in sections and "prune" not in sections:
        raise RecipeError(f"{where}: section 'recover' needs a 'prune' section (recovery follows pruning)")
    return Space(sections, name=str(where))


def _field_types(section: str) -> dict[str, Any]:
    """The type of every key a space section may set."""
    if section == "quantize":
        hints = typing.get_type_hints(QuantizeConfig)
        types = {f.name: hints[f.name] for f in dataclasses.fields(QuantizeConfig)}
        types.update({"rest_dtype": typing.Literal["fp32", "bf16", "fp16"], "keep": float})
    elif section == "prune":
        hints = typing.get_type_hints(PruneConfig)
        types = {f.name: hints[f.name] for f in dataclasses.fields(PruneConfig)}
        types[ENABLED] = bool
    else:
        types = {ENABLED: bool, "max_steps": int}
    for key in _NOT_SEARCHED.get(section, set()):
        types.pop(key, None)
    return types


def _section_params(section: str, body: dict[str, Any], where: str) -> dict[str, Param]:
    types = _field_types(section)
    declared = _fallback_space(section)
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
            params[key] = Param.choice(*[_coerce(v, tp, f"{at}[{i}]") for i, v in enumerate(value)], when=when)
        else:
            params[key] = Param.choice(_coerce(value, tp, at), when=when)
    keep = params.get("keep") if section == "quantize" else None
    if keep is not None and any(v < 0 or v > 1 for v in (keep.choices or (keep.low, keep.high))):
        raise RecipeError(f"{where}: key 'keep': a fraction range must lie within 0..1")
    return params


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
    if low > high:
        raise RecipeError(f"{at}: low {low} is above high {high}")
    step = value.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise RecipeError(f"{at}: step must be a positive number; got {step!r}")
    log = value.get("log", False)
    if not isinstance(log, bool) or (log and low <= 0):
        raise RecipeError(f"{at}: log must be true/false and needs low > 0; got log={log!r}, low={low}")
    return Param.range(low, high, step=step, log=log, integer=integer, when=when)


# ---- points and recipes --------------------------------------------------------------------------------------
def applies(param: Param, point: Mapping[str, Any]) -> bool:
    return all(point.get(key) in values for key, values in param.when.items())


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    """Draw a point with an optuna ``trial`` (fixed keys are set, not drawn); keys whose ``when`` fails are left
    out."""
    point: dict[str, Any] = {}
    for name, param in space.flat().items():
        if not applies(param, point):
            continue
        if param.fixed:
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
        if not param.contains(point[name]):
            return None
        if not param.fixed:
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
        if self.bits in (4, 8) and self.rest_dtype != "fp32":
            out.append({"method": "quantize", "bits": 16, "dtype": self.rest_dtype})
        stage = {"method": "quantize", **self.quantize}
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
    prune = sections.get("prune", {})
    amounts = [prune.get(k, 0) for k in ("heads", "ffn", "layers")]
    if prune.pop(ENABLED, True) and any(amounts):  # nothing to remove: the stage is left out
        recover = sections.get("recover", {})
        if recover.pop(ENABLED, False):
            steps = recover.pop("max_steps", None)
            prune["recover"] = {"training_args": {"max_steps": steps}} if steps else "auto"
        pre.append({"method": "prune", **prune})
    quant = dict(sections.get("quantize", {}))
    if not quant:
        return Plan(pre, None)
    rest = quant.pop("rest_dtype", "fp32")
    keep = float(quant.pop("keep", 1.0))
    bits = quant.get("bits", QuantizeConfig.bits)
    if bits == 16:
        quant = {"bits": 16, "dtype": quant.get("dtype", "bf16")}
    fmt = QuantizeConfig.from_dict(quant, where="space point (quantize)").to_dict()
    return Plan(pre, {k: v for k, v in fmt.items() if k not in ("method", "skip_modules")}, rest, keep)


def _strip_method(stage: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stage.items() if k != "method"}


# ---- running stages ------------------------------------------------------------------------------------------
def run_stages(model: nn.Module, stages: list[dict[str, Any]], ctx: CompressionContext,
               prune_scores: Callable[[nn.Module, Any, CompressionContext], Any] | None = None
               ) -> list[dict[str, Any]]:
    """Apply ``stages`` to ``model`` in place, as `hfsqueeze.compress` does (recovery expanded, teachers
    snapshotted), without measuring; ``prune_scores(model, config, ctx)`` may hand the prune stage cached importance
    scores. Returns each stage's details."""
    if not stages:
        return []
    recipe = expand_recovery(Recipe.load({"stages": stages}))
    details = []
    offset = len(ctx.results)
    for index, stage in enumerate(recipe.stages, start=offset + 1):
        ctx.stage_index = index
        ctx.previous = frozen_copy(model) if stage.snapshot_needed() == "previous" else None
        if stage.method == "prune" and prune_scores is not None:
            out = apply_prune(model, stage, ctx, scores=prune_scores(model, stage, ctx))
        else:
            out = get_stage(stage.method).apply(model, stage, ctx)
        model.eval()
        details.append({"method": stage.method, **(out or {})})
        ctx.results.append(details[-1])
    ctx.previous = None
    return details


def prune_importance(model: nn.Module, config: Any, ctx: CompressionContext) -> Any:
    """The prune stage's importance scores of ``model`` for ``config`` (what its first step would compute)."""
    from ..methods.prune.apply import check_prunable, compute_scores

    family = check_prunable(model)
    scores, _ = compute_scores(family, model, config, ctx, layers=bool(config.layers))
    return scores


def importance_key(config: Any) -> str:
    """What the prune stage's scores depend on besides the model and calibration text."""
    keys = ("importance", "gqa_mode", "calibration_tokens", "kl_tokens", "seq_len", "calibration")
    return "-".join(str(getattr(config, k)) for k in keys) + f"-layers{bool(config.layers)}"


# ---- talking to the quantize stage ---------------------------------------------------------------------------
def quantize_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules the quantize stage converts with its default skip list (``lm_head`` stays)."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    qc = bnb_config(QuantizeConfig(bits=8))
    quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    skip = quantizer.get_modules_to_not_convert(model, qc.llm_int8_skip_modules, model._keep_in_fp32_modules)
    return [(name, module) for name, module in model.named_modules()
            if (isinstance(module, Conv1D) or type(module) is nn.Linear) and should_convert_module(name, skip)]


def default_skip_modules() -> list[str]:
    return list(QuantizeConfig(bits=8).skip_modules)


def quantized_module(module: nn.Module, fmt: dict[str, Any]) -> nn.Module:
    """The bitsandbytes module the quantize stage would put in place of ``module`` for format ``fmt``."""
    config = QuantizeConfig.from_dict(_strip_method(fmt))
    return _new_module(_bnb(), module, bnb_config(config), config)


def rest_torch_dtype(rest: str) -> torch.dtype:
    return _REST_TORCH[rest]


__all__ = ["BUILTIN_SPACES", "Param", "Plan", "Space", "applies", "enqueue_params", "load_space", "plan_of",
           "quantize_targets", "quantized_module", "stage_space", "suggest"]
