"""Search spaces: what a tuner may vary in a stage's config (declared by each `Stage.search_space`).

A space maps a config key (dots for nested keys: ``training_args.max_steps``) to a `Param`. A param with ``when``
is only drawn when earlier params took one of the listed values (``threshold`` only for ``bits: 8``). The special key
`OPTIONAL` says the whole stage may be left out of the recipe.

```python
space = {"bits": Param.choice(8, 4), "threshold": Param.range(1.0, 6.0, when={"bits": (8,)})}
sample(space, random.Random(0))  # {"bits": 8, "threshold": 3.71...}
```
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Mapping

# Key of a boolean param meaning "this stage is in the recipe" (a tuner may turn the stage off).
OPTIONAL = "enabled"


@dataclasses.dataclass(frozen=True)
class Param:
    """One dimension: a set of ``choices``, or numbers from ``low`` to ``high`` (on a ``step`` grid, or ``log``)."""

    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False
    when: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("a Param has either choices or a low..high range")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"a Param range needs low <= high, got {self.low}..{self.high}")

    @classmethod
    def choice(cls, *choices: Any, when: Mapping[str, tuple[Any, ...]] | None = None) -> "Param":
        return cls(choices=tuple(choices), when=dict(when or {}))

    @classmethod
    def range(cls, low: float, high: float, *, step: float | None = None, log: bool = False, integer: bool = False,
              when: Mapping[str, tuple[Any, ...]] | None = None) -> "Param":
        return cls(low=low, high=high, step=step, log=log, integer=integer, when=dict(when or {}))

    def applies(self, drawn: Mapping[str, Any]) -> bool:
        """Whether this param is drawn, given the values drawn before it."""
        return all(drawn.get(key) in values for key, values in self.when.items())

    def draw(self, rng: random.Random) -> Any:
        """A random value (uniform; log-uniform when ``log``)."""
        if self.choices is not None:
            value = rng.choice(self.choices)
            return list(value) if isinstance(value, tuple) else value
        if self.integer and not self.log:
            return rng.randint(int(self.low), int(self.high))
        if self.step:
            steps = int(round((self.high - self.low) / self.step))
            return round(self.low + self.step * rng.randint(0, steps), 10)
        if self.log:
            value = self.low * (self.high / self.low) ** rng.random()
            return int(round(value)) if self.integer else float(value)
        return rng.uniform(self.low, self.high)


def sample(space: Mapping[str, Param], rng: random.Random) -> dict[str, Any]:
    """One random point of ``space`` as a nested config dict (the `OPTIONAL` key stays at the top)."""
    drawn: dict[str, Any] = {}
    for key, param in space.items():
        if param.applies(drawn):
            drawn[key] = param.draw(rng)
    return nested(drawn)


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"training_args.max_steps": 50, "alpha": 1.0}`` -> ``{"training_args": {"max_steps": 50}, "alpha": 1.0}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


__all__ = ["OPTIONAL", "Param", "nested", "sample"]
