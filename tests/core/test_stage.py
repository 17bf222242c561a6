"""The Stage contract: a fourth method defined in this file runs through compress, save, card and reload; the built-in
stages' checks run before anything is measured; their search spaces draw valid configs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Literal

import pytest
import torch
from conftest import SMALL_EVAL, make_tiny, outputs
from huggingface_hub import ModelCard

import hfsqueeze
from hfsqueeze import api
from hfsqueeze.core.config import StageConfig
from hfsqueeze.core.search import OPTIONAL, Param, sample
from hfsqueeze.core.stage import Description, ModelInfo, SideFiles, Stage
from hfsqueeze.registry import available_stages, get_stage, register_stage, stages, unregister_stage

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MARKER = "cast.json"


@dataclasses.dataclass
class CastConfig(StageConfig):
    """Cast every floating weight to a 16-bit dtype."""

    method = "cast"

    dtype: Literal["bf16", "fp16"] = dataclasses.field(default="bf16", metadata={"help": "bf16 or fp16"})


class CastStage(Stage):
    """An example fourth method: everything it needs lives in this class, nothing else in hfsqueeze changes."""

    name, config_cls = "cast", CastConfig

    def validate(self, config, info):
        if info.quantized:
            raise hfsqueeze.RecipeError(f"cast needs an unquantized model; this one is {info.quantized}")
        return None

    def apply(self, model, config, ctx):
        model.to(DTYPES[config.dtype])
        return {"format": f"cast-{config.dtype}", "dtype": config.dtype}

    def describe(self, config, details):
        return Description(label=f"cast to {config.get('dtype')}", short=details.get("format", "cast"),
                           tags=["cast", str(config.get("dtype"))], relation="quantized")

    def on_save(self, model, directory):
        if next(model.parameters()).dtype in DTYPES.values():
            (directory / MARKER).write_text(json.dumps({"dtype": str(next(model.parameters()).dtype)}))

    def load(self, path, config, **kwargs):
        from pathlib import Path

        from transformers import AutoModelForCausalLM

        marker = Path(path) / MARKER
        if not marker.is_file():
            return None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=json.loads(marker.read_text())["dtype"][6:])
        model.loaded_by_cast_stage = True
        return model

    def load_snippet(self, config, path_or_repo):
        return (f'from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained('
                f'"{path_or_repo}", dtype="auto")  # cast by the example stage\n')

    def search_space(self, info=None):
        return {"dtype": Param.choice("bf16", "fp16")}


@pytest.fixture
def cast_stage():
    stage = register_stage(CastStage())
    try:
        yield stage
    finally:
        unregister_stage("cast")


def test_a_stage_defined_outside_the_package_runs_through_compress_save_card_and_reload(cast_stage, tiny_tokenizer,
                                                                                      tmp_path):
    assert "cast" in available_stages() and get_stage("cast") is cast_stage
    model = make_tiny("llama")
    report = model.compress({"stages": [{"method": "cast", "dtype": "bf16"}], "evaluation": SMALL_EVAL},
                            tokenizer=tiny_tokenizer)
    assert report.stages[0].details == {"format": "cast-bf16", "dtype": "bf16"}
    assert next(model.parameters()).dtype == torch.bfloat16
    assert report.final.disk_bytes < report.baseline.disk_bytes * 0.6
    assert "1. cast (cast-bf16)" in report.to_markdown()

    out = hfsqueeze.save_compressed(model, tmp_path / "cast", tokenizer=tiny_tokenizer)
    assert (out / MARKER).is_file()  # the stage's save hook ran
    assert hfsqueeze.Recipe.load(out / "recipe.yaml").stages[0].to_dict() == {"method": "cast", "dtype": "bf16"}
    card = ModelCard.load(out / "README.md")
    assert {"cast", "bf16"} <= set(card.data.tags)
    assert "cast to bf16" in card.text and "# LlamaForCausalLM (cast-bf16, hfsqueeze)" in card.text
    assert "# cast by the example stage" in card.text  # the stage's load snippet
    again = hfsqueeze.load_compressed(out)
    assert getattr(again, "loaded_by_cast_stage", False)  # the stage's loader ran
    ids = torch.randint(5, 400, (1, 12))
    # bf16 rounding of the rotary buffer, rebuilt in fp32 on reload, moves logits by ~1e-2 (see NOTES)
    torch.testing.assert_close(outputs(again, ids), outputs(model, ids), atol=5e-2, rtol=0)


def test_an_unregistered_stage_is_an_unknown_method(cast_stage):
    unregister_stage("cast")
    try:
        with pytest.raises(hfsqueeze.RecipeError, match="unknown method 'cast'"):
            hfsqueeze.Recipe.load({"stages": [{"method": "cast"}]})
    finally:
        register_stage(cast_stage)
    with pytest.raises(ValueError, match="already registered"):
        register_stage(CastStage())


@pytest.mark.parametrize("recipe, error, match", [
    ([{"method": "quantize", "bits": 8}, {"method": "prune", "heads": 0.25}], hfsqueeze.RecipeError,
     r"^stage 2 \(prune\): cannot follow a bitsandbytes int8 stage.*put the prune stage before quantize"),
    ([{"method": "quantize", "bits": 4}, {"method": "quantize", "bits": 8}], hfsqueeze.RecipeError,
     r"^stage 2 \(quantize\): bits: 8 cannot follow a bitsandbytes nf4 stage"),
    ([{"method": "prune", "layers": 1, "protect_layers": [0]}, {"method": "prune", "heads": 1, "protect_layers": [1]}],
     hfsqueeze.RecipeError, r"^stage 2 \(prune\): key 'protect_layers': layer 1 does not exist; the model has 1 "),
    ([{"method": "quantize", "bits": 8}, {"method": "distill", "adapter": "none"}], hfsqueeze.RecipeError,
     r"^stage 2 \(distill\): adapter: none cannot train after a bitsandbytes int8 stage"),
])
def test_every_stage_is_checked_before_the_baseline_is_measured(recipe, error, match, monkeypatch, tiny_tokenizer):
    def measured(*args, **kwargs):
        raise AssertionError("the baseline was measured before the recipe was checked against the model")

    monkeypatch.setattr(api, "measure_baseline", measured)
    monkeypatch.setattr(api, "measure", measured)
    model = make_tiny("llama")
    with pytest.raises(error, match=match):
        hfsqueeze.compress(model, {"stages": recipe, "evaluation": SMALL_EVAL}, tokenizer=tiny_tokenizer)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # nothing ran


def test_an_unsupported_model_is_refused_before_the_baseline(monkeypatch):
    import transformers as tf

    monkeypatch.setattr(api, "measure", lambda *a, **k: pytest.fail("measured before the check"))
    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                           num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(hfsqueeze.UnsupportedModelError, match=r"^stage 1 \(prune\): model type 'opt'"):
        hfsqueeze.compress(model, {"stages": [{"method": "prune", "heads": 0.5}]}, measure_quality=False)


def test_model_info_follows_the_stages():
    model = make_tiny("llama")
    info = ModelInfo.of(model)
    assert (info.model_type, info.architecture, info.num_layers, info.quantized) == \
        ("llama", "LlamaForCausalLM", 2, None)
    after = get_stage("quantize").validate(get_stage("quantize").config_cls(bits=4), info)
    assert after.quantized == "bitsandbytes"
    pruned = get_stage("prune").validate(get_stage("prune").config_cls(layers=1), info)
    assert pruned.num_layers == 1


@pytest.mark.parametrize("name", ["quantize", "prune", "distill"])
def test_search_spaces_draw_configs_the_stage_accepts(name):
    stage = get_stage(name)
    space = stage.search_space(ModelInfo.of(make_tiny("llama")))
    assert space and all(isinstance(p, Param) for p in space.values())
    rng = random.Random(0)
    built = 0
    for _ in range(200):
        point = sample(space, rng)
        point.pop(OPTIONAL, None)
        try:
            config = stage.config_cls.from_dict(point)
        except hfsqueeze.RecipeError as exc:
            # Prune refuses the one all-zero point; leaving the stage out is how a tuner turns pruning off.
            assert name == "prune" and "nothing to prune" in str(exc), (point, exc)
            continue
        built += 1
        assert config.to_dict()["method"] == name
    assert built >= 190


def test_search_spaces_are_the_real_ones():
    quantize = get_stage("quantize").search_space()
    assert set(quantize["bits"].choices) == {16, 8, 4}
    assert quantize["threshold"].when == {"bits": (8,)} and quantize["quant_type"].when == {"bits": (4,)}
    assert {"double_quant", "compute_dtype", "skip_modules"} <= set(quantize)
    prune = get_stage("prune").search_space()
    assert {"heads", "ffn", "layers", "importance"} <= set(prune)
    assert set(prune["importance"].choices) == {"gradient", "activation", "magnitude", "kl"}
    distill = get_stage("distill").search_space()
    assert distill[OPTIONAL].choices == (True, False) and "training_args.max_steps" in distill
    point = sample({"bits": Param.choice(8), "threshold": Param.range(1.0, 2.0, when={"bits": (4,)})},
                   random.Random(0))
    assert point == {"bits": 8}  # a conditional param is only drawn when its condition holds


# ---- side files: what a stage writes beside the weights (distill's kept LoRA adapter is one) ---------------------
SIDECAR = "sidecar.safetensors"


@dataclasses.dataclass
class SidecarConfig(StageConfig):
    """No options: the stage only has save/load hooks."""

    method = "sidecar"


class SidecarStage(Stage):
    """Extra weights kept beside the model's own (``model.sidecar``), saved as a side file the way distill keeps its
    LoRA adapter: generic code learns of them only from these hooks."""

    name, config_cls = "sidecar", SidecarConfig

    def has_side_files(self, model):
        return hasattr(model, "sidecar")

    def on_save(self, model, directory):
        if self.has_side_files(model):
            from safetensors.torch import save_file

            save_file({"sidecar": model.sidecar}, str(directory / SIDECAR))

    def side_files(self):
        return SideFiles(key="sidecar", name="sidecar", names=(SIDECAR,), checksums=("sha256",), lost="its extras")

    def side_file_checksums(self, directory):
        return {"sha256": hashlib.sha256((directory / SIDECAR).read_bytes()).hexdigest()}

    def hub_file(self, path, repo_id):
        return f"sidecar for {repo_id}".encode()


@pytest.fixture
def sidecar_stage():
    stage = register_stage(SidecarStage())
    try:
        yield stage
    finally:
        unregister_stage("sidecar")


def test_side_files_are_sized_saved_recorded_checked_and_pushed_through_the_stage_hooks(sidecar_stage, tmp_path):
    from hfsqueeze.artifact.parity import PARITY_FILE, _parity_metadata
    from hfsqueeze.evaluation.measure import disk_bytes
    from hfsqueeze.hub import _hub_content

    model = make_tiny("llama")
    model.sidecar = torch.zeros(4096)
    assert disk_bytes(model, stages()) - disk_bytes(model) > 4 * 4096  # the side file counts as weights

    out = hfsqueeze.save_compressed(model, tmp_path / "side")
    assert (out / SIDECAR).is_file()
    recorded = _parity_metadata(out / PARITY_FILE)["sidecar"]
    assert recorded == {"sha256": hashlib.sha256((out / SIDECAR).read_bytes()).hexdigest()}
    hfsqueeze.load_compressed(out)  # unchanged: loads
    assert _hub_content(out / SIDECAR, SIDECAR, "me/side") == b"sidecar for me/side"
    assert _hub_content(out / "config.json", "config.json", "me/side") == str(out / "config.json")

    from safetensors.torch import save_file

    save_file({"sidecar": torch.ones(4096)}, str(out / SIDECAR))
    with pytest.raises(hfsqueeze.ArtifactError, match=r"the sidecar's sidecar.safetensors differs from the one "):
        hfsqueeze.load_compressed(out)
    (out / SIDECAR).unlink()
    with pytest.raises(hfsqueeze.ArtifactError, match=r"records a sidecar, but sidecar.safetensors is missing"):
        hfsqueeze.load_compressed(out)


def test_a_model_without_side_files_refuses_one_added_later(sidecar_stage, tmp_path):
    from safetensors.torch import save_file

    out = hfsqueeze.save_compressed(make_tiny("llama"), tmp_path / "plain")
    save_file({"sidecar": torch.ones(8)}, str(out / SIDECAR))  # added after saving
    with pytest.raises(hfsqueeze.ArtifactError, match=r"was saved without a sidecar, but holds sidecar.safetensors"):
        hfsqueeze.load_compressed(out)


def test_prune_scores_copies_of_one_model_once_through_the_context_cache(monkeypatch):
    """`CompressionContext.scores_cache` (what every tune trial passes): the prune stage keeps its first step's
    scores there under its own name, so copies of one original are scored once per importance setting."""
    import copy

    from hfsqueeze.core.context import CompressionContext
    from hfsqueeze.methods.prune import apply as prune_apply

    calls = []
    real = prune_apply.compute_scores
    monkeypatch.setattr(prune_apply, "compute_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    stage, original, cache = get_stage("prune"), make_tiny("llama"), {}
    for heads in (0.25, 0.5):
        stage.apply(copy.deepcopy(original), stage.config_cls(heads=heads, importance="magnitude"),
                    CompressionContext(scores_cache=cache))
    assert len(calls) == 1 and list(cache) == ["prune"]
    stage.apply(copy.deepcopy(original), stage.config_cls(heads=0.25, importance="magnitude"), CompressionContext())
    assert len(calls) == 2  # no cache: scored again
