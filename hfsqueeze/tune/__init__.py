"""`hfsqueeze.tune`: search compression settings to a budget, per module, with a Pareto front and a plain recipe out.

```python
result = hfsqueeze.tune(model, tokenizer=tok, budget={"size": 0.30}, trials=30, output="out/tuned")
result.pareto        # list of points: recipe, quality, size, latency
result.recipe        # the chosen recipe, explicit
```

This package is itself callable: ``hfsqueeze.tune(...)`` is `hfsqueeze.tune.tuner.tune` (see its docstring), while
``hfsqueeze.tune.budget`` and the other submodules stay reachable as attributes.
"""

import sys
import types

from .budget import Budget, InfeasibleBudgetError
from .space import Space, load_space
from .trial import TuneSettings
from .tuner import TuneResult, tune


class _CallableModule(types.ModuleType):
    """``hfsqueeze.tune(...)`` calls `tune`; a plain function of that name would hide this package's submodules."""

    def __call__(self, *args, **kwargs) -> TuneResult:
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["Budget", "InfeasibleBudgetError", "Space", "TuneResult", "TuneSettings", "load_space", "tune"]
