"""hfsqueeze: compress Hugging Face Transformers models with recipes of quantize, prune and distill stages.

```python
import hfsqueeze                                   # attaches PreTrainedModel.compress
report = model.compress("int8", tokenizer=tok)     # in place
print(report.to_markdown())
hfsqueeze.save_compressed(model, "out/", tokenizer=tok)
```

The layers and the life of one call are described in ``hfsqueeze/ARCHITECTURE.md``.
"""

from .api import attach_compress_method, compress
from .artifact.load import load_compressed
from .artifact.save import save_compressed
from .core.errors import (
    ArtifactError,
    BackendMissingError,
    HfSqueezeError,
    HfSqueezeWarning,
    HubError,
    RecipeError,
    UnsupportedModelError,
)
from .core.stage import Stage
from .evaluation.metrics import Metrics
from .evaluation.report import CompressionReport
from .hub import push_to_hub
from .recipe import EvaluationConfig, Recipe
from .registry import available_stages, register_stage

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
]

attach_compress_method()
