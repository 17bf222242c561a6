"""compress(), the report, save_compressed and the CLI, on tiny models."""

import json

import pytest
import torch
import yaml
from conftest import SMALL_EVAL, outputs

import hfsqueeze
from hfsqueeze import ArtifactError, CompressionReport, Recipe, RecipeError
from hfsqueeze.cli import main
from hfsqueeze.core.config import StageConfig
from hfsqueeze.registry import register_stage, unregister_stage

INT8 = {"name": "int8", "stages": [{"method": "quantize", "bits": 8}], "evaluation": SMALL_EVAL}


def test_compress_is_attached_and_delegates(tiny_llama, tiny_tokenizer):
    from transformers import PreTrainedModel

    assert getattr(PreTrainedModel.compress, "_hfsqueeze", False)
    report = tiny_llama.compress(INT8, tokenizer=tiny_tokenizer)
    assert isinstance(report, CompressionReport)
    assert tiny_llama.is_loaded_in_8bit and tiny_llama.hfsqueeze_report is report


def test_report_contents_and_formats(tiny_llama, tiny_tokenizer):
    # latency: true, since `auto` leaves bitsandbytes on a CPU untimed (test_output checks that default)
    report = hfsqueeze.compress(tiny_llama, Recipe.load(INT8), tokenizer=tiny_tokenizer,
                                overrides=["evaluation.latency=true"])
    b, f = report.baseline, report.final
    assert b.kl_divergence == 0.0 and b.top1_agreement == 1.0
    assert f.kl_divergence > 0 and 0 < f.top1_agreement <= 1
    assert f.perplexity > 1 and b.perplexity > 1 and f.eval_tokens == b.eval_tokens == 256
    assert f.prefill_ms_per_token > 0 and f.decode_ms_per_token > 0
    assert report.stages[0].details["quantized_modules"] == 14  # q k v o gate up down x 2 layers
    again = CompressionReport.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()
    md = report.to_markdown()
    assert "| Perplexity |" in md and "KL to original" in md and "1. quantize (int8)" in md
    assert report.environment["threads"] == torch.get_num_threads()


def test_encoder_reports_embedding_cosine(tiny_bert, tiny_tokenizer):
    report = tiny_bert.compress({**INT8, "stages": [{"method": "quantize", "bits": 4}]}, tokenizer=tiny_tokenizer)
    assert report.baseline.perplexity is None and report.final.decode_ms_per_token is None
    assert 0.5 < report.final.embedding_cosine < 1.0
    assert "Embedding cosine" in report.to_markdown()


def test_per_stage_measurements(tiny_llama, tiny_tokenizer):
    recipe = {"stages": [{"method": "quantize", "bits": 16}, {"method": "quantize", "bits": 8}],
              "evaluation": {**SMALL_EVAL, "latency": False}}
    report = tiny_llama.compress(recipe, tokenizer=tiny_tokenizer)
    assert [s.metrics is not None for s in report.stages] == [True, True]
    assert report.stages[0].metrics.prefill_ms_per_token is None
    assert report.stages[1].metrics.footprint_bytes < report.stages[0].metrics.footprint_bytes


def test_without_tokenizer_only_sizes(tiny_llama):
    report = tiny_llama.compress(INT8)
    assert report.final.perplexity is None and report.final.disk_bytes > 0


def test_save_writes_everything_and_refuses_overwrite(tiny_llama, tiny_tokenizer, tmp_path):
    tiny_llama.compress(INT8, tokenizer=tiny_tokenizer)
    out = hfsqueeze.save_compressed(tiny_llama, tmp_path / "a", tokenizer=tiny_tokenizer)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "report.json"} <= names
    assert Recipe.load(out / "recipe.yaml").to_dict() == Recipe.load(INT8).to_dict()
    saved = CompressionReport.load(out)
    assert saved.final.disk_bytes == (out / "model.safetensors").stat().st_size
    with pytest.raises(ArtifactError, match="is not empty; pass overwrite=True"):
        hfsqueeze.save_compressed(tiny_llama, out)
    hfsqueeze.save_compressed(tiny_llama, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


class _BrokenConfig(StageConfig):
    method = "broken-save"


class _BrokenSave(hfsqueeze.Stage):
    """A stage whose save hook fails half-way, like a full disk."""

    name, config_cls = "broken-save", _BrokenConfig

    def on_save(self, model, directory):
        (directory / "half-written.bin").write_bytes(b"x")
        raise RuntimeError("disk full")


def test_failed_save_leaves_nothing_behind(tiny_llama, tmp_path):
    register_stage(_BrokenSave())
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            hfsqueeze.save_compressed(tiny_llama, tmp_path / "a")
    finally:
        unregister_stage("broken-save")
    assert list(tmp_path.iterdir()) == []


def test_load_compressed_round_trip(tiny_llama, tiny_tokenizer, tmp_path):
    tiny_llama.compress({**INT8, "stages": [{"method": "quantize", "bits": 4}]}, tokenizer=tiny_tokenizer)
    ids = torch.randint(5, 400, (1, 12))
    out = hfsqueeze.save_compressed(tiny_llama, tmp_path / "a")
    again = hfsqueeze.load_compressed(out)
    torch.testing.assert_close(outputs(again, ids), outputs(tiny_llama, ids))


# ---- CLI --------------------------------------------------------------------------------------------------------


def _set_small():
    return [x for k, v in SMALL_EVAL.items() for x in ("--set", f"evaluation.{k}={v}")]


def test_cli_compress_save_and_eval(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compress", "--model", str(model_dir), "--recipe", "nf4", "--output", str(out), *_set_small()])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1. quantize (nf4)" in printed and "saved to" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["command"].startswith("hfsqueeze ") and report["model"]["name_or_path"] == str(model_dir)
    assert main(["eval", str(out), "--base", str(model_dir), "--set", "evaluation.latency=false"]) == 0
    table = capsys.readouterr().out
    assert "| Perplexity |" in table and "re-measured" in table and "KL to original" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["validate", "int8", "--set", "quantize.bits=3"], "key 'bits': got 3; allowed: 4 | 8 | 16"),
        (["compress", "--recipe", "nope.yaml"], "recipe not found"),
        (["compress", "--model", "/does/not/exist", "--recipe", "int8"], "model path not found"),
        (["eval", "/does/not/exist"], "is not a saved model directory"),
        (["compress", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) if "--bogus" in argv else _nullcontext() as info:
        rc = main(argv)
    rc = info.value.code if "--bogus" in argv else rc
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_non_empty_output_before_any_work(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compress", "--model", str(model_dir), "--output", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_validate_prints_canonical_yaml(capsys):
    assert main(["validate", "nf4-dq"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["stages"] == [{"method": "quantize", "bits": 4, "quant_type": "nf4", "double_quant": True,
                               "compute_dtype": "float32", "skip_modules": ["lm_head"]}]


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_reloaded_4bit_artifact_can_be_saved_again(tiny_llama, tiny_tokenizer, tmp_path):
    """Transformers 5.24 cannot reverse its Bnb4bitDeserialize conversion on save; save_compressed works around it."""
    tiny_llama.compress({**INT8, "stages": [{"method": "quantize", "bits": 4, "double_quant": True}]},
                        tokenizer=tiny_tokenizer)
    ids = torch.randint(5, 400, (1, 12))
    first = hfsqueeze.load_compressed(hfsqueeze.save_compressed(tiny_llama, tmp_path / "a"))
    expected = outputs(first, ids)  # inference before the second save: the repack guard must hold
    second = hfsqueeze.load_compressed(hfsqueeze.save_compressed(first, tmp_path / "b"))
    torch.testing.assert_close(outputs(second, ids), expected)


def test_a_hook_only_stage_in_a_recipe_is_refused_before_any_work(tiny_llama):
    register_stage(_BrokenSave())
    try:
        with pytest.raises(RecipeError, match=r"stage 1: method 'broken-save' registers save/load hooks only.*"
                                              r"allowed: .*quantize"):
            tiny_llama.compress({"stages": [{"method": "broken-save"}]}, measure_quality=False)
    finally:
        unregister_stage("broken-save")


def test_reference_outputs_are_16bit_and_kl_matches_fp32(tiny_llama, tiny_tokenizer):
    # The reference log-probs are `max_tokens x vocab`: kept in float16 (half of fp32), and the KL / top-1 computed
    # from them agree with the same computation on fp32 log-probs.
    import copy

    torch.manual_seed(0)
    from hfsqueeze.core.quality import REFERENCE_DTYPE, logprobs
    from hfsqueeze.evaluation.measure import measure, reference_outputs
    from hfsqueeze.methods.quantize import QuantizeConfig, apply_quantize
    from hfsqueeze.recipe import EvaluationConfig

    evaluation = EvaluationConfig(**SMALL_EVAL, latency=False, disk_size=False)
    reference = reference_outputs(tiny_llama, tiny_tokenizer, evaluation)
    vocab = tiny_llama.config.vocab_size
    assert REFERENCE_DTYPE.itemsize == 2
    assert [(lp.dtype, tuple(lp.shape)) for lp in reference.outputs] == [(REFERENCE_DTYPE, (128, vocab))] * 2
    with torch.no_grad():
        fp32 = [logprobs(tiny_llama.eval(), block) for block in reference.inputs]
    compressed = copy.deepcopy(tiny_llama)
    with torch.no_grad():  # a visible change first (the tiny model's outputs are nearly uniform), then nf4
        for param in compressed.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    apply_quantize(compressed, QuantizeConfig(bits=4))
    metrics = measure(compressed, tiny_tokenizer, evaluation, reference)
    with torch.no_grad():
        new = [logprobs(compressed.eval(), block) for block in reference.inputs]
    kl = sum((r.exp() * (r - n)).sum().item() for r, n in zip(fp32, new)) / reference.inputs.numel()
    top1 = sum((r.argmax(-1) == n.argmax(-1)).sum().item() for r, n in zip(fp32, new)) / reference.inputs.numel()
    assert metrics.kl_divergence > 0
    # fp16 moves this KL by ~5e-5 of itself; a bf16 reference would move it by ~8e-4.
    assert metrics.kl_divergence == pytest.approx(kl, rel=2e-4)
    assert metrics.top1_agreement == pytest.approx(top1, abs=1 / reference.inputs.numel())
