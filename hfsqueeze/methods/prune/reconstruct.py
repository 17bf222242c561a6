"""Least-squares reconstruction of the output projections that pruning narrows.

Removing attention heads (FFN neurons) removes input columns of the attention (FFN) output projection. What those
columns added is partly predictable from the columns that stay, because activations are correlated. Instead of only
dropping the columns, `reconstruct` re-fits the kept ones (and the bias, where the projection has one) by ridge
regression, so that the projection's output on calibration data is as close as possible to the unpruned output
(the "layer-wise reconstruction" of Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers";
FLAP, An et al. 2024, compensates with the bias alone). The kept heads' and neurons' own activations do not change
when others leave, so one pass of the model before the cut gives every statistic needed:

    W_kept' = W_kept + W_gone @ C[gone, kept] @ (C[kept, kept] + ridge * I)^-1,    C = E[x x^T] over calibration tokens,

with ``x`` extended by a constant 1 for a projection with a bias (the bias is re-fitted with the weights). The ridge
term, relative to the mean of ``diag(C[kept, kept])``, penalizes the correction (not the weights), so the fit cannot
lean on directions the calibration text barely visits and a large ridge falls back to the plain cut. Cost: one forward pass over the calibration blocks and one small solve per narrowed projection.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...core.hf import eval_mode, to_device
from ...core.utils import progress
from .surgery import weight_out_in

logger = logging.getLogger("hfsqueeze")


class InputMoments:
    """``E[x x^T]`` of the inputs of some modules (extended by a constant 1 where the module has a bias).

    A forward pre-hook per module accumulates the sums in float64 while the model runs on calibration data.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if getattr(module, "bias", None) is not None:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            xtx = (x.t() @ x).double()
            self.sums[name] = self.sums[name] + xtx if name in self.sums else xtx
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return hook

    def collect(self, model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> "InputMoments":
        """Run ``model`` on ``blocks`` (no gradients) and accumulate the moments."""
        handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in self.modules.items()]
        try:
            with torch.no_grad(), eval_mode(model):
                for start in progress(range(0, blocks.shape[0], batch_size), desc="prune: reconstruction statistics"):
                    model(input_ids=to_device(blocks[start:start + batch_size], model))
        finally:
            for handle in handles:
                handle.remove()
        return self

    def moments(self, name: str) -> torch.Tensor:
        return self.sums[name] / max(self.tokens[name], 1)


def reconstruct(module: nn.Module, keep: torch.Tensor, moments: torch.Tensor, ridge: float) -> float:
    """Re-fit the columns ``keep`` (and the bias) of ``module`` in place so that, with the other input columns gone,
    its output stays as close as possible to what it was; the columns outside ``keep`` are left for the cut.

    Returns the relative output error that remains (``|W x - W' x_kept|^2 / |W x|^2`` in expectation), for the report.
    """
    weight = weight_out_in(module)
    bias = getattr(module, "bias", None)
    full = weight.detach().double()
    index = keep.to(torch.long)
    if bias is not None:  # the constant input that carries the bias is always kept
        full = torch.cat([full, bias.detach().double()[:, None]], dim=1)
        index = torch.cat([index, torch.tensor([full.shape[1] - 1])])
    c = moments.to(full.device)
    dropped = torch.ones(full.shape[1], dtype=torch.bool)
    dropped[index] = False
    c_kk = c[index][:, index]
    scale = float(c_kk.diagonal().mean()) or 1.0
    # Ridge on the correction, not on the weights: a large ridge falls back to the plain cut.
    correction = torch.linalg.solve(c_kk + ridge * scale * torch.eye(len(index), dtype=c.dtype, device=c.device),
                                    (full[:, dropped] @ c[dropped][:, index]).t()).t()
    solved = full[:, index] + correction
    before = float((full @ c * full).sum())  # trace(W C W^T) without the [out, out] product
    error = full.clone()
    error[:, index] -= solved
    residual = float((error @ c * error).sum())
    with torch.no_grad():
        cols = keep.to(weight.device)
        weight[:, cols] = solved[:, :len(keep)].to(weight.dtype)
        if bias is not None:
            bias.copy_(solved[:, -1].to(bias.dtype))
    return residual / before if before > 0 else 0.0
