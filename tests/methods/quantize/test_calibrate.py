"""Calibrated quantization (GPTQ onto bnb's grids, folded SmoothQuant scales) that reloads as stock bitsandbytes."""

import pytest
import torch
from conftest import SMALL_EVAL, make_tiny, outputs, reload_outputs_in_fresh_process

import hfsqueeze
from hfsqueeze import RecipeError
from hfsqueeze.core.context import CompressionContext
from hfsqueeze.core.data import builtin_text, load_texts, token_blocks
from hfsqueeze.methods.quantize import QuantizeConfig, gptq
from hfsqueeze.methods.quantize.layerwise import LayerwiseRunner
from hfsqueeze.methods.quantize.smooth import smooth_layer, smoothed_inputs
from quantkit import tiny_gemma3

IDS = torch.randint(5, 400, (1, 24), generator=torch.Generator().manual_seed(1))


def _model(kind):
    return tiny_gemma3() if kind == "gemma3" else make_tiny(kind)


def _randomize_norms(model):
    """Norm weights that are not all ones (freshly built models have ones), so folding is really exercised."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(p + 0.3 * torch.rand(p.shape, generator=g))


def _correlated_inputs(width=128, tokens=2048):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g) @ torch.randn(width, width, generator=g) * 0.3
    x[:, :4] *= 8  # a few outlier channels, as real activations have
    return x


# ---- the grids: bnb's own bytes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(96, 128), (50, 70)])  # 50 x 70: blocks of 64 run across rows
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_to_nearest_writes_bnb_own_bytes(shape, quant_type):
    """With no Hessian and max-abs scales the codes, packing and QuantState are bnb's own, byte for byte; with double
    quantization the nested statistics are bnb's own too."""
    import bitsandbytes as bnb

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q = gptq.quantize_4bit(w, None, quant_type=quant_type, double_quant=False)
    packed, state = bnb.functional.quantize_4bit(w, quant_type=quant_type, blocksize=gptq.BLOCKSIZE)
    assert torch.equal(gptq.pack_4bit(q.codes), packed) and torch.equal(q.scales, state.absmax)
    mine = gptq.quant_state_4bit(q, w.shape, w.dtype, quant_type)
    assert torch.equal(bnb.functional.dequantize_4bit(packed, mine), q.dequantized)

    dq = gptq.quantize_4bit(w, None, quant_type=quant_type, double_quant=True)
    _, nested = bnb.functional.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    mine = gptq.quant_state_4bit(dq, w.shape, w.dtype, quant_type)
    assert torch.equal(mine.absmax, nested.absmax) and torch.equal(mine.state2.absmax, nested.state2.absmax)
    assert float(mine.offset) == float(nested.offset)
    # The sweep rounds against the absmax the kernel really uses (after double quantization):
    assert torch.equal(bnb.functional.dequantize_4bit(gptq.pack_4bit(dq.codes), mine), dq.dequantized)


@pytest.mark.parametrize("fmt", [{"bits": 4, "quant_type": "nf4"}, {"bits": 4, "quant_type": "fp4"},
                                 {"bits": 4, "double_quant": True}, {"bits": 8}])
def test_gptq_halves_the_output_error_of_round_to_nearest(fmt):
    x = _correlated_inputs()
    h = x.t() @ x
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    config = QuantizeConfig(**fmt, calibration="gptq")
    q = gptq.quantize_weight(w, h, config)
    rtn = gptq.output_error(w, gptq.stock_dequantized(w, config), h)
    assert gptq.output_error(w, q.dequantized, h) < 0.7 * rtn


def test_prepared_hessian_factors_the_dampened_inverse_in_sweep_order():
    """The sweep's factor ``U`` (upper triangular, ``U^T U = (P^T H P + damp)^-1``) for any column order ``P``: a dead
    column (no token reached it) gets a unit diagonal, and the caller's Hessian is not written into."""
    x = _correlated_inputs(width=64, tokens=512)
    x[:, 5] = 0
    h = (x.t() @ x).double()
    before = h.clone()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    u, dead = gptq.prepared_hessian(h, perm, 0.01)
    assert torch.equal(h, before)
    assert torch.equal(dead, torch.diagonal(h)[perm] == 0) and int(dead.sum()) == 1
    want = h[perm][:, perm]
    want[dead, dead] = 1.0
    want.diagonal().add_(0.01 * float(want.diagonal().mean()))
    inverse = torch.linalg.inv(want)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u.double().t() @ u.double(), inverse, rtol=1e-4, atol=1e-5 * float(inverse.abs().max()))


def test_token_error_is_the_output_error_of_the_tokens_hessian():
    """The held-out check's ``|(W - Q) X^T|^2`` equals ``trace((W - Q) H (W - Q)^T)`` with ``H = X^T X``."""
    x = _correlated_inputs(width=128, tokens=300)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    q = gptq.quantize_weight(w, None, QuantizeConfig(bits=4))
    assert gptq.token_error(w, q.dequantized, x) == pytest.approx(
        gptq.output_error(w, q.dequantized, x.double().t() @ x.double()), rel=1e-4)


# ---- the layer-wise engine ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gemma3", "bert"])
def test_layer_by_layer_reproduces_the_model(kind):
    """Layer-by-layer outputs from the captured inputs and per-layer keyword arguments are the model's own hidden
    states (Gemma-3: sliding-window and full layers get different masks)."""
    model = _model(kind)
    blocks = torch.randint(5, 400, (3, 32), generator=torch.Generator().manual_seed(2))
    runner = LayerwiseRunner(model, blocks)
    for _ in runner.layers():
        pass
    base = model.base_model
    for i in range(3):
        with torch.no_grad():
            want = base(input_ids=blocks[i:i + 1]).last_hidden_state
        got = runner.inputs[i] if kind == "bert" else base.norm(runner.inputs[i])  # decoders end with a norm
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- folded scales -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "llama_mha", "gemma3"])
def test_folded_scales_keep_the_fp32_outputs(kind):
    model = _model(kind)
    _randomize_norms(model)
    before = outputs(model, IDS)
    blocks = torch.randint(5, 400, (2, 32), generator=torch.Generator().manual_seed(2))
    runner = LayerwiseRunner(model, blocks)
    changed = 0
    for index, layer in runner.layers():
        maxima = {}
        hooks = [layer.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: maxima.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).abs().amax(0)))
            for n in smoothed_inputs(model.config.model_type)]
        runner.run(index, layer)
        for h in hooks:
            h.remove()
        weights = {k: v.clone() for k, v in layer.state_dict().items()}
        assert smooth_layer(layer, model.config.model_type, maxima, 0.5) == 4
        changed += sum(not torch.equal(v, layer.state_dict()[k]) for k, v in weights.items())
    assert changed >= 8 * model.config.num_hidden_layers  # norms, q/k/v, gate/up, v/o, up/down all moved
    torch.testing.assert_close(outputs(model, IDS), before, atol=1e-4, rtol=1e-4)


# ---- the stage: compress, save, stock reload ------------------------------------------------------------------------
def _compress(model, stage, tok, **extra):
    return model.compress({"stages": [{"method": "quantize", **stage}],
                           "evaluation": {**SMALL_EVAL, "latency": False}}, tokenizer=tok, **extra)


CASES = [("llama", {"bits": 4, "calibration": "gptq", "tokens": 1024}),
         ("llama", {"bits": 4, "quant_type": "fp4", "double_quant": True, "calibration": "gptq", "tokens": 1024}),
         ("llama", {"bits": 8, "calibration": "gptq", "smooth": True, "tokens": 1024}),
         ("gemma3", {"bits": 4, "double_quant": True, "calibration": "gptq", "smooth": True, "tokens": 1024})]


@pytest.mark.parametrize("kind, stage", CASES, ids=["nf4", "fp4-dq", "int8-smooth", "gemma3-nf4-dq-smooth"])
def test_calibrated_artifact_reloads_with_stock_transformers(kind, stage, tiny_tokenizer, tmp_path):
    """Saved, then loaded with plain from_pretrained in a fresh process that never imports hfsqueeze: the logits of
    the in-memory calibrated model."""
    model = _model(kind)
    _randomize_norms(model)
    report = _compress(model, stage, tiny_tokenizer)
    details = report.stages[0].details
    assert details["calibration"]["tokens"] >= 64 and details["calibration"]["held_out_tokens"] > 0
    live = outputs(model, IDS)
    out = hfsqueeze.save_compressed(model, tmp_path / "artifact", tokenizer=tiny_tokenizer)
    reloaded = reload_outputs_in_fresh_process(out, IDS)
    tol = 2e-2 if stage["bits"] == 4 else 1e-5  # a fresh process may take bnb's bf16 4-bit CPU kernel
    torch.testing.assert_close(reloaded, live, atol=tol, rtol=0)
    card = (out / "README.md").read_text()
    assert "calibrated with" in card and "tokens" in card


def _kl(ref_logits, logits):
    p = torch.log_softmax(ref_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("fmt", [{"bits": 4}, {"bits": 8, "threshold": 0.0}])
def test_calibrated_beats_round_to_nearest_on_held_out_text(fmt, tiny_tokenizer):
    held_out = token_blocks(tiny_tokenizer, [builtin_text("eval")], max_tokens=1024, seq_len=128)
    reference = make_tiny("llama")
    with torch.no_grad():
        want = reference(input_ids=held_out).logits
    errors = {}
    for calibration in ("rtn", "gptq"):
        model = make_tiny("llama")
        stage = {**fmt, "calibration": calibration, **({"tokens": 2048} if calibration == "gptq" else {})}
        _compress(model, stage, tiny_tokenizer)
        with torch.no_grad():
            errors[calibration] = _kl(want, model(input_ids=held_out).logits)
    assert errors["gptq"] < errors["rtn"], errors


def test_a_module_gptq_makes_worse_keeps_round_to_nearest(monkeypatch, tiny_tokenizer):
    """The held-out check: where GPTQ's weight has the larger output error, bnb's own rounding is kept and said."""
    from hfsqueeze.methods.quantize import calibrate

    real = gptq.quantize_weights

    def spoiled(weights, hessian, config):
        out = real(weights, hessian, config)
        for weight, q in zip(weights, out):
            if weight.shape[0] == 128:  # gate/up projections: make them bad on purpose
                q.dequantized = q.dequantized + 10.0
        return out

    monkeypatch.setattr(calibrate, "quantize_weights", spoiled)
    model = make_tiny("llama")
    report = _compress(model, {"bits": 4, "calibration": "gptq", "tokens": 1024}, tiny_tokenizer)
    kept = report.stages[0].details["calibration"]["kept_rtn"]
    # every spoiled module is caught (a tiny model's honest GPTQ may lose somewhere else too)
    assert {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")} <= set(kept), kept
    assert any("kept round-to-nearest" in w for w in report.warnings)


# ---- the recipe options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, words", [
    ({"bits": 16, "calibration": "gptq"}, "only applies to bits: 8 or 4"),
    ({"bits": 4, "damp": 0.1}, "only applies with calibration: gptq"),
    ({"bits": 4, "calibration": "gptq", "damp": 0}, "must be a number in (0, 1]"),
    ({"bits": 4, "calibration": "gptq", "tokens": 8}, "must be an integer >= 64"),
    ({"bits": 8, "alpha": 0.5}, "only applies with smooth: true"),
    ({"bits": 8, "smooth": True, "alpha": 2}, "must be a number in [0, 1]"),
    ({"bits": 8, "calibration": "gptq", "absmax_search": True}, "only applies to bits: 4"),
    ({"bits": 4, "calibration": "awq"}, "calibration"),
])
def test_calibration_options_are_validated_in_one_line(stage, words):
    with pytest.raises(RecipeError) as err:
        hfsqueeze.Recipe.load({"stages": [{"method": "quantize", **stage}]})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_plain_recipes_keep_their_canonical_form():
    assert "calibration" not in QuantizeConfig(bits=4).to_dict()
    full = QuantizeConfig(bits=4, calibration="gptq").to_dict()
    assert full["damp"] == 0.01 and full["tokens"] == 4096 and full["absmax_search"] is True


def test_smooth_refuses_an_encoder_before_anything_runs(tiny_tokenizer):
    with pytest.raises(hfsqueeze.UnsupportedModelError, match="smooth: true does not support model type 'bert'"):
        _compress(make_tiny("bert"), {"bits": 8, "smooth": True}, tiny_tokenizer)


def test_too_few_calibration_tokens_for_gptq_is_one_line(tiny_tokenizer):
    ctx = CompressionContext(tokenizer=tiny_tokenizer)
    from hfsqueeze.methods.quantize.calibrate import apply_calibrated

    with pytest.raises(RecipeError, match="fewer than the widest quantized input"):
        apply_calibrated(make_tiny("llama"), QuantizeConfig(bits=4, calibration="gptq", tokens=64), ctx)


def test_tune_keeps_its_uniform_baselines_with_calibration_in_the_config():
    """The quantize config has calibration keys; tune's baselines (stock round-to-nearest recipes) must still be points
    of its space (a key the space draws but a baseline lacks drops every baseline)."""
    from hfsqueeze.tune.space import enqueue_params, load_space
    from hfsqueeze.tune.study import UNIFORM, baseline_points

    space = load_space("quantize")
    points = baseline_points(space)
    assert {kind for kind, _ in points} >= {f"uniform:{name}" for name, _ in UNIFORM}
    assert all(enqueue_params(space, point) is not None for _, point in points)


@pytest.mark.parametrize("name", ["nf4-calibrated", "int8-calibrated"])
def test_builtin_calibrated_recipes_reload_with_stock_transformers(name, tiny_tokenizer, tmp_path):
    """The built-in recipes, run as shipped (bf16 rest, calibration on), give an artifact that plain from_pretrained
    loads in a process that never imports hfsqueeze, with the live model's logits."""
    model = make_tiny("llama")
    report = model.compress(name, tokenizer=tiny_tokenizer,
                            overrides=["evaluation.max_tokens=256", "evaluation.seq_len=128",
                                       "evaluation.latency=false", "evaluation.text=builtin"])
    assert report.stages[-1].details["calibration"]["tokens"] >= 3072
    live = outputs(model, IDS)
    out = hfsqueeze.save_compressed(model, tmp_path / name, tokenizer=tiny_tokenizer)
    torch.testing.assert_close(reload_outputs_in_fresh_process(out, IDS), live,
                               atol=2e-2 if "nf4" in name else 1e-5, rtol=0)


def test_a_layer_that_calibration_makes_worse_keeps_round_to_nearest(monkeypatch, tiny_tokenizer):
    """The layer-level held-out check runs the real bnb kernels: scales that wreck the int8 weights (exact in fp32,
    ruinous once quantized) are caught and the plain round-to-nearest layer takes the layer's place."""
    from hfsqueeze.methods.quantize import calibrate

    real = calibrate.smooth_layer

    def wild(layer, model_type, maxima, alpha):
        g = torch.Generator().manual_seed(0)
        spread = {k: v * torch.logspace(0, 6, v.numel())[torch.randperm(v.numel(), generator=g)]
                  for k, v in maxima.items()}
        return real(layer, model_type, spread, 1.0)

    monkeypatch.setattr(calibrate, "smooth_layer", wild)
    model = make_tiny("llama")
    rtn = make_tiny("llama")
    _compress(rtn, {"bits": 8}, tiny_tokenizer)
    report = _compress(model, {"bits": 8, "smooth": True, "tokens": 1024}, tiny_tokenizer)
    assert report.stages[0].details["calibration"]["kept_rtn_layers"] == [0, 1]
    assert any("layers kept plain round-to-nearest" in w for w in report.warnings)
    torch.testing.assert_close(outputs(model, IDS), outputs(rtn, IDS))  # exactly the stock int8 model


# ---- speed: one sweep per shared input ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [{"bits": 4, "quant_type": "nf4", "double_quant": True}, {"bits": 8}])
def test_a_group_sweep_equals_each_weight_alone(fmt):
    """Weights that read one input (q/k/v) are swept together: each gets what GPTQ gives it alone."""
    from hfsqueeze.methods.quantize import QuantizeConfig

    torch.manual_seed(0)
    x = torch.randn(512, 64)
    h = (x.t() @ x).double()
    weights = [torch.randn(rows, 64) for rows in (64, 32, 32)]
    config = QuantizeConfig(**fmt, calibration="gptq")
    together = gptq.quantize_weights(weights, h, config)
    for weight, q in zip(weights, together):
        alone = gptq.quantize_weight(weight, h, config)
        assert torch.equal(alone.codes, q.codes)
        assert torch.equal(alone.scales, q.scales)
        assert torch.allclose(alone.dequantized, q.dequantized)


def test_modules_reading_one_input_share_one_hessian_and_sweep(monkeypatch, tiny_tokenizer):
    """q/k/v and gate/up of a Llama layer each read one tensor: 4 Hessians and 4 sweeps per layer, not 7."""
    from hfsqueeze.methods.quantize import calibrate

    real, calls = gptq.quantize_weights, []

    def counted(weights, hessian, config):
        calls.append(len(weights))
        return real(weights, hessian, config)

    monkeypatch.setattr(calibrate, "quantize_weights", counted)
    _compress(make_tiny("llama"), {"bits": 4, "calibration": "gptq", "tokens": 1024}, tiny_tokenizer)
    assert sorted(calls) == sorted([3, 1, 2, 1] * 2), calls


# ---- the default calibration text -----------------------------------------------------------------------------------
def test_default_calibration_mixes_generated_and_pydoc_train_splits(tiny_tokenizer):
    """By default GPTQ calibrates on builtin:generated and pydoc alternately (train splits only: their eval splits
    stay unseen); a source the user gives is used alone."""
    from hfsqueeze.builtin.texts import generated_texts
    from hfsqueeze.methods.quantize import calibrate

    blocks = calibrate._calibration_blocks(CompressionContext(tokenizer=tiny_tokenizer), 2048, 512)
    generated = token_blocks(tiny_tokenizer, generated_texts("train"), max_tokens=1024, seq_len=512)
    pydoc = token_blocks(tiny_tokenizer, [builtin_text("train")], max_tokens=1024, seq_len=512)
    assert torch.equal(blocks, torch.stack([generated[0], pydoc[0], generated[1], pydoc[1]]))
    for held in (token_blocks(tiny_tokenizer, generated_texts("eval"), max_tokens=512, seq_len=512),
                 token_blocks(tiny_tokenizer, [builtin_text("eval")], max_tokens=512, seq_len=512)):
        assert not any(torch.equal(held[0], b) for b in blocks)
    given = calibrate._calibration_blocks(CompressionContext(tokenizer=tiny_tokenizer, calibration="builtin:bible"),
                                          1024, 512)
    assert torch.equal(given, token_blocks(tiny_tokenizer, load_texts("builtin:bible", split="train"),
                                           max_tokens=1024, seq_len=512))


def test_alpha_auto_chooses_per_layer_on_the_real_kernels_and_beats_round_to_nearest(tiny_tokenizer):
    """``alpha: auto`` with outlier activation channels (what LLM.int8 suffers from, with its outlier path off):
    each fold group of each layer gets a strength from the grid or none, folding wins somewhere, and held-out KL drops
    below plain round-to-nearest."""
    import copy

    from hfsqueeze.methods.quantize.config import ALPHA_GRID

    base = make_tiny("llama")
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "layernorm" in name:
                p[:4] *= 25.0  # four outlier channels into every q/k/v and gate/up input
    held_out = token_blocks(tiny_tokenizer, [builtin_text("eval")], max_tokens=1024, seq_len=128)
    with torch.no_grad():
        want = base(input_ids=held_out).logits
    errors = {}
    for name, extra in (("rtn", {}), ("auto", {"smooth": True, "alpha": "auto", "tokens": 1024})):
        model = copy.deepcopy(base)
        report = _compress(model, {"bits": 8, "threshold": 0.0, **extra}, tiny_tokenizer)
        with torch.no_grad():
            errors[name] = _kl(want, model(input_ids=held_out).logits)
        if name == "auto":
            alphas = report.stages[0].details["calibration"]["alphas"]
            picks = [a for layer in alphas for a in layer.values()]
            assert len(alphas) == 2 and all(len(layer) == 4 for layer in alphas)  # q/k/v, gate/up, v->o, up->down
            assert set(picks) <= {None, *ALPHA_GRID} and any(a is not None for a in picks)
            from hfsqueeze.methods.quantize.calibrate import calibration_phrase

            assert "alpha searched per layer and group" in calibration_phrase(report.stages[0].details["calibration"])
    assert errors["auto"] < errors["rtn"], errors
