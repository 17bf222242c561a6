"""hfsqueeze: compress Hugging Face Transformers models with recipes of quantize, prune and distill stages.

```python
import hfsqueeze                                   # attaches PreTrainedModel.compress
report = model.compress("int8", tokenizer=tok)     # in place
print(report.to_markdown())
hfsqueeze.save_compressed(model, "out/", tokenizer=tok)
```

The layers and the life of one call are described in ``hfsqueeze/ARCHITECTURE.md``.
"""

import importlib
import importlib.abc
import logging
import sys
from typing import TYPE_CHECKING

from .core.errors import (
    ArtifactError,
    BackendMissingError,
    HfSqueezeError,
    HfSqueezeWarning,
    HubError,
    RecipeError,
    UnsupportedModelError,
)
from .core.utils import silence_bnb_noise

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "BackendMissingError",
    "CompressionReport",
    "EvaluationConfig",
    "HfSqueezeError",
    "HfSqueezeWarning",
    "HubError",
    "Metrics",
    "Recipe",
    "RecipeError",
    "Stage",
    "UnsupportedModelError",
    "available_stages",
    "compress",
    "load_compressed",
    "push_to_hub",
    "register_stage",
    "save_compressed",
    "tune",
]

# The rest of the public API is imported on first use (PEP 562), so `import hfsqueeze` does not import torch and
# `hfsqueeze --help` answers at once.
_LAZY = {
    "CompressionReport": "evaluation.report",
    "EvaluationConfig": "evaluation.config",
    "Metrics": "evaluation.metrics",
    "Recipe": "recipe",
    "Stage": "core.stage",
    "available_stages": "registry",
    "compress": "api",
    "load_compressed": "artifact.load",
    "push_to_hub": "hub",
    "register_stage": "registry",
    "save_compressed": "artifact.save",
}

if TYPE_CHECKING:
    from .api import compress
    from .artifact.load import load_compressed
    from .artifact.save import save_compressed
    from .core.stage import Stage
    from .evaluation.config import EvaluationConfig
    from .evaluation.metrics import Metrics
    from .evaluation.report import CompressionReport
    from .hub import push_to_hub
    from .recipe import Recipe
    from .registry import available_stages, register_stage
    from .tune import tune


def __getattr__(name: str):
    if name == "tune":  # a callable module: hfsqueeze.tune(model, ...), and hfsqueeze.tune.budget etc. stay reachable
        return importlib.import_module(".tune", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hfsqueeze' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"tune"})


_MODELING_UTILS = "transformers.modeling_utils"


def _attach() -> None:
    api = sys.modules.get(f"{__name__}.api")
    if api is not None and not hasattr(api, "attach_compress_method"):
        return  # Transformers loaded while hfsqueeze.api is being imported: its last line attaches
    # Deferred until Transformers defines PreTrainedModel: `import hfsqueeze` itself must not import torch.
    from .api import attach_compress_method

    try:
        attach_compress_method()
    except Exception as exc:  # noqa: BLE001 (a convenience must never break `import transformers`)
        logging.getLogger("hfsqueeze").warning("could not add PreTrainedModel.compress (%s); call "
                                               "hfsqueeze.compress(model, recipe) instead", exc)


class _AttachOnImport(importlib.abc.MetaPathFinder):
    """Attach ``PreTrainedModel.compress`` the moment Transformers defines ``PreTrainedModel``, without importing
    Transformers (and torch) on every ``import hfsqueeze``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODELING_UTILS:
            return None
        sys.meta_path.remove(self)  # one shot, and the search below must not find this finder again
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_attach(module) -> None:
                exec_module(module)
                _attach()

            spec.loader.exec_module = exec_then_attach  # this loader instance serves this one module
        return spec


def _attach_when_transformers_loads() -> None:
    if _MODELING_UTILS in sys.modules:
        _attach()
    elif not any(isinstance(f, _AttachOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AttachOnImport())


silence_bnb_noise()
_attach_when_transformers_loads()
