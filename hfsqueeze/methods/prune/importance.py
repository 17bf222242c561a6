"""Importance scores for attention heads, FFN neurons and layers.

Every score is measured through multiplicative gates installed with hooks, never by editing the model: a gate per
query head on the input of the attention output projection, a gate per neuron on the input of the FFN output
projection, and a gate per layer on its residual update (``out = x + g * (layer(x) - x)``). All gates at 1 leave the
model unchanged; a head's gate at 0 is exactly what removing the head does, which is what the exactness tests check.

- ``gradient``: for causal LMs, ``E|dL/dg|`` with L the next-token loss (Michel et al. 2019 for heads; for neurons it
  equals the first-order Taylor term ``|sum_t a_t dL/da_t|``). Encoders have no loss of their own, so they score the
  sensitivity of the mean-pooled embedding's direction (what cosine similarity sees): ``sqrt(E (r . dE/dg)^2) / |E|``
  with random Gaussian directions ``r`` orthogonal to ``E``, the norm of the first-order change of the embedding's
  direction when the gate closes.
- ``activation``: mean norm of what each head (neuron) adds to the residual stream on calibration data; for layers,
  the mean relative norm of the layer's update ``|layer(x) - x| / |x|``.
- ``magnitude``: weight norms only (no data): the Frobenius norm of every weight a head or neuron owns (shared
  key/value weights split evenly between the query heads of their group).
- ``kl``: the KL divergence of the next-token distribution to the unmasked model when each head unit (or layer) is
  masked, one forward pass per unit (the layers before the masked one are replayed from a recorded pass, so a unit
  costs about half a forward on average); encoders use 1 - cosine of the pooled embedding. Scoring every FFN neuron
  that way would take thousands of passes, so neurons use the ``gradient`` score under ``kl``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...core.hf import eval_mode, input_device, is_causal_lm, to_device
from ...core.quality import cosine, logprobs, pooled_embeddings, score_lm
from ...core.utils import progress, progress_bar
from .surgery import (
    attention_shape,
    base_of,
    ffn_input_projs,
    ffn_output_proj,
    ffn_width,
    head_output_proj,
    layer_list,
    qkv_weights,
    weight_out_in,
)

logger = logging.getLogger("hfsqueeze")


def head_units(n_q: int, n_kv: int, mode: str) -> list[tuple[list[int], list[int]]]:
    """The pruning units of one layer: ``(query heads, key/value heads)`` that are removed together.

    Multi-head attention: one head per unit. Grouped-query attention: ``groups`` -> a key/value head with its query
    heads; ``slots`` -> slot ``s`` of every group (no key/value head goes).
    """
    group = n_q // n_kv
    if group == 1:
        return [([h], [h]) for h in range(n_q)]
    if mode == "groups":
        return [(list(range(g * group, (g + 1) * group)), [g]) for g in range(n_kv)]
    return [([g * group + s for g in range(n_kv)], []) for s in range(group)]


@dataclass
class Scores:
    """Importance per head unit, per FFN neuron and per layer of the model as it was when scored."""

    heads: list[torch.Tensor] = field(default_factory=list)
    ffn: list[torch.Tensor] = field(default_factory=list)
    layers: torch.Tensor | None = None


class Gates:
    """Multiplicative gates on head outputs, FFN neurons and layer updates, installed as hooks while in use.

    Args:
        family (`str`): ``"llama"``, ``"gpt2"`` or ``"bert"``.
        model (`nn.Module`): the model to gate.
        layers (`bool`): also gate each layer's residual update (slightly perturbs the rounding when all gates are 1).
        track (`bool`): accumulate the activation statistics used by the ``activation`` score.
    """

    def __init__(self, family: str, model: nn.Module, *, layers: bool = False, track: bool = False):
        self.family, self.model, self.track = family, model, track
        self.layer_modules = list(layer_list(family, model))
        device = input_device(model)
        # Each layer's gates live with that layer (a device_map="auto" model spreads its layers over devices).
        where = [next((p.device for p in m.parameters()), device) for m in self.layer_modules]
        self.head = [torch.ones(attention_shape(family, m)[0], device=d) for m, d in zip(self.layer_modules, where)]
        self.ffn = [torch.ones(ffn_width(family, m), device=d) for m, d in zip(self.layer_modules, where)]
        self.layer = torch.ones(len(self.layer_modules), device=device) if layers else None
        self.head_act = [torch.zeros_like(g) for g in self.head]
        self.ffn_act = [torch.zeros_like(g) for g in self.ffn]
        self.layer_act = torch.zeros(len(self.layer_modules), device=device)
        self.tokens = 0
        self._handles: list[Any] = []

    def requires_grad_(self, flag: bool = True) -> "Gates":
        for g in self.head + self.ffn + ([self.layer] if self.layer is not None else []):
            g.requires_grad_(flag)
        return self

    def zero_grad(self) -> None:
        for g in self.head + self.ffn + ([self.layer] if self.layer is not None else []):
            g.grad = None

    def __enter__(self) -> "Gates":
        for i, layer in enumerate(self.layer_modules):
            self._handles.append(head_output_proj(self.family, layer).register_forward_pre_hook(self._head_hook(i)))
            self._handles.append(ffn_output_proj(self.family, layer).register_forward_pre_hook(self._ffn_hook(i)))
            if self.layer is not None:
                self._handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _head_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            gate = self.head[i]
            shaped = x.reshape(*x.shape[:-1], gate.numel(), x.shape[-1] // gate.numel())
            if self.track:
                with torch.no_grad():
                    w = weight_out_in(module)
                    w = w.reshape(w.shape[0], gate.numel(), -1)
                    contrib = torch.einsum("...nd,end->...ne", shaped.float(), w.float())
                    self.head_act[i] += contrib.norm(dim=-1).reshape(-1, gate.numel()).sum(0)
            return ((shaped * gate[:, None].to(x)).reshape(x.shape), *args[1:])

        return hook

    def _ffn_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if self.track:
                with torch.no_grad():
                    self.ffn_act[i] += x.detach().float().abs().reshape(-1, x.shape[-1]).sum(0)
            return (x * self.ffn[i].to(x), *args[1:])

        return hook

    def _layer_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            if self.track:
                with torch.no_grad():
                    rel = (out - hidden).float().norm(dim=-1) / hidden.float().norm(dim=-1).clamp_min(1e-6)
                    self.layer_act[i] += rel.sum().to(self.layer_act.device)
            new = hidden + self.layer[i].to(out) * (out - hidden)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """No weight gradients while scoring (only the gates need them); restores ``requires_grad`` and the mode."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with eval_mode(model):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, or the mean-pooled last hidden state of any other model."""
    ids = to_device(ids, model)
    if is_causal_lm(model):
        return model(input_ids=ids, use_cache=False).logits
    return base_of(model)(input_ids=ids).last_hidden_state.mean(dim=1)


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    targets = ids[:, 1:].reshape(-1).to(logits.device)  # the head may sit on another device than the embeddings
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets)


def _aggregate(per_head: list[torch.Tensor], units: list[list[tuple[list[int], list[int]]]]) -> list[torch.Tensor]:
    return [torch.stack([scores[q].sum() for q, _ in layer_units]) for scores, layer_units in zip(per_head, units)]


def _weight_sq(module: nn.Module) -> torch.Tensor:
    return weight_out_in(module).detach().float().pow(2)


def magnitude_scores(family: str, model: nn.Module, units: list[list[tuple[list[int], list[int]]]]) -> Scores:
    """Weight-norm importance (no data)."""
    per_head, ffn, layer_scores = [], [], []
    for layer in layer_list(family, model):
        n_q, n_kv, hd = attention_shape(family, layer)
        group = n_q // n_kv
        o = _weight_sq(head_output_proj(family, layer)).sum(0).reshape(n_q, hd).sum(1)
        q_w, k_w, v_w = (w.detach().float().pow(2) for w in qkv_weights(family, layer))
        q = q_w.sum(1).reshape(n_q, hd).sum(1)
        kv = (k_w + v_w).sum(1).reshape(n_kv, hd).sum(1)
        per_head.append((q + o + kv.repeat_interleave(group) / group).sqrt())
        neuron = _weight_sq(ffn_output_proj(family, layer)).sum(0)
        for proj in ffn_input_projs(family, layer):
            neuron = neuron + _weight_sq(proj).sum(1)
        ffn.append(neuron.sqrt())
        layer_scores.append(sum(p.detach().float().pow(2).sum() for p in layer.parameters() if p.dim() >= 2).sqrt())
    return Scores(heads=_aggregate(per_head, units), ffn=ffn, layers=torch.stack(layer_scores))


def gradient_scores(
    family: str, model: nn.Module, blocks: torch.Tensor, units: list[list[tuple[list[int], list[int]]]],
    *, layers: bool, batch_size: int = 1, seed: int = 0,
) -> Scores:
    """``E|dL/dg|`` (causal LMs) or the pooled-embedding sensitivity (encoders) of every gate."""
    causal = is_causal_lm(model)
    gates = Gates(family, model, layers=layers).requires_grad_()
    head_acc = [torch.zeros_like(g) for g in gates.head]
    ffn_acc = [torch.zeros_like(g) for g in gates.ffn]
    layer_acc = torch.zeros_like(gates.layer) if layers else None
    generator = torch.Generator().manual_seed(seed)
    with frozen_weights(model), torch.enable_grad(), gates:
        for start in progress(range(0, blocks.shape[0], batch_size), desc="importance (gradient)"):
            ids = to_device(blocks[start:start + batch_size], model)
            gates.zero_grad()
            out = _forward(model, ids)
            if causal:
                loss = _lm_loss(out, ids)
            else:
                # Only the embedding's direction matters to cosine similarity: project the random direction
                # orthogonally to the embedding and scale by its norm.
                norm = out.detach().float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
                unit = out.detach().float() / norm
                direction = torch.randn(out.shape, generator=generator).to(unit)
                direction = direction - (direction * unit).sum(-1, keepdim=True) * unit
                loss = (out.float() * direction / norm).sum()
            loss.backward()
            post = torch.abs if causal else torch.square
            for acc, g in zip(head_acc + ffn_acc, gates.head + gates.ffn):
                acc += post(g.grad)
            if layers:
                layer_acc += post(gates.layer.grad)
    n = max(1, -(-blocks.shape[0] // batch_size))
    finish = (lambda t: t / n) if causal else (lambda t: (t / n).sqrt())
    return Scores(
        heads=_aggregate([finish(t) for t in head_acc], units),
        ffn=[finish(t) for t in ffn_acc],
        layers=finish(layer_acc) if layers else None,
    )


@torch.no_grad()
def activation_scores(
    family: str, model: nn.Module, blocks: torch.Tensor, units: list[list[tuple[list[int], list[int]]]],
    *, layers: bool, batch_size: int = 4,
) -> Scores:
    """Mean output norm of every head and neuron (and relative update norm of every layer) on ``blocks``."""
    gates = Gates(family, model, layers=layers, track=True)
    with frozen_weights(model), gates:
        for start in progress(range(0, blocks.shape[0], batch_size), desc="importance (activation)"):
            _forward(model, blocks[start:start + batch_size])
    tokens = blocks.numel()
    ffn = []
    for layer, acc in zip(gates.layer_modules, gates.ffn_act):
        col_norm = _weight_sq(ffn_output_proj(family, layer)).sum(0).sqrt()
        ffn.append(acc / tokens * col_norm)
    return Scores(
        heads=_aggregate([a / tokens for a in gates.head_act], units),
        ffn=ffn,
        layers=gates.layer_act / tokens if layers else None,
    )


def _record(model: nn.Module, layers: list[nn.Module], blocks: torch.Tensor):
    """Per block: every layer's raw output, and the model's output (log-probabilities or pooled embedding)."""
    recorded: list[list[Any]] = [[None] * len(layers) for _ in range(blocks.shape[0])]
    current = [0]

    def keep(j: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            recorded[current[0]][j] = output

        return hook

    handles = [layer.register_forward_hook(keep(j)) for j, layer in enumerate(layers)]
    finals = []
    try:
        for i in progress(range(blocks.shape[0]), desc="importance (kl): reference pass"):
            current[0] = i
            finals.append(_output(model, blocks[i]))
    finally:
        for handle in handles:
            handle.remove()
    return recorded, finals


@contextlib.contextmanager
def _replaying(layers: list[nn.Module], outputs: list[Any], upto: int) -> Iterator[None]:
    """Layers before ``upto`` return their recorded outputs instead of computing them (masking layer ``upto`` or
    later cannot change them), which halves the cost of scoring by masking."""
    for j in range(upto):
        layers[j].forward = (lambda out: lambda *args, **kwargs: out)(outputs[j])
    try:
        yield
    finally:
        for j in range(upto):
            del layers[j].forward


def _output(model: nn.Module, block: torch.Tensor) -> torch.Tensor:
    """The reference output of one block ``[T]``: log-probabilities ``[T, V]`` (causal LMs, left on the model's
    device: every masked unit compares with them) or the pooled embedding ``[1, H]``."""
    if is_causal_lm(model):
        return logprobs(model, block)
    return pooled_embeddings(base_of(model), block.unsqueeze(0))


def _distance(model: nn.Module, block: torch.Tensor, reference: torch.Tensor) -> float:
    """Summed KL(reference || model) over the tokens of one block (causal LMs), or 1 - the pooled cosine."""
    if is_causal_lm(model):
        return score_lm(model, block.unsqueeze(0), [reference]).kl
    return float(1.0 - cosine(reference, pooled_embeddings(base_of(model), block.unsqueeze(0))).sum())


def _divergence(
    model: nn.Module, blocks: torch.Tensor, reference: list[torch.Tensor], causal: bool,
    layers: list[nn.Module], recorded: list[list[Any]], upto: int,
) -> float:
    """Mean KL(reference || model) per token (causal LMs) or mean 1 - cosine of the pooled embeddings."""
    total = 0.0
    for i, ref in enumerate(reference):
        with _replaying(layers, recorded[i], upto):
            total += _distance(model, blocks[i], ref)
    return total / (blocks.numel() if causal else len(reference))


@torch.no_grad()
def kl_scores(
    family: str, model: nn.Module, blocks: torch.Tensor, units: list[list[tuple[list[int], list[int]]]],
    *, layers: bool, reference: list[torch.Tensor] | None = None,
) -> tuple[Scores, list[torch.Tensor]]:
    """Divergence from the unmasked outputs when each head unit (and each layer) is masked; returns the reference.

    ``reference`` (the outputs of the model before pruning, on ``blocks``) is computed when not given, so iterative
    pruning keeps measuring against the unpruned model.
    """
    causal = is_causal_lm(model)
    modules = list(layer_list(family, model))
    with frozen_weights(model):
        # Recorded before the gates go on, so the replayed outputs are the raw ones the gate hooks expect.
        recorded, finals = _record(model, modules, blocks)
        reference = finals if reference is None else reference
        gates = Gates(family, model, layers=layers)
        heads = []
        # One masked pass over the blocks per head unit (and per layer): minutes on a real model.
        bar = progress_bar(desc="importance (kl)", total=sum(map(len, units)) + (len(units) if layers else 0))
        with gates, bar:
            for i, layer_units in enumerate(units):
                scores = []
                for q_heads, _ in layer_units:
                    gates.head[i][q_heads] = 0.0
                    scores.append(_divergence(model, blocks, reference, causal, modules, recorded, i))
                    gates.head[i][q_heads] = 1.0
                    bar.update()
                heads.append(torch.tensor(scores))
            layer_scores = None
            if layers:
                values = []
                for i in range(len(units)):
                    gates.layer[i] = 0.0
                    values.append(_divergence(model, blocks, reference, causal, modules, recorded, i))
                    gates.layer[i] = 1.0
                    bar.update()
                layer_scores = torch.tensor(values)
    return Scores(heads=heads, layers=layer_scores), reference
