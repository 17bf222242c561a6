"""Run calibration text through a model one decoder layer at a time.

The inputs of the first layer are captured with a forward pre-hook that stops the model there (nothing after the
embeddings runs); each layer then runs on the cached inputs, and its outputs, computed after the caller changed the
layer (quantized it), become the next layer's inputs, as GPTQ does. Only one layer's activations are held, never a
second model. The keyword arguments each layer receives (attention mask, position embeddings, position ids; the cache
is off) are recorded once from one real pass, per layer, because some models give layers different ones (Gemma-3's
sliding-window layers get their own mask). Every block has the same length and no padding, so those arguments are
the same for every block.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ...core.hf import find_layer_stack, to_device


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass early."""


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


class LayerwiseRunner:
    """Cached inputs of the current decoder layer for a set of token blocks ``[n, seq_len]``.

    Example:

    ```python
    runner = LayerwiseRunner(model, blocks)
    for index, layer in runner.layers():
        runner.run(layer)          # with hooks on the layer's modules: statistics of its inputs
        ...                        # change the layer
        # the loop computes the next layer's inputs from the changed layer
    ```
    """

    def __init__(self, model: nn.Module, blocks: torch.Tensor):
        self.model = model
        _, self.stack = find_layer_stack(model)
        self.base = getattr(model, "base_model", model)
        self.inputs: list[torch.Tensor] = []
        self.layer_args: list[tuple[tuple, dict] | None] = [None] * len(self.stack)
        self._capture(blocks)

    def _forward_kwargs(self) -> dict[str, Any]:
        return {"use_cache": False} if getattr(self.model.config, "use_cache", None) is not None else {}

    def _capture(self, blocks: torch.Tensor) -> None:
        last = len(self.stack) - 1
        state = {"first_pass": True}

        def hook(index: int):
            def record(module: nn.Module, args: tuple, kwargs: dict):
                hidden, rest, kw = _split(args, kwargs)
                if self.layer_args[index] is None:
                    self.layer_args[index] = (rest, kw)
                if index == 0:
                    self.inputs.append(hidden.detach())
                    if not state["first_pass"]:
                        raise _Stop
                if index == last:
                    raise _Stop
                return None
            return record

        handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(self.stack)]
        try:
            with torch.no_grad():
                for i in range(blocks.shape[0]):
                    try:
                        self.base(input_ids=to_device(blocks[i:i + 1], self.model), **self._forward_kwargs())
                    except _Stop:
                        pass
                    state["first_pass"] = False
        finally:
            for handle in handles:
                handle.remove()
        if any(a is None for a in self.layer_args) or len(self.inputs) != blocks.shape[0]:
            raise RuntimeError("layer-wise calibration could not capture every decoder layer's inputs")

    def run(self, index: int, layer: nn.Module, which: Iterable[int] | None = None,
            collect: bool = False) -> list[torch.Tensor] | None:
        """Run ``layer`` (the ``index``-th) on the cached inputs (all, or the blocks in ``which``), without
        gradients; return the outputs when ``collect``."""
        rest, kwargs = self.layer_args[index]
        outputs = []
        with torch.no_grad():
            for i in (range(len(self.inputs)) if which is None else which):
                out = _output(layer(self.inputs[i], *rest, **kwargs))
                if collect:
                    outputs.append(out.detach())
        return outputs if collect else None

    def layers(self) -> Iterable[tuple[int, nn.Module]]:
        """Yield ``(index, layer)`` in order; after the caller is done with a layer, its outputs on the cached inputs
        replace them (the next layer's inputs)."""
        for index in range(len(self.stack)):
            yield index, self.stack[index]
            # the caller may have put another module in the stack (a fallback layer): run what is there now
            self.inputs = self.run(index, self.stack[index], collect=True)


def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None]) -> list[Any]:
    """Forward pre-hooks calling ``fn(name, x)`` with each module's input flattened to ``[tokens, features]``."""

    def make(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            fn(name, x.reshape(-1, x.shape[-1]))
        return hook

    return [module.register_forward_pre_hook(make(name)) for name, module in modules.items()]


__all__ = ["LayerwiseRunner", "input_hooks"]
