"""The prune stage: surgery exactness, importance scores, scopes, config errors, save/reload in a fresh process."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from conftest import make_tiny
from hfsqueeze.core.context import CompressionContext
from hfsqueeze.core.errors import RecipeError, UnsupportedModelError
from hfsqueeze.methods.prune import PruneConfig, PruneWarning, apply_prune, drop_layers, prune_ffn, prune_heads
from hfsqueeze.methods.prune.importance import Gates, head_units
from hfsqueeze.methods.prune.surgery import (
    PLAN_KEY,
    attention_shape,
    family_of,
    ffn_input_projs,
    ffn_output_proj,
    ffn_width,
    head_output_proj,
    is_conv1d,
    layer_list,
)

ATOL = 2e-5


def make_model(kind: str, **overrides):
    """The conftest tiny models plus config-built Qwen2 (GQA, q/k/v bias) and Gemma3 (sliding + full layers)."""
    import transformers as tf

    if kind == "qwen2":
        torch.manual_seed(0)
        cfg = tf.Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, **overrides)
        return tf.Qwen2ForCausalLM(cfg).eval()
    if kind == "gemma3":
        torch.manual_seed(0)
        cfg = tf.Gemma3TextConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  max_position_embeddings=512, **overrides)
        return tf.Gemma3ForCausalLM(cfg).eval()
    if kind == "roberta":
        torch.manual_seed(0)
        cfg = tf.RobertaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=520, **overrides)
        return tf.RobertaModel(cfg).eval()
    layers = overrides.pop("num_hidden_layers", None)
    if layers is None:
        return make_tiny(kind, **overrides)
    torch.manual_seed(0)
    if kind in ("llama", "llama_mha"):
        cfg = tf.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2 if kind == "llama" else 4, head_dim=16,
                             max_position_embeddings=512, tie_word_embeddings=True, **overrides)
        return tf.LlamaForCausalLM(cfg).eval()
    cfg = tf.BertConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=512, **overrides)
    return tf.BertModel(cfg).eval()


IDS = torch.randint(5, 400, (2, 24), generator=torch.Generator().manual_seed(1))


def run(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def ctx_for(tokenizer) -> CompressionContext:
    return CompressionContext(tokenizer=tokenizer)


def small(**kw) -> PruneConfig:
    kw.setdefault("calibration_tokens", 256)
    kw.setdefault("kl_tokens", 128)
    kw.setdefault("seq_len", 64)
    return PruneConfig(**kw)


def zero_heads(family, layer, heads):
    """Zero the output-projection columns of ``heads``: their output is exactly zero from then on."""
    proj = head_output_proj(family, layer)
    hd = attention_shape(family, layer)[2]
    with torch.no_grad():
        for h in heads:
            if is_conv1d(proj):
                proj.weight[h * hd:(h + 1) * hd, :] = 0
            else:
                proj.weight[:, h * hd:(h + 1) * hd] = 0


def zero_neurons(family, layer, neurons):
    proj = ffn_output_proj(family, layer)
    with torch.no_grad():
        for j in neurons:
            if is_conv1d(proj):
                proj.weight[j, :] = 0
            else:
                proj.weight[:, j] = 0


# ---- surgery exactness -------------------------------------------------------------------------------------------
HEAD_CASES = [
    ("llama", "groups"), ("llama", "slots"), ("llama_mha", "groups"), ("qwen2", "groups"), ("qwen2", "slots"),
    ("gemma3", "groups"), ("gemma3", "slots"), ("gpt2", "groups"), ("bert", "groups"), ("roberta", "groups"),
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind,mode", HEAD_CASES)
def test_removing_zeroed_heads_keeps_outputs(kind, mode, attn):
    model = make_model(kind)
    model.set_attn_implementation(attn)
    family = family_of(model.config)
    layers = layer_list(family, model)
    plans = []
    for i, layer in enumerate(layers):
        n_q, n_kv, _ = attention_shape(family, layer)
        units = head_units(n_q, n_kv, mode)
        gone = units[i % len(units)]  # a different unit in each layer: per-layer sizes differ afterwards
        zero_heads(family, layer, gone[0])
        keep_q = [h for h in range(n_q) if h not in gone[0]]
        keep_kv = [h for h in range(n_kv) if h not in gone[1]]
        plans.append((keep_q, keep_kv))
    before = run(model)
    for layer, (keep_q, keep_kv) in zip(layers, plans):
        prune_heads(family, layer, keep_q, keep_kv)
    after = run(model)
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)
    for layer, (keep_q, keep_kv) in zip(layers, plans):
        n_q, n_kv, _ = attention_shape(family, layer)
        assert (n_q, n_kv if family == "llama" else n_q) == (len(keep_q), len(keep_kv) if family == "llama" else n_q)
        if family == "llama":
            assert layer.self_attn.num_key_value_groups == n_q // n_kv
    if family != "bert":
        model.generate(IDS[:1, :5], max_new_tokens=3, do_sample=False)  # the KV cache follows the new shapes


def test_gqa_modes_remove_what_they_say():
    model = make_tiny("llama")  # 4 query heads, 2 key/value heads
    layer = model.model.layers[0]
    prune_heads("llama", layer, [0, 1], [0])  # groups: the second k/v head with its two query heads
    assert attention_shape("llama", layer)[:2] == (2, 1)
    layer = model.model.layers[1]
    prune_heads("llama", layer, [0, 2], [0, 1])  # slots: slot 1 of both groups, every k/v head stays
    assert attention_shape("llama", layer)[:2] == (2, 2) and layer.self_attn.num_key_value_groups == 1
    with pytest.raises(ValueError, match="same number of query heads"):
        prune_heads("llama", make_tiny("llama").model.layers[0], [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="being removed"):
        prune_heads("llama", make_tiny("llama").model.layers[0], [0, 2], [0])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "gpt2", "bert"])
def test_removing_zeroed_neurons_keeps_outputs(kind):
    model = make_model(kind)
    family = family_of(model.config)
    plans = []
    for i, layer in enumerate(layer_list(family, model)):
        width = ffn_width(family, layer)
        gone = set(range(i, width, 3 + i))
        zero_neurons(family, layer, gone)
        plans.append([j for j in range(width) if j not in gone])
    before = run(model)
    for layer, keep in zip(layer_list(family, model), plans):
        prune_ffn(family, layer, keep)
    torch.testing.assert_close(run(model), before, atol=ATOL, rtol=0)
    assert [ffn_width(family, layer) for layer in layer_list(family, model)] == [len(k) for k in plans]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3", "gpt2"])
def test_dropping_an_identity_layer_keeps_outputs_and_generation(kind):
    model = make_model(kind)
    family = family_of(model.config)
    layer = layer_list(family, model)[0]
    # A layer whose attention and FFN add nothing is the identity on the (pre-norm) residual stream.
    zero_heads(family, layer, range(attention_shape(family, layer)[0]))
    zero_neurons(family, layer, range(ffn_width(family, layer)))
    with torch.no_grad():
        for proj in (head_output_proj(family, layer), ffn_output_proj(family, layer)):
            if proj.bias is not None:
                proj.bias.zero_()
    n = len(layer_list(family, model))
    before = run(model)
    gen_before = model.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False)
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    drop_layers(family, model, list(range(1, n)))
    torch.testing.assert_close(run(model), before, atol=ATOL, rtol=0)
    assert torch.equal(model.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False), gen_before)
    assert model.config.num_hidden_layers == n - 1 == len(layer_list(family, model))
    attn = layer_list(family, model)[0].self_attn if family == "llama" else layer_list(family, model)[0].attn
    assert attn.layer_idx == 0
    if layer_types:
        assert model.config.layer_types == layer_types[1:]


# ---- the stage: pruned model == masked model ---------------------------------------------------------------------
def kept_rows(pruned: torch.Tensor, original: torch.Tensor, block: int) -> list[int]:
    """Indices of the ``block``-row blocks of ``original`` that survive, in order, in ``pruned``."""
    blocks = original.reshape(-1, block, original.shape[-1])
    out = []
    for b in pruned.reshape(-1, block, pruned.shape[-1]):
        out.append(next(i for i, o in enumerate(blocks) if torch.equal(o, b)))
    return out


@pytest.mark.parametrize("kind,mode", [("llama", "slots"), ("llama_mha", "groups"), ("gpt2", "groups"),
                                       ("bert", "groups")])
def test_pruned_model_equals_masked_model(kind, mode, tiny_tokenizer):
    model = make_model(kind)
    original = copy.deepcopy(model)
    family = family_of(model.config)
    details = apply_prune(model, small(heads=0.25, ffn=0.3, gqa_mode=mode, importance="gradient"),
                          ctx_for(tiny_tokenizer))
    assert details["parameters_removed"] > 0
    with Gates(family, original) as gates:
        for i, (orig_layer, layer) in enumerate(zip(layer_list(family, original), layer_list(family, model))):
            for h in details["heads_removed_per_layer"][i]:
                gates.head[i][h] = 0.0
            rows_now = ffn_input_projs(family, layer)[0]
            rows_then = ffn_input_projs(family, orig_layer)[0]
            w_now = rows_now.weight.t() if is_conv1d(rows_now) else rows_now.weight
            w_then = rows_then.weight.t() if is_conv1d(rows_then) else rows_then.weight
            kept = set(kept_rows(w_now, w_then, 1))
            for j in range(ffn_width(family, orig_layer)):
                if j not in kept:
                    gates.ffn[i][j] = 0.0
        masked = run(original)
    torch.testing.assert_close(run(model), masked, atol=ATOL, rtol=0)


def test_layer_removal_equals_skipping_the_layer(tiny_tokenizer):
    model = make_model("bert", num_hidden_layers=3)
    original = copy.deepcopy(model)
    details = apply_prune(model, small(layers=1, importance="magnitude"), ctx_for(tiny_tokenizer))
    (dropped,) = details["importance_scores"][0]["layers_dropped"]
    assert details["layers_kept"] == [i for i in range(3) if i != dropped]
    assert model.config.num_hidden_layers == 2
    with Gates("bert", original, layers=True) as gates:
        gates.layer[dropped] = 0.0
        torch.testing.assert_close(run(model), run(original), atol=ATOL, rtol=0)


# ---- importance ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("importance", ["gradient", "activation", "magnitude", "kl"])
@pytest.mark.parametrize("kind", ["llama_mha", "bert"])
def test_a_dead_head_scores_lowest(kind, importance, tiny_tokenizer):
    from hfsqueeze.methods.prune import compute_scores

    model = make_model(kind)
    family = family_of(model.config)
    layer = layer_list(family, model)[0]
    zero_heads(family, layer, [2])
    if importance == "magnitude":  # weights only: the head's query rows must go too
        proj = layer.self_attn.q_proj if family == "llama" else layer.attention.self.query
        with torch.no_grad():
            proj.weight[32:48] = 0
    scores, units = compute_scores(family, model, small(heads=0.25, importance=importance),
                                   ctx_for(tiny_tokenizer), layers=True)
    assert [u[0] for u in units[0]] == [[0], [1], [2], [3]]
    layer_scores = scores.heads[0]
    assert int(layer_scores.argmin()) == 2
    if importance != "magnitude":
        assert float(layer_scores[2]) < 1e-6 < float(layer_scores.max())
    assert scores.layers is not None and scores.layers.shape == (2,)
    assert [s.numel() for s in scores.ffn] == [128, 128]


# ---- scopes and options ------------------------------------------------------------------------------------------
def test_layerwise_is_uniform_and_reloads_stock(tiny_tokenizer):
    model = make_model("llama_mha", num_hidden_layers=3)
    details = apply_prune(model, small(heads=0.5, ffn=0.25, scope="layerwise", importance="activation"),
                          ctx_for(tiny_tokenizer))
    assert details["heads_kept_per_layer"] == [2, 2, 2]
    assert details["ffn_width_per_layer"] == [96, 96, 96]
    assert details["reload"] == "stock" and not hasattr(model.config, PLAN_KEY)
    assert (model.config.num_attention_heads, model.config.intermediate_size, model.config.head_dim) == (2, 96, 16)


def test_global_honours_min_heads_and_protect_layers(tiny_tokenizer):
    model = make_model("llama_mha", num_hidden_layers=4)
    config = small(heads=0.75, ffn=0.25, scope="global", importance="magnitude", min_heads_per_layer=2,
                   protect_layers=[0, -1])
    with pytest.warns(PruneWarning, match="removed 4 of the 12 heads"):
        details = apply_prune(model, config, ctx_for(tiny_tokenizer))
    assert details["heads_kept_per_layer"] == [4, 2, 2, 4]
    assert details["ffn_width_per_layer"][0] == details["ffn_width_per_layer"][3] == 128
    assert sum(details["ffn_width_per_layer"][1:3]) == 256 - 128  # a quarter of all 512 neurons, from layers 1-2
    assert details["reload"] == "trust_remote_code"
    assert model.config.hfsqueeze_pruning["num_attention_heads"] == [4, 2, 2, 4]


def test_iterative_steps_reach_the_target(tiny_tokenizer):
    model = make_model("llama_mha", num_hidden_layers=4)
    details = apply_prune(model, small(heads=0.5, layers=1, steps=2, importance="gradient"),
                          ctx_for(tiny_tokenizer))
    assert len(details["importance_scores"]) == 2
    assert len(details["layers_kept"]) == 3
    # Half the heads of the three surviving layers, removed over two steps.
    assert sum(details["heads_kept_per_layer"]) == 6
    step1, step2 = (sum(map(len, h["head_units"])) for h in (d for d in details["importance_scores"]))
    assert step2 < step1 == 16  # step 2 re-scored the pruned model
    run(model)


def test_layerwise_rounding_to_nothing_fails_before_scoring(tiny_tokenizer, monkeypatch):
    import hfsqueeze.methods.prune.apply as prune_apply

    monkeypatch.setattr(prune_apply, "compute_scores", lambda *a, **k: pytest.fail("scored before the error"))
    model = make_tiny("llama")  # two key/value groups per layer: 10% rounds to none
    with pytest.raises(RecipeError, match="key 'heads': 0.1 removes no head: .* rounds to 0"):
        apply_prune(model, small(heads=0.1, ffn=0.1, scope="layerwise", importance="gradient"),
                    ctx_for(tiny_tokenizer))
    assert attention_shape("llama", model.model.layers[0])[:2] == (4, 2)


# ---- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data,match", [
    ({"heads": 1.5}, r"key 'heads': got 1.5; a fraction must be in \[0, 1\)"),
    ({"ffn": -3}, r"key 'ffn': got -3; a count must be >= 0"),
    ({}, "nothing to prune"),
    ({"heads": 0.2, "scope": "local"}, r"key 'scope': got 'local'; allowed: 'global' \| 'layerwise'"),
    ({"heads": 0.2, "importance": "taylor"}, "allowed: 'gradient' | 'activation' | 'magnitude' | 'kl'"),
    ({"heads": 0.2, "min_heads_per_layer": 0}, "min_heads_per_layer"),
    ({"heads": 0.2, "steps": 0}, "steps"),
    ({"heads": 0.2, "head": 1},
     r"unknown key 'head' \(did you mean 'heads'\?\); allowed keys: calibration, calibration_tokens"),
])
def test_bad_config_is_one_clear_line(data, match):
    with pytest.raises(RecipeError, match=match) as info:
        PruneConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_config_round_trip():
    config = PruneConfig(heads=0.25, ffn=100, layers=1, scope="layerwise", importance="kl", gqa_mode="slots",
                         protect_layers=[0, -1], steps=2, normalize=True)
    data = config.to_dict()
    assert data["method"] == "prune" and data["ffn"] == 100 and isinstance(data["ffn"], int)
    data.pop("method")
    assert PruneConfig.from_dict(data) == config


def test_unsupported_model_names_the_supported_types():
    import transformers as tf

    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                           num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(UnsupportedModelError, match=r"model type 'opt' \(OPTForCausalLM\) is not supported; "
                       r"supported model types: llama, mistral, qwen2, qwen3, gemma, gemma3_text, gpt2, bert"):
        apply_prune(model, small(heads=0.25, importance="magnitude"), ctx_for(None))


def test_bad_layer_requests(tiny_tokenizer):
    with pytest.raises(RecipeError, match="layer 5 does not exist; the model has 2 layers"):
        apply_prune(make_tiny("llama"), small(heads=0.5, protect_layers=[5]), ctx_for(tiny_tokenizer))
    with pytest.raises(RecipeError, match="key 'layers': got 2 .* but only 1 of 2 layers can go"):
        apply_prune(make_tiny("llama"), small(layers=2, importance="magnitude"), ctx_for(tiny_tokenizer))
    with pytest.raises(RecipeError, match="needs a tokenizer"):
        apply_prune(make_tiny("llama"), small(heads=0.5), ctx_for(None))


def test_quantized_model_is_refused():
    pytest.importorskip("bitsandbytes")
    from hfsqueeze.core.context import CompressionContext as Ctx
    from hfsqueeze.methods.quantize import QuantizeConfig, apply_quantize

    model = make_tiny("llama")
    apply_quantize(model, QuantizeConfig(bits=8), Ctx())
    with pytest.raises(RecipeError, match="put the prune stage before quantize"):
        apply_prune(model, small(heads=0.5, importance="magnitude"), Ctx())


# ---- save and reload in a fresh process ----------------------------------------------------------------------------
LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["hfsqueeze"] = None  # prove the artifacts load without hfsqueeze
    import torch, transformers
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        cls = getattr(transformers, job["auto"])
        kwargs = {"trust_remote_code": True} if job["remote"] else {}
        model = cls.from_pretrained(job["path"], **kwargs).eval()
        ids = torch.tensor(job["ids"])
        with torch.no_grad():
            out = model(input_ids=ids)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        torch.save(out, job["out"])
        print(job["path"], type(model).__name__)
""")


def test_save_reload_in_fresh_process(tmp_path, tiny_tokenizer):
    from hfsqueeze import compress, load_compressed, save_compressed

    evaluation = {"max_tokens": 64, "seq_len": 32, "latency": False, "disk_size": False, "per_stage": False}
    cases = {
        "llama_uniform": (make_tiny("llama_mha"), {"heads": 0.5, "scope": "layerwise", "importance": "magnitude"},
                          "AutoModelForCausalLM", False),
        "llama_global": (make_tiny("llama"), {"heads": 2, "ffn": 0.3, "layers": 0, "gqa_mode": "slots",
                                              "importance": "activation"}, "AutoModelForCausalLM", True),
        "gemma3_uniform": (make_model("gemma3"), {"heads": 0.5, "layers": 1, "scope": "layerwise",
                                                  "importance": "kl"}, "AutoModelForCausalLM", False),
        "gpt2": (make_tiny("gpt2"), {"heads": 0.25, "ffn": 0.25, "layers": 1, "importance": "gradient"},
                 "AutoModelForCausalLM", True),
        "bert": (make_model("bert", num_hidden_layers=3), {"heads": 0.25, "ffn": 0.25, "layers": 1,
                                                         "importance": "kl"}, "AutoModel", True),
        "llama_int8": (make_tiny("llama_mha"), {"heads": 0.25, "ffn": 0.25, "importance": "gradient"},
                       "AutoModelForCausalLM", True),
    }
    jobs, expected = [], {}
    for name, (model, stage, auto, remote) in cases.items():
        stages = [{"method": "prune", "calibration_tokens": 256, "seq_len": 64, "kl_tokens": 128, **stage}]
        if name == "llama_int8":
            stages.append({"method": "quantize", "bits": 8})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PruneWarning)
            report = compress(model, {"stages": stages, "evaluation": evaluation}, tokenizer=tiny_tokenizer)
        details = report.stages[0].details
        assert details["reload"] == ("trust_remote_code" if remote else "stock"), name
        out = save_compressed(model, tmp_path / name, tokenizer=tiny_tokenizer)
        assert (out / "modeling_hfsqueeze_pruned.py").is_file() == remote
        expected[name] = run(model)
        jobs.append({"path": str(out), "auto": auto, "remote": remote, "ids": IDS.tolist(),
                     "out": str(tmp_path / f"{name}.pt")})
        if name in ("llama_global", "bert"):
            again = load_compressed(out)
            torch.testing.assert_close(run(again), expected[name], atol=ATOL, rtol=0)
            assert "trust_remote_code=True" in (out / "README.md").read_text()
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in cases:
        reloaded = torch.load(tmp_path / f"{name}.pt")
        torch.testing.assert_close(reloaded, expected[name], atol=ATOL, rtol=0, msg=name)
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hfsqueeze_pruned.PrunedGPT2LMHeadModel"
    assert config["n_layer"] == 1 and len(config[PLAN_KEY]["num_attention_heads"]) == 1


@pytest.mark.slow
def test_smollm2_prune_heads_and_ffn_save_reload(smollm2_dir, tmp_path):
    """Real SmolLM2-135M (9 query heads, 3 key/value heads per layer): prune, check quality, save, reload."""
    from hfsqueeze import load_compressed, save_compressed
    from hfsqueeze.core.data import builtin_text, token_blocks
    from hfsqueeze.models import load_model

    model, tok = load_model(smollm2_dir)
    ids = token_blocks(tok, [builtin_text("eval")], max_tokens=512, seq_len=512)

    def nll(m):
        with torch.no_grad():
            return float(m(input_ids=ids, labels=ids).loss)

    before = nll(model)
    config = PruneConfig(heads=0.1, ffn=0.1, scope="global", importance="gradient", calibration_tokens=1024)
    details = apply_prune(model, config, CompressionContext(tokenizer=tok))
    assert details["heads_before"] == 270 and details["heads_after"] == 243  # 9 whole key/value groups
    assert sum(details["ffn_width_per_layer"]) == 30 * 1536 - round(0.1 * 30 * 1536)
    assert details["reload"] == "trust_remote_code"
    after = nll(model)
    # Measured: nll 2.31 -> 2.83 (no retraining); a wrong ranking or broken surgery lands far higher.
    assert after < before + 0.8, (before, after)
    out = save_compressed(model, tmp_path / "smollm2-pruned", tokenizer=tok)
    reloaded = load_compressed(out)
    assert type(reloaded).__name__ == "PrunedLlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids[:, :64]).logits, model(input_ids=ids[:, :64]).logits,
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_kl_scores_with_replayed_layers_match_full_forwards(kind):
    import torch.nn.functional as F

    from hfsqueeze.methods.prune.importance import kl_scores

    model = make_model(kind)
    family = family_of(model.config)
    units = [head_units(*attention_shape(family, layer)[:2], "groups") for layer in layer_list(family, model)]
    blocks = IDS[:, :12]
    scores, _ = kl_scores(family, model, blocks, units, layers=True)

    def divergence(masked, ref):
        if family == "llama":
            return float(F.kl_div(masked.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                  reduction="none").sum(-1).mean())
        return float(1 - F.cosine_similarity(ref.mean(1), masked.mean(1), dim=-1).mean())

    def per_block():
        return [run(model, blocks[i:i + 1]) for i in range(blocks.shape[0])]

    reference = per_block()
    with Gates(family, model, layers=True) as gates:
        for i, layer_units in enumerate(units):
            for u, (q_heads, _) in enumerate(layer_units):
                gates.head[i][q_heads] = 0.0
                want = sum(divergence(m, r) for m, r in zip(per_block(), reference)) / len(reference)
                gates.head[i][q_heads] = 1.0
                assert float(scores.heads[i][u]) == pytest.approx(want, rel=1e-4, abs=1e-7)
            gates.layer[i] = 0.0
            want = sum(divergence(m, r) for m, r in zip(per_block(), reference)) / len(reference)
            gates.layer[i] = 1.0
            assert float(scores.layers[i]) == pytest.approx(want, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("normalize,removed", [(False, [[0], []]), (True, [[], [0]])])
def test_global_ranking_with_and_without_layer_normalization(normalize, removed):
    from hfsqueeze.methods.prune.importance import Scores

    model = make_tiny("llama_mha")
    scores = Scores(heads=[torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 40.0, 50.0, 60.0])],
                    ffn=[torch.ones(128), torch.ones(128)])
    details = apply_prune(model, small(heads=1, importance="gradient", normalize=normalize), ctx_for(None),
                          scores=scores)
    assert details["heads_removed_per_layer"] == removed


# ---- reconstruction -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias,conv1d", [(False, False), (True, False), (True, True)])
def test_reconstruct_is_the_least_squares_fit_and_a_large_ridge_is_the_plain_cut(bias, conv1d):
    from transformers.pytorch_utils import Conv1D

    from hfsqueeze.methods.prune.reconstruct import reconstruct

    torch.manual_seed(0)
    x = torch.randn(2000, 12) @ torch.randn(12, 12) + 0.5  # correlated inputs with a mean: the bias can help
    module = Conv1D(5, 12) if conv1d else torch.nn.Linear(12, 5, bias=bias)
    torch.nn.init.normal_(module.weight)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    target = module(x).detach()
    xa = torch.cat([x, torch.ones(len(x), 1)], 1) if bias else x
    moments = (xa.double().t() @ xa.double()) / len(x)
    plain = copy.deepcopy(module)

    fitted = copy.deepcopy(module)
    error = reconstruct(fitted, keep, moments, ridge=0.0)
    inputs = torch.cat([x[:, keep], torch.ones(len(x), 1)], 1) if bias else x[:, keep]
    best = torch.linalg.lstsq(inputs.double(), target.double()).solution.t()  # [out, kept (+ bias)]
    w = fitted.weight.t() if conv1d else fitted.weight
    torch.testing.assert_close(w[:, keep].double(), best[:, :len(keep)], atol=1e-4, rtol=1e-4)
    if bias:
        torch.testing.assert_close(fitted.bias.double(), best[:, -1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        cut = x[:, keep] @ (plain.weight.t() if conv1d else plain.weight)[:, keep].t() + (plain.bias if bias else 0)
    cut_error = float(((cut - target) ** 2).sum() / (target ** 2).sum())
    assert error < 0.9 * cut_error
    assert error == pytest.approx(float(((inputs.double() @ best.t() - target.double()) ** 2).sum()
                                        / (target.double() ** 2).sum()), rel=1e-3)

    untouched = copy.deepcopy(module)
    reconstruct(untouched, keep, moments, ridge=1e9)
    torch.testing.assert_close(untouched.weight, plain.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,mode,layers", [("llama", "slots", 0), ("llama_mha", "groups", 1), ("gpt2", "groups", 0),
                                              ("bert", "groups", 1), ("qwen2", "groups", 0), ("gemma3", "slots", 1)])
def test_reconstruction_keeps_the_pruned_model_closer_to_the_original(kind, mode, layers, tiny_tokenizer, tmp_path):
    import hfsqueeze

    original = make_model(kind, num_hidden_layers=3) if layers and kind != "gemma3" else make_model(kind)
    plain, fitted = copy.deepcopy(original), copy.deepcopy(original)
    config = dict(heads=0.5, ffn=0.5, layers=layers, gqa_mode=mode, importance="magnitude", calibration_tokens=2048)
    apply_prune(plain, small(**config), ctx_for(tiny_tokenizer))
    details = apply_prune(fitted, small(**config, reconstruct=True, reconstruct_ridge=0.01), ctx_for(tiny_tokenizer))
    assert details["heads_removed_per_layer"] == apply_prune(copy.deepcopy(original), small(**config),
                                                             ctx_for(tiny_tokenizer))["heads_removed_per_layer"]
    assert 0 < details["importance_scores"][0]["reconstruction_error"] < 1
    ctx = ctx_for(tiny_tokenizer)
    ids = ctx.calibration_blocks(max_tokens=512, seq_len=64, source=None)
    ref = run(original, ids)
    assert ((run(fitted, ids) - ref) ** 2).mean() < ((run(plain, ids) - ref) ** 2).mean()
    hfsqueeze.save_compressed(fitted, tmp_path / "out", tokenizer=tiny_tokenizer)
    torch.testing.assert_close(run(hfsqueeze.load_compressed(tmp_path / "out"), ids), run(fitted, ids), atol=ATOL,
                               rtol=0)


def test_reconstruct_without_a_tokenizer_is_one_line():
    import hfsqueeze

    with pytest.raises(RecipeError, match=r"calibration data \(.*reconstruct\) needs a tokenizer") as info:
        hfsqueeze.compress(make_model("llama"), {"stages": [
            {"method": "prune", "heads": 0.5, "importance": "magnitude", "reconstruct": True}]})
    assert "\n" not in str(info.value)
