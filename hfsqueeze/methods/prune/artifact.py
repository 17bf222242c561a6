"""Saving and loading pruned models.

- Uniformly pruned Llama-family models whose config stays valid are stock artifacts: the config holds the new head
  counts and FFN width, and ``AutoModelForCausalLM.from_pretrained(path)`` loads them with no hfsqueeze installed.
- Everything else (per-layer sizes, GPT-2 and BERT whose head size derives from ``hidden_size``) keeps the per-layer
  plan in ``config.hfsqueeze_pruning``. The save hook writes ``modeling_hfsqueeze_pruned.py`` (the self-contained
  `surgery` module plus one subclass per Transformers class) and points ``auto_map`` at it, so
  ``AutoModel*.from_pretrained(path, trust_remote_code=True)`` loads the artifact, again without hfsqueeze.
  ``hfsqueeze.load_compressed(path)`` loads it too, using the installed code instead of the file.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import transformers

from ...core.errors import ArtifactError
from ...core.hf import auto_class_name
from . import surgery
from .surgery import PLAN_KEY, family_of, pruned_class

logger = logging.getLogger("hfsqueeze")

MODELING_FILE = "modeling_hfsqueeze_pruned.py"
_PREFIX = "Pruned"


def has_plan(config: Any) -> bool:
    """Whether ``config`` carries a pruning plan that only the artifact's modeling file (or hfsqueeze) can apply."""
    return bool(getattr(config, PLAN_KEY, None)) and family_of(config) is not None


def _stock_name(name: str) -> str:
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def _classes(model: Any) -> dict[str, type]:
    """Auto class name -> the stock Transformers class to subclass, for the model and for its backbone."""
    stock = _stock_class(type(model))
    found = {auto_class_name(model.config): stock}
    base = getattr(model, "base_model", model)
    if base is not model:
        found.setdefault("AutoModel", _stock_class(type(base)))
    return found


def _stock_class(cls: type) -> type:
    return getattr(transformers, _stock_name(cls.__name__), cls)


def modeling_source(classes: dict[str, type]) -> str:
    """The artifact's ``modeling_hfsqueeze_pruned.py``: the surgery module plus one subclass per class."""
    lines = [inspect.getsource(surgery).rstrip(), "", "", "# ---- classes of this artifact " + "-" * 89]
    for cls in sorted({c.__name__: c for c in classes.values()}.values(), key=lambda c: c.__name__):
        lines.append(f"from transformers import {cls.__name__} as _{cls.__name__}  # noqa: E402")
        lines.append(f"{_PREFIX}{cls.__name__} = pruned_class(_{cls.__name__})")
    return "\n".join(lines) + "\n"


def _classes_from_config(config: Any) -> dict[str, type]:
    """Auto class name -> stock class, read back from the ``auto_map`` that `save_hook` wrote."""
    auto_map = (config.get("auto_map") if isinstance(config, dict) else getattr(config, "auto_map", None)) or {}
    found = {}
    for auto, target in auto_map.items() if isinstance(auto_map, dict) else []:
        name = str(target).rsplit(".", 1)[-1]
        stock = getattr(transformers, _stock_name(name), None) if name.startswith(_PREFIX) else None
        if not isinstance(stock, type):
            return {}
        found[auto] = stock
    return found


def code_check(file: Path, config: Any) -> bool | None:
    """Claim ``modeling_hfsqueeze_pruned.py`` when it is byte for byte what `save_hook` writes for ``config``."""
    if file.name != MODELING_FILE:
        return None
    classes = _classes_from_config(config)
    if not classes or file.read_bytes() != modeling_source(classes).encode():
        raise ArtifactError(f"{file} is not the file hfsqueeze generates for this artifact (it was edited, or saved "
                            "by another hfsqueeze version); refusing to run or upload it: re-save the artifact, or "
                            "pass trust_remote_code=True (CLI: --trust-remote-code) if you trust the edit")
    return True


def save_hook(model: Any, tmp_dir: Path) -> None:
    """Write the modeling file and ``auto_map`` when the config carries a pruning plan."""
    config = getattr(model, "config", None)
    config_path = Path(tmp_dir) / "config.json"
    if not has_plan(config) or not config_path.is_file():
        return
    classes = _classes(model)
    (Path(tmp_dir) / MODELING_FILE).write_text(modeling_source(classes))
    data = json.loads(config_path.read_text())
    module = MODELING_FILE[:-3]
    data["auto_map"] = {auto: f"{module}.{_PREFIX}{cls.__name__}" for auto, cls in classes.items()}
    data["architectures"] = [_stock_name(a) for a in data.get("architectures") or []]
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def loader(path: str, config: Any, **kwargs: Any) -> Any:
    """`hfsqueeze.load_compressed` route for artifacts with a pruning plan (no remote code executed)."""
    if not has_plan(config):
        return None
    archs = [_stock_name(a) for a in (getattr(config, "architectures", None) or [])]
    stock = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if stock is None:
        stock = getattr(transformers, auto_class_name(config))._model_mapping[type(config)]
    kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    return pruned_class(stock).from_pretrained(path, **kwargs)


def load_snippet(config: Any, path_or_repo: str) -> str | None:
    """``AutoModel*.from_pretrained(..., trust_remote_code=True)`` for artifacts with a pruning plan."""
    if not has_plan(config):
        return None
    auto = auto_class_name(config)
    return (f"# trust_remote_code=True runs {MODELING_FILE} from this artifact: hfsqueeze's pruning surgery\n"
            "# (torch and transformers only) plus one class line per architecture; hfsqueeze checks it is byte for\n"
            "# byte the file it generates before pushing. To load without running code from the artifact:\n"
            f'#     import hfsqueeze; model = hfsqueeze.load_compressed("{path_or_repo}")\n'
            f"from transformers import {auto}\n\n"
            f'model = {auto}.from_pretrained("{path_or_repo}", trust_remote_code=True)\n')
