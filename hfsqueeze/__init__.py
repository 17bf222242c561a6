"""hfsqueeze: compress Hugging Face Transformers models with recipes of quantize, prune and distill stages.

```python
import hfsqueeze                                   # attaches PreTrainedModel.compress
report = model.compress("int8", tokenizer=tok)     # in place
print(report.to_markdown())
hfsqueeze.save_compressed(model, "out/", tokenizer=tok)
```
"""

from .api import compress
from .errors import (
    ArtifactError,
    BackendMissingError,
    HfSqueezeError,
    HfSqueezeWarning,
    HubError,
    RecipeError,
    UnsupportedModelError,
)
from .hub import push_to_hub
from .measure import Metrics
from .recipe import EvaluationConfig, Recipe
from .registry import available_stages, register_stage
from .report import CompressionReport
from .save import load_compressed, save_compressed
from . import tune  # noqa: E402  (a callable module: hfsqueeze.tune(model, ...); see hfsqueeze.tune)

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
    "UnsupportedModelError",
    "available_stages",
    "compress",
    "load_compressed",
    "push_to_hub",
    "register_stage",
    "save_compressed",
    "tune",
]


def _attach() -> None:
    from .api import attach_compress_method

    attach_compress_method()


_attach()
