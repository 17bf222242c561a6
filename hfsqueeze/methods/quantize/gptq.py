"""GPTQ-style rounding onto bitsandbytes' own grids, written into real bnb modules.

GPTQ (Frantar et al. 2022) quantizes a Linear's weight one input column at a time and moves each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss
``|W X - Q X|^2`` (``H = 2 X X^T`` over calibration tokens). Here the grid is not GPTQ's uniform one but exactly what
bitsandbytes stores, so the result is a normal bnb checkpoint that plain ``from_pretrained`` reloads:

- 4-bit (NF4/FP4): the 16 code values come from ``bitsandbytes.functional.get_4bit_type``; every block of
  `BLOCKSIZE` consecutive weights (row-major, as bnb flattens them) shares one ``absmax``. The absmax values are fixed
  before the column sweep (the block's max-abs, optionally shrunk where that lowers the Hessian-weighted error) and,
  with double quantization, passed through bnb's own ``quantize_blockwise`` first, so the sweep rounds against the
  scales the checkpoint will really hold. The codes are packed two per byte exactly as bnb's ``quantize_4bit`` does.
- int8 (LLM.int8): one scale per output row (``SCB`` = the row's max-abs, as bnb's ``int8_vectorwise_quant``), rows
  rounded to ``[-127, 127]`` with the same error feedback, stored as ``Int8Params``' ``CB``/``SCB``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from ...compat.bnb import import_bnb
from .apply import finish_module

# bnb's default 4-bit block size; Transformers' `BitsAndBytesConfig` has no block size field, so a reload always
# uses bnb's default of 64, and so must the codes written here.
BLOCKSIZE = 64
# Blocks of a double-quantized absmax vector (bnb's `quantize_4bit` hard-codes 256 for the nested statistics).
NESTED_BLOCKSIZE = 256
# Candidate shrink factors of a block's absmax (1.0 = bnb's own choice); searched per block when asked.
SHRINK_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79)
# Hessians are summed and factored in float32, as GPTQ's reference code and GPTQModel do: float64 doubled the largest
# transient (two in x in copies: 1.6 GB each at an 8B model's down_proj) and gave no consistently better result
# (SmolLM2 int8-calibrated, KL held-out / bible over 4096 tokens each: 0.0073 / 0.0086 in float64, 0.0071 / 0.0088).
SWEEP_DTYPE = torch.float32
# Columns per lazy batch update (GPTQ's "block size"; a speed knob, the result is the same for any value).
LAZY_COLUMNS = 128


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]`` (GPT-2's `Conv1D` stores ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


class Grid4bit:
    """bitsandbytes' 4-bit code book (``nf4`` or ``fp4``) and its rounding: nearest code, ties to the lower one, on
    values clamped to ``[-1, 1]``, as bnb's ``quantize_4bit`` does."""

    def __init__(self, quant_type: str, device: torch.device | str = "cpu"):
        bnb = import_bnb()
        self.quant_type = quant_type
        self.code = bnb.functional.get_4bit_type(quant_type, device=device).float()
        self.order = torch.argsort(self.code)
        ordered = self.code[self.order]
        self.bounds = (ordered[:-1] + ordered[1:]) / 2

    def index(self, scaled: torch.Tensor) -> torch.Tensor:
        """Code indices (0..15, bnb's nibble values) of ``scaled`` = weight / absmax."""
        return self.order[torch.bucketize(scaled.clamp(-1, 1), self.bounds, out_int32=True)]


@dataclasses.dataclass
class Quantized:
    """One weight quantized onto a bnb grid: ``codes`` ([out, in] nibble values or int8 rows), the per-block absmax
    (4-bit: what the checkpoint stores, before double quantization) or per-row scales (int8), and the dequantized
    weight (what the bnb kernel computes with)."""

    codes: torch.Tensor
    scales: torch.Tensor
    dequantized: torch.Tensor
    nested: Any = None  # 4-bit double quantization: (quantized absmax, nested state, offset) from bnb itself


def block_absmax(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """bnb's per-block max-abs of ``weight`` flattened row-major (the last block may be shorter)."""
    flat = weight.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    padded = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    return padded.view(-1, blocksize).abs().amax(dim=1)


def expand_blocks(values: torch.Tensor, shape: torch.Size, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """Per-block values spread to a tensor of ``shape`` (each weight gets its block's value)."""
    n = shape[0] * shape[1]
    return values.repeat_interleave(blocksize)[:n].view(shape)


def search_absmax(weight: torch.Tensor, grid: Grid4bit, col_weight: torch.Tensor) -> torch.Tensor:
    """Per block, the absmax among `SHRINK_GRID` x max-abs with the lowest ``sum col_weight_j (w - q(w))^2``
    (``col_weight`` = the Hessian diagonal: how much each input column's error costs at the output)."""
    absmax = block_absmax(weight)
    cost_weight = col_weight.float().expand_as(weight)
    best, best_err = absmax.clone(), None
    ordered = grid.code[grid.order]  # values by bucket: one gather per candidate instead of two
    for factor in SHRINK_GRID:
        scale = expand_blocks((absmax * factor).clamp(min=1e-12), weight.shape)
        q = ordered[torch.bucketize((weight * (1.0 / scale)).clamp_(-1, 1), grid.bounds, out_int32=True)] * scale
        err = ((weight - q) ** 2 * cost_weight).reshape(-1)
        pad = (-err.numel()) % BLOCKSIZE
        err = torch.cat([err, err.new_zeros(pad)]).view(-1, BLOCKSIZE).sum(dim=1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, absmax * factor, best)
        best_err = torch.where(better, err, best_err)
    return best


def nested_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Double quantization of ``absmax`` by bnb's own code path (``quantize_blockwise`` of ``absmax - mean`` in blocks
    of 256, as ``quantize_4bit(compress_statistics=True)``): returns the absmax the kernel will really use and
    ``(qabsmax, state2, offset)`` for the `QuantState`."""
    bnb = import_bnb()
    offset = absmax.mean()
    qabsmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    effective = bnb.functional.dequantize_blockwise(qabsmax, state2) + offset
    return effective.float(), (qabsmax, state2, offset)


def add_gram(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + x^T x`` for the inputs ``x`` ``[tokens, in]`` of one more block, in `SWEEP_DTYPE`, in place."""
    x = x.float()
    xtx = x.t() @ x
    return xtx.to(SWEEP_DTYPE) if total is None else total.add_(xtx)


def prepared_hessian(hessian: torch.Tensor, perm: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(upper Cholesky factor of H^-1, dead columns)`` for a sweep over the columns in ``perm`` order (both in that
    order): columns no token ever activated get a unit diagonal (their weights are set to zero), and
    ``damp x mean(diag H)`` is added to the diagonal (GPTQ's dampening; it keeps the inverse well conditioned when
    tokens are few). ``hessian`` is left as it was.

    Memory: two copies of ``H`` at the peak (the factor, computed in place, and the identity the triangular
    solve overwrites), where the textbook sequence (permute, copy, Cholesky, inverse, second Cholesky) holds five or
    more; at an 8B model's 14,336-wide ``down_proj`` each copy is 0.8 GB."""
    # The sweep needs the upper factor U of H^-1 (U^T U = H^-1). With J the order reversal and J H J = L L^T,
    # U = J L^-1 J: one Cholesky and one triangular solve instead of GPTQ's Cholesky, inverse and second Cholesky
    # (the same U up to rounding, several times faster). J H J is gathered directly (the reversed `perm`).
    rev = perm.flip(0)
    h = torch.empty(0)
    dead = torch.diagonal(hessian)[rev] == 0
    extra = damp
    for attempt in range(5):  # a Hessian that is still not positive definite gets more dampening, as GPTQModel does
        del h
        h = hessian[rev[:, None], rev].to(SWEEP_DTYPE)
        h[dead, dead] = 1.0
        h.diagonal().add_(extra * float(torch.diagonal(h).mean()))
        factor, info = torch.linalg.cholesky_ex(h, out=(h, torch.empty((), dtype=torch.int32, device=h.device)))
        if int(info) == 0:
            break
        extra += damp
    else:
        raise ValueError("GPTQ: the calibration Hessian stays singular after dampening; raise damp or tokens")
    inverse = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    torch.linalg.solve_triangular(factor, inverse, upper=False, out=inverse)  # L^-1, in place of the identity
    del h, factor
    return inverse.float().flip(0, 1), dead.flip(0)


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread while the sweep works on single columns: ops on a few thousand values (``bucketize``
    splits work from 200 values on) spend more on waking and joining threads than on the work, many times more on a
    busy machine; the lazy batch update between column blocks keeps every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_sweep(weight: torch.Tensor, hinv: torch.Tensor, round_column) -> torch.Tensor:
    """GPTQ's column sweep with lazy batch updates. ``round_column(j, w)`` rounds column ``j`` (in the order given,
    values ``[out]``) onto the grid and returns ``(codes, dequantized)``; returns the codes ``[out, in]``. ``weight``
    (float32) is the sweep's work area: it is overwritten."""
    w = weight
    rows, cols = w.shape
    codes = torch.empty((rows, cols), dtype=torch.int16, device=w.device)
    for start in range(0, cols, LAZY_COLUMNS):
        end = min(start + LAZY_COLUMNS, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:end, start:end]
        with _one_thread():
            for i in range(end - start):
                column = block[:, i]
                code, value = round_column(start + i, column)
                codes[:, start + i] = code
                error = errors[:, i]
                torch.div(column - value, hblock[i, i], out=error)
                # in place: the rank-1 update of the block's remaining columns is the sweep's hot spot
                block[:, i + 1:].addr_(error, hblock[i, i + 1:], alpha=-1.0)
        w[:, end:].addmm_(errors, hinv[start:end, end:], alpha=-1.0)
    return codes


def column_order(hessian: torch.Tensor, act_order: bool) -> torch.Tensor:
    """The order the sweep visits input columns: by falling Hessian diagonal with ``act_order`` (GPTQ's "act order":
    the columns that cost most are rounded first, while the most columns remain to absorb their error)."""
    diag = torch.diagonal(hessian)
    return torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(diag.numel())


def stacked(weights: list[torch.Tensor], perm: torch.Tensor | None = None) -> torch.Tensor:
    """The weights' rows stacked as one new float32 ``[rows, in]`` tensor, its columns in ``perm`` order when given:
    one allocation, no float32 copy of each weight first."""
    rows = sum(weight.shape[0] for weight in weights)
    out = torch.empty((rows, weights[0].shape[1]), dtype=torch.float32, device=weights[0].device)
    row = 0
    for weight in weights:
        out[row:row + weight.shape[0]].copy_(weight if perm is None else weight[:, perm])
        row += weight.shape[0]
    return out


def sweep_in_order(weights: list[torch.Tensor], hessian: torch.Tensor, perm: torch.Tensor, damp: float,
                   round_column) -> torch.Tensor:
    """`gptq_sweep` over the stacked ``weights``' columns in ``perm`` order (``round_column`` gets positions in that
    order); codes come back in the weights' own column order. Dead columns (no input ever) are zeroed first."""
    hinv, dead = prepared_hessian(hessian, perm, damp)
    w = stacked(weights, perm)  # the sweep's work area
    w[:, dead] = 0
    codes = torch.empty(w.shape, dtype=torch.int16, device=w.device)
    codes[:, perm] = gptq_sweep(w, hinv, round_column)
    return codes


def _scales_4bit(w: torch.Tensor, hessian: torch.Tensor | None, grid: Grid4bit, double_quant: bool,
                 absmax_search: bool) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """``(absmax, nested, effective)`` of one weight: its per-block absmax (searched with ``hessian``'s diagonal when
    asked), the double-quantization state, and the per-block absmax the kernel really uses."""
    if absmax_search and hessian is not None:
        absmax = search_absmax(w, grid, torch.diagonal(hessian).float())
    else:
        absmax = block_absmax(w)
    nested, effective = None, absmax
    if double_quant:
        effective, nested = nested_absmax(absmax)
    return absmax, nested, effective


def _scale_table(effective: list[torch.Tensor], shapes: list[torch.Size]) -> tuple[torch.Tensor, int]:
    """The weights' block scales as ``(table, step)``: column ``j`` of the stacked weights is scaled by
    ``table[:, j // step]``. When a row holds whole blocks (``in`` a multiple of `BLOCKSIZE`, every real model) the
    table is ``[rows, in / 64]``, not a full ``[rows, in]`` matrix; otherwise (blocks run across rows) it is spread."""
    width = shapes[0][1]
    if width % BLOCKSIZE == 0:
        return torch.cat([e.view(shape[0], width // BLOCKSIZE) for e, shape in zip(effective, shapes)]), BLOCKSIZE
    return torch.cat([expand_blocks(e, shape) for e, shape in zip(effective, shapes)]), 1


def _scaled(values: torch.Tensor, table: torch.Tensor, step: int) -> torch.Tensor:
    """``values`` ``[rows, in]`` times its block scales from `_scale_table`, in place."""
    if step == 1:
        return values.mul_(table)
    values.view(values.shape[0], -1, step).mul_(table.unsqueeze(-1))
    return values


def quantize_4bit_group(weights: list[torch.Tensor], hessian: torch.Tensor | None, *, quant_type: str,
                        double_quant: bool, damp: float = 0.01, absmax_search: bool = False,
                        act_order: bool = True) -> list[Quantized]:
    """`quantize_4bit` of several weights ``[out_i, in]`` that share one input (and so one ``hessian``: q/k/v,
    gate/up): each keeps its own absmax (and double quantization), but one sweep runs over their rows stacked, which
    is what GPTQ computes for each alone (rows are independent given ``H``) at a fraction of the cost. Holds one
    float32 copy of the stacked weights (the sweep's work area) and its float32 result at the peak."""
    shapes = [weight.shape for weight in weights]
    grid = Grid4bit(quant_type, weights[0].device)
    parts = [_scales_4bit(weight, hessian, grid, double_quant, absmax_search) for weight in weights]
    table, step = _scale_table([p[2] for p in parts], shapes)
    inverse = 1.0 / table.clamp(min=1e-38)  # bnb multiplies by the reciprocal; the same rounding needs the same op
    if hessian is None:
        codes = grid.index(_scaled(stacked(weights), inverse, step))
    else:
        perm = column_order(hessian, act_order)
        # column-major: the sweep reads one column of scales per step
        table_t, inverse_t, blocks = table.t().contiguous(), inverse.t().contiguous(), (perm // step).tolist()

        def round_column(j: int, column: torch.Tensor):
            code = grid.index(column * inverse_t[blocks[j]])
            return code, grid.code[code] * table_t[blocks[j]]

        codes = sweep_in_order(weights, hessian, perm, damp, round_column)
    dequantized = _scaled(grid.code[codes.int()], table, step)
    out, row = [], 0
    for (absmax, nested, _), shape in zip(parts, shapes):
        rows = slice(row, row + shape[0])
        out.append(Quantized(codes=codes[rows].to(torch.uint8), scales=absmax, dequantized=dequantized[rows],
                             nested=nested))
        row += shape[0]
    return out


def quantize_4bit(weight: torch.Tensor, hessian: torch.Tensor | None, *, quant_type: str, double_quant: bool,
                  damp: float = 0.01, absmax_search: bool = False, act_order: bool = True) -> Quantized:
    """Quantize ``weight`` ``[out, in]`` onto bnb's 4-bit grid: GPTQ with ``hessian`` (``None``: round to nearest,
    which gives exactly bnb's own codes when ``absmax_search`` is off)."""
    return quantize_4bit_group([weight], hessian, quant_type=quant_type, double_quant=double_quant, damp=damp,
                               absmax_search=absmax_search, act_order=act_order)[0]


def quantize_int8_group(weights: list[torch.Tensor], hessian: torch.Tensor | None, *, damp: float = 0.01,
                        act_order: bool = True) -> list[Quantized]:
    """`quantize_int8` of several weights sharing one input: one sweep over their stacked rows (each row keeps its
    own ``SCB``, so the result is each weight's own)."""
    scb = torch.cat([weight.abs().amax(dim=1).float() for weight in weights]).clamp(min=1e-12)
    step = (scb / 127.0).unsqueeze(1)
    if hessian is None:
        codes = torch.clamp(torch.round(stacked(weights) / step), -127, 127)
    else:
        col_step = step.squeeze(1)

        def round_column(j: int, column: torch.Tensor):
            code = torch.clamp(torch.round(column / col_step), -127, 127)
            return code, code * col_step

        codes = sweep_in_order(weights, hessian, column_order(hessian, act_order), damp, round_column)
    codes = codes.to(torch.int8)
    dequantized = codes.float() * step
    out, row = [], 0
    for part in weights:
        rows = slice(row, row + part.shape[0])
        out.append(Quantized(codes=codes[rows], scales=scb[rows], dequantized=dequantized[rows]))
        row += part.shape[0]
    return out


def quantize_int8(weight: torch.Tensor, hessian: torch.Tensor | None, *, damp: float = 0.01,
                  act_order: bool = True) -> Quantized:
    """Quantize ``weight`` ``[out, in]`` to LLM.int8 rows (``SCB`` = row max-abs): GPTQ with ``hessian``, round to
    nearest without."""
    return quantize_int8_group([weight], hessian, damp=damp, act_order=act_order)[0]


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two nibbles per byte, the first value in the high nibble, as bnb's ``quantize_4bit`` (shape ``[n/2, 1]``)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return ((flat[::2] << 4) | flat[1::2]).unsqueeze(1)


def quant_state_4bit(q: Quantized, shape: torch.Size, dtype: torch.dtype, quant_type: str):
    """The `QuantState` bnb's ``quantize_4bit`` would have built for these codes and scales."""
    bnb = import_bnb()
    code = bnb.functional.get_4bit_type(quant_type, device=q.scales.device)
    common = dict(shape=torch.Size(shape), dtype=dtype, blocksize=BLOCKSIZE, code=code, quant_type=quant_type)
    if q.nested is None:
        return bnb.functional.QuantState(absmax=q.scales, **common)
    qabsmax, state2, offset = q.nested
    return bnb.functional.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def bnb_module(module: nn.Module, q: Quantized, qc: Any, config: Any) -> nn.Module:
    """The bnb module (``Linear4bit`` / ``Linear8bitLt``) holding ``q`` in place of ``module``, in the state bnb's own
    quantization leaves (same attributes as `apply.stock_bnb_module`)."""
    bnb = import_bnb()
    weight = weight_out_in(module)
    out_features, in_features = weight.shape
    bias = module.bias is not None
    if config.bits == 8:
        new = bnb.nn.Linear8bitLt(in_features, out_features, bias, has_fp16_weights=False, threshold=config.threshold,
                                  device="meta")
        new.weight = bnb.nn.Int8Params(q.codes, requires_grad=False, has_fp16_weights=False, CB=q.codes,
                                       SCB=q.scales.float())
    else:
        storage = qc.bnb_4bit_quant_storage
        new = bnb.nn.Linear4bit(in_features, out_features, bias, qc.bnb_4bit_compute_dtype,
                                compress_statistics=config.double_quant, quant_type=config.quant_type,
                                quant_storage=storage, device="meta")
        state = quant_state_4bit(q, weight.shape, weight.dtype, config.quant_type)
        packed = pack_4bit(q.codes)
        if storage != torch.uint8:
            packed = packed.squeeze().view(storage).unsqueeze(1)
        new.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                                       compress_statistics=config.double_quant, quant_type=config.quant_type,
                                       quant_storage=storage, module=new, bnb_quantized=True)
        new.quant_state = state
        new.support_avx512bf16_for_cpu = False
    return finish_module(new, module, bias)


def quantize_weights(weights: list[torch.Tensor], hessian: torch.Tensor | None, config: Any) -> list[Quantized]:
    """`quantize_4bit_group` or `quantize_int8_group` as ``config`` (a `QuantizeConfig`) says; ``weights`` share
    one input (one ``hessian``)."""
    if config.bits == 8:
        return quantize_int8_group(weights, hessian, damp=config.damp or 0.01)
    return quantize_4bit_group(weights, hessian, quant_type=config.quant_type, double_quant=config.double_quant,
                               damp=config.damp or 0.01, absmax_search=bool(config.absmax_search))


def quantize_weight(weight: torch.Tensor, hessian: torch.Tensor | None, config: Any) -> Quantized:
    """`quantize_weights` of one weight."""
    return quantize_weights([weight], hessian, config)[0]


def stock_dequantized(weight: torch.Tensor, config: Any) -> torch.Tensor:
    """What bnb's own round-to-nearest quantization of ``weight`` computes with (float32), by bnb's own functions."""
    bnb = import_bnb()
    if config.bits == 8:
        codes, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        return codes.float() * (scb.float() / 127.0).unsqueeze(1)
    packed, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE,
                                                 compress_statistics=config.double_quant,
                                                 quant_type=config.quant_type)
    return bnb.functional.dequantize_4bit(packed, state).float()


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)``: the squared output error of the quantized weight on the tokens ``H`` summed."""
    diff = (weight.float() - dequantized).double()
    return float(((diff @ hessian.double()) * diff).sum())


def token_error(weight: torch.Tensor, dequantized: torch.Tensor, inputs: torch.Tensor) -> float:
    """``|(W - Q) X^T|^2`` on the tokens ``inputs`` ``[tokens, in]``: `output_error` with ``H = X^T X``, without an
    ``in x in`` matrix (float32 products, summed in float64)."""
    diff = weight.float() - dequantized
    return float((diff @ inputs.float().t()).double().pow(2).sum())


__all__ = ["BLOCKSIZE", "add_gram", "Grid4bit", "Quantized", "bnb_module", "output_error", "pack_4bit", "quantize_4bit",
           "quantize_4bit_group", "quantize_int8",
           "quantize_int8_group", "quantize_weight", "quantize_weights", "stock_dequantized", "token_error",
           "weight_out_in"]
