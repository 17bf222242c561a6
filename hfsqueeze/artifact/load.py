"""Loading saved artifacts back: `load_compressed`, and `load_snippet`, the code a user runs without hfsqueeze.

Stock artifacts load with the Transformers auto class of their architecture; a stage whose artifacts need more
(a pruned model with per-layer sizes) answers through its `Stage.load` and `Stage.load_snippet` hooks.
"""

from __future__ import annotations

import os
from typing import Any

import transformers
from transformers import AutoConfig

from ..compat.bnb import guard_bnb_cpu_repack
from ..core.hf import auto_class_name
from ..registry import stages


def load_snippet(config, path_or_repo: str) -> str:
    """The exact Python code a user runs to load the artifact at ``path_or_repo`` (it defines ``model``)."""
    for stage in stages():
        code = stage.load_snippet(config, path_or_repo)
        if code:
            return code
    auto = auto_class_name(config)
    return f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{path_or_repo}")\n'


def load_compressed(path: str | os.PathLike, **kwargs: Any):
    """Load any artifact `save_compressed` wrote (stock Transformers ones and those a stage's loader handles).

    Example:

    ```python
    model = hfsqueeze.load_compressed("out/")
    ```
    """
    path = str(path)
    config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k == "trust_remote_code"})
    model = next((m for m in (stage.load(path, config, **kwargs) for stage in stages()) if m is not None), None)
    if model is None:
        model = getattr(transformers, auto_class_name(config)).from_pretrained(path, **kwargs)
    return guard_bnb_cpu_repack(model).eval()


__all__ = ["load_compressed", "load_snippet"]
