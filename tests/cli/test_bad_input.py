"""Bad input, through the CLI: one line on stderr (``hfsqueeze: error: ...``), exit 2, nothing written, and the error
comes before any expensive work (the baseline measurement, scoring, training)."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from conftest import SMALL_EVAL, make_tiny

import hfsqueeze
from hfsqueeze import ArtifactError, RecipeError
from hfsqueeze.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QUICK = [x for k, v in {**SMALL_EVAL, "latency": False}.items() for x in ("--set", f"evaluation.{k}={v}")]


def _boom(*args, **kwargs):
    raise AssertionError("expensive work started before the error")


@pytest.fixture
def no_work(monkeypatch):
    """Any baseline measurement or stage scoring fails the test: the error under test must come first."""
    import hfsqueeze.api as api
    import hfsqueeze.methods.prune.apply as prune_apply

    monkeypatch.setattr(api, "measure_baseline", _boom)
    monkeypatch.setattr(api, "measure", _boom)
    monkeypatch.setattr(prune_apply, "compute_scores", _boom)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def cli_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, assert exit 2 with exactly one clean error line containing ``needles``; return the line."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("hfsqueeze: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def save_model(model, path: Path, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def llama_dir(tmp_path, tiny_tokenizer):
    return save_model(make_tiny("llama"), tmp_path / "llama", tiny_tokenizer)


def _edit_config(path: Path, **changes) -> None:
    data = json.loads((path / "config.json").read_text())
    data.update(changes)
    (path / "config.json").write_text(json.dumps(data))


# ---- --model: a directory that cannot load --------------------------------------------------------------------------
def _no_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _truncated(d: Path) -> None:
    weights = d / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)


def _wrong_shape(d: Path) -> None:
    _edit_config(d, intermediate_size=96)


def _corrupt_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama",')


def _unknown_type(d: Path) -> None:
    _edit_config(d, model_type="notamodel")


@pytest.mark.parametrize("damage, needles", [
    (_no_weights, ["has no weight files"]),
    (_truncated, ["model.safetensors is damaged or truncated"]),
    (_wrong_shape, ["do not have the shapes config.json describes: model.layers.{0, 1}.mlp.down_proj.weight is "
                    "[64, 128] in the weights but [64, 96] by the config"]),
    (_corrupt_config, ["config.json is not valid JSON", "line 1"]),
    (_unknown_type, ["model type 'notamodel' in config.json is not known to Transformers"]),
])
def test_model_dir_that_cannot_load_is_one_line(damage, needles, llama_dir, tmp_path, capsys, no_work):
    damage(llama_dir)
    before = _files(tmp_path)
    line = cli_error(capsys, ["compress", "--model", llama_dir, "--output", tmp_path / "out"], *needles)
    assert "reachable on the Hub" not in line
    assert _files(tmp_path) == before


def test_missing_local_model_is_not_found_without_asking_the_hub(tmp_path, capsys, monkeypatch):
    import transformers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _boom)  # no Hub lookup (and no retries)
    cli_error(capsys, ["compress", "--model", "./nosuchdir"], "model path not found: ./nosuchdir")
    cli_error(capsys, ["compress", "--model", "../nosuchdir/model"], "model path not found")


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_custom_code_is_refused_without_a_prompt_and_names_the_flag(command, llama_dir, tmp_path, capsys,
                                                                    monkeypatch, no_work):
    marker = tmp_path / "custom-code-ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as MyConfig\n"
    (llama_dir / "configuration_my.py").write_text(code)
    (llama_dir / "modeling_my.py").write_text(code + "from transformers import LlamaForCausalLM as MyModel\n")
    _edit_config(llama_dir, model_type="mycustom", architectures=["MyModel"],
                 auto_map={"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"})
    monkeypatch.setattr("builtins.input", _boom)  # Transformers' "run the custom code? [y/N]" prompt
    argv = ["compress", "--model", llama_dir] if command == "compress" else ["eval", llama_dir]
    cli_error(capsys, argv, "custom modeling code", "--trust-remote-code")
    assert not marker.exists()


def test_eval_accepts_trust_remote_code_and_lists_its_keys(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--trust-remote-code" in text
    for key in hfsqueeze.EvaluationConfig.allowed_keys():
        assert key in text, key


def test_eval_base_that_does_not_exist_is_an_error(llama_dir, tmp_path, capsys, tiny_tokenizer):
    model = make_tiny("llama")
    model.config._name_or_path = str(llama_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.compress({"stages": [{"method": "quantize", "bits": 16}],
                        "evaluation": {**SMALL_EVAL, "latency": False}}, tokenizer=tiny_tokenizer)
    art = hfsqueeze.save_compressed(model, tmp_path / "art", tokenizer=tiny_tokenizer)
    cli_error(capsys, ["eval", art, "--base", "/nonexistent/base-model"], "model path not found: /nonexistent")


# ---- models no stage supports ---------------------------------------------------------------------------------------
def _t5():
    import transformers as tf

    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=400, d_model=64, d_ff=128, num_layers=2, num_heads=4,
                                                     d_kv=16))


def _mamba():
    import transformers as tf

    torch.manual_seed(0)
    return tf.MambaForCausalLM(tf.MambaConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, state_size=8))


@pytest.mark.parametrize("make, recipe, needles", [
    (_t5, "int8", ["is an encoder-decoder model"]),
    (_t5, "prune", ["is an encoder-decoder model"]),
    (_t5, "distill", ["is an encoder-decoder model"]),
    (_mamba, "int8", ["stage 1 (quantize): bits: 8 (bitsandbytes) does not support model type 'mamba'",
                      "supported model types: llama, "]),
    (_mamba, "nf4", ["does not support model type 'mamba'"]),
    (_mamba, "prune", ["stage 1 (prune): model type 'mamba' (MambaForCausalLM) is not supported",
                       "supported model types: llama"]),
])
def test_unsupported_model_types_are_refused_before_the_baseline(make, recipe, needles, tmp_path, tiny_tokenizer,
                                                                   capsys, no_work):
    model_dir = save_model(make(), tmp_path / "model", tiny_tokenizer)
    recipes = {
        "prune": {"stages": [{"method": "prune", "heads": 0.25, "importance": "magnitude"}]},
        "distill": {"stages": [{"method": "distill", "training_args": {"max_steps": 1}}]},
    }
    if recipe in recipes:
        (tmp_path / "r.yaml").write_text(json.dumps(recipes[recipe]))
        recipe = tmp_path / "r.yaml"
    before = _files(tmp_path)
    cli_error(capsys, ["compress", "--model", model_dir, "--recipe", recipe, "--output", tmp_path / "out"], *needles)
    assert _files(tmp_path) == before


def test_model_dependent_recipe_errors_come_before_the_baseline(llama_dir, tmp_path, capsys, no_work):
    for stage, needle in [
        ({"method": "prune", "layers": 5, "importance": "magnitude"}, "key 'layers': got 5"),
        ({"method": "prune", "heads": 0.25, "protect_layers": [7]}, "layer 7 does not exist"),
        ({"method": "distill", "student": {"layers": [0, 7]}}, "layers [7] do not exist; the model has 2 layers"),
    ]:
        (tmp_path / "r.yaml").write_text(json.dumps({"stages": [stage]}))
        cli_error(capsys, ["compress", "--model", llama_dir, "--recipe", tmp_path / "r.yaml"], needle)


# ---- text sources ---------------------------------------------------------------------------------------------------
def test_non_utf8_and_malformed_text_files(llama_dir, tmp_path, capsys, no_work):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait\nna\u00efve\n".encode("latin-1"))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n{"text": "two"}\n{"text": broken}\n')
    before = _files(tmp_path)
    base = ["compress", "--model", llama_dir, "--output", tmp_path / "out"]
    cli_error(capsys, [*base, "--eval-text", latin1], "latin1.txt is not UTF-8 text", "byte 0xe9 on line 1")
    cli_error(capsys, [*base, "--calibration", latin1], "latin1.txt is not UTF-8 text")
    cli_error(capsys, [*base, "--eval-text", rows], "rows.jsonl line 3: not valid JSON")
    cli_error(capsys, [*base, "--calibration", rows], "rows.jsonl line 3: not valid JSON")
    assert _files(tmp_path) == before


# ---- --output -------------------------------------------------------------------------------------------------------
def test_unwritable_output_fails_before_loading(llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hfsqueeze.models.load_model", _boom)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    # Tests run as root: /proc and /sys refuse new entries even to root; a path below a regular file cannot exist.
    for output in ("/proc/hfsqueeze-out", "/sys/hfsqueeze-out", a_file / "out", a_file / "deeper" / "out"):
        cli_error(capsys, ["compress", "--model", llama_dir, "--output", output], f"--output {output}")
    assert a_file.read_text() == "mine" and not Path("/proc/hfsqueeze-out").exists()


def _read_only_dir(monkeypatch, root: Path) -> None:
    """Make creating anything directly in ``root`` fail as on a read-only directory (tests run as root, whom a chmod
    does not stop)."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == root:
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("command", [["compress"], ["tune", "--budget", "size=0.5"]])
@pytest.mark.parametrize("case", ["existing file", "below a file", "read-only parent", "/proc", "current dir"])
def test_compress_and_tune_share_the_output_checks_before_loading(command, case, llama_dir, tmp_path, capsys,
                                                                  monkeypatch):
    """One output policy for both commands: each bad --output is one line, exit 2, before the model loads, and
    nothing is written."""
    monkeypatch.setattr("hfsqueeze.models.load_model", _boom)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    output, needle = {
        "existing file": (a_file, f"output path {a_file} exists and is not a directory"),
        "below a file": (a_file / "out", f"{a_file} is a file, not a directory"),
        "read-only parent": (read_only / "out", f"cannot write in {read_only} (Permission denied)"),
        "/proc": (Path("/proc/hfsqueeze-out"), "cannot write in /proc"),
        "current dir": (Path("."), "it is the current directory"),
    }[case]
    _read_only_dir(monkeypatch, read_only)
    before = _files(tmp_path)
    cli_error(capsys, [*command, "--model", llama_dir, "--output", output], needle)
    assert _files(tmp_path) == before and a_file.read_text() == "mine"


def test_report_is_printed_when_the_save_fails(llama_dir, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hfsqueeze.artifact.save.save_compressed", disk_full)
    rc = main(["compress", "--model", str(llama_dir), "--output", str(tmp_path / "out"), *QUICK])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "| Perplexity |" in out and "saved to" not in out
    assert err.strip().splitlines() == [f"hfsqueeze: error: could not save to {tmp_path / 'out'} (No space left on "
                                        "device); nothing was saved, the report above is all that remains"]


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: room for the output probe and config.json, not for the weights. Needs root (CI runs as root)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_compress_onto_a_full_disk_is_one_line_and_leaves_nothing(llama_dir, full_disk, capsys):
    """safetensors reports a full disk as its own SafetensorError (not an OSError): it must read like any other."""
    out = full_disk / "out"
    rc = main(["compress", "--model", str(llama_dir), "--output", str(out), *QUICK])
    stdout, err = capsys.readouterr()
    assert rc == 2 and "| Perplexity |" in stdout
    assert err.strip().splitlines() == [f"hfsqueeze: error: could not save to {out} (No space left on device); "
                                        "nothing was saved, the report above is all that remains"]
    assert list(full_disk.iterdir()) == []


# ---- hfsqueeze's own artifacts --------------------------------------------------------------------------------------
@pytest.fixture
def pruned_artifact(tmp_path, tiny_tokenizer):
    """A non-uniformly pruned llama (per-layer head counts), saved by hfsqueeze."""
    model = make_tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.compress({"stages": [{"method": "prune", "heads": 0.25, "ffn": 0.3, "importance": "magnitude"}],
                        "evaluation": {**SMALL_EVAL, "latency": False}}, tokenizer=tiny_tokenizer)
    assert model.config.hfsqueeze_pruning["num_attention_heads"] == [2, 4]
    return hfsqueeze.save_compressed(model, tmp_path / "pruned", tokenizer=tiny_tokenizer)


def test_compress_loads_its_own_pruned_artifact(pruned_artifact, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["compress", "--model", str(pruned_artifact), "--recipe", "bf16", "--output", str(out), *QUICK]) == 0
    assert json.loads((out / "config.json").read_text())["hfsqueeze_pruning"]["num_attention_heads"] == [2, 4]


def _plan(path: Path, **changes) -> None:
    data = json.loads((path / "config.json").read_text())
    if "plan" in changes:
        data["hfsqueeze_pruning"] = changes.pop("plan")
    else:
        data["hfsqueeze_pruning"].update(changes)
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("tamper, needles", [
    (lambda p: _plan(p, plan="abc"), ["field 'hfsqueeze_pruning' must be a mapping"]),
    (lambda p: _plan(p, num_attention_heads=[3, 4]), ["field 'hfsqueeze_pruning': layer 0 lists 3 query"]),
    (lambda p: _plan(p, num_attention_heads=[4, 4], num_key_value_heads=[2, 2]),
     ["config.json field 'hfsqueeze_pruning' describes", "self_attn"]),
    (lambda p: _plan(p, intermediate_size=[1000, 90]), ["intermediate_size 1000"]),
])
def test_tampered_pruning_plan_is_an_artifact_error_naming_the_field(tamper, needles, pruned_artifact, capsys):
    tamper(pruned_artifact)
    with pytest.raises(ArtifactError) as info:
        hfsqueeze.load_compressed(pruned_artifact)
    assert "\n" not in str(info.value) and all(n in str(info.value) for n in needles)
    cli_error(capsys, ["eval", pruned_artifact], *needles)
    cli_error(capsys, ["compress", "--model", pruned_artifact], *needles)


def test_int8_relabelled_as_4bit_is_an_artifact_error(llama_dir, tmp_path, capsys, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "int8"
    assert main(["compress", "--model", str(llama_dir), "--output", str(out), *QUICK]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"].update(load_in_8bit=False, load_in_4bit=True, _load_in_8bit=False,
                                         _load_in_4bit=True)
    (out / "config.json").write_text(json.dumps(config))
    needle = "field 'quantization_config' says 4-bit (load_in_4bit) but the weights are int8"
    with pytest.raises(ArtifactError, match=r"quantization_config' says 4-bit"):
        hfsqueeze.load_compressed(out)
    cli_error(capsys, ["eval", out], needle)


# ---- recipes: strict ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, needle", [
    ("stages:\n  - method: quantize\n    bits: 8\n    bits: 4\n", "at line 4: duplicate key 'bits' (first given on "
                                                                     "line 3)"),
    ({"stages": [{"method": "distill", "training_args": {"max_steps": "abc"}}]},
     "'max_steps': got 'abc'; TrainingArguments expects int"),
    ({"stages": [{"method": "distill", "training_args": {"lr_scheduler_type": "cosin"}}]},
     "'lr_scheduler_type': got 'cosin'; TrainingArguments expects one of 'linear', 'cosine'"),
    ({"stages": [{"method": "distill", "training_args": {"max_stepz": 5}}]}, "unknown TrainingArguments field"),
    ({"stages": [{"method": "quantize", "bits": 8}, {"method": "prune", "heads": 0.25}]},
     "stage 2 (prune): cannot follow a bitsandbytes int8 stage"),
    ({"stages": [{"method": "quantize", "bits": 4}, {"method": "quantize", "bits": 16}]},
     "stage 2 (quantize): bits: 16 cannot follow a bitsandbytes nf4 stage"),
    ({"recover": "sometimes", "stages": [{"method": "prune", "heads": 0.25}]}, "key 'recover': got 'sometimes'"),
    ({"stages": [{"method": "prune", "heads": 0.25, "recover": {"training_args": {"max_steps": "x"}}}]},
     "'max_steps': got 'x'"),
])
def test_validate_catches_what_compress_would_reject(recipe, needle, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(recipe if isinstance(recipe, str) else json.dumps(recipe))
    cli_error(capsys, ["validate", path], needle)
    cli_error(capsys, ["compress", "--model", tmp_path / "never-loaded", "--recipe", path], needle)


def test_training_args_numbers_written_as_strings_are_converted():
    from hfsqueeze.methods.distill import DistillConfig

    config = DistillConfig.from_dict({"training_args": {"learning_rate": "5e-5", "max_steps": 3}})
    assert config.training_args == {"learning_rate": 5e-5, "max_steps": 3}
    with pytest.raises(RecipeError, match="'bf16': got 'yes'; TrainingArguments expects bool"):
        DistillConfig.from_dict({"training_args": {"bf16": "yes"}})


# ---- prune targets that cannot be met -------------------------------------------------------------------------------
@pytest.fixture
def one_kv_group_dir(tmp_path, tiny_tokenizer):
    """Gemma-3-270M's attention shape: 4 query heads sharing a single key/value head in every layer."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return save_model(tf.LlamaForCausalLM(cfg).eval(), tmp_path / "one-kv", tiny_tokenizer)


@pytest.mark.parametrize("stage, needles", [
    ({"heads": 0.25}, ["key 'heads': 0.25 removes no head: every layer has a single key/value group",
                       "use gqa_mode: slots"]),
    ({"heads": 0.25, "gqa_mode": "slots", "min_heads_per_layer": 4}, ["min_heads_per_layer=4 keeps every head"]),
    ({"heads": 0.25, "gqa_mode": "slots", "protect_layers": [0, 1]}, ["protect_layers=[0, 1] covers every layer"]),
    ({"ffn": 0.25, "protect_layers": [0, -1]}, ["key 'ffn': 0.25 removes no FFN neuron"]),
    ({"heads": 0.05, "gqa_mode": "slots"}, ["key 'heads': 0.05 of 8 query heads rounds to 0"]),
    ({"heads": 0.1, "gqa_mode": "slots", "scope": "layerwise"}, ["rounds to 0", "use scope: global"]),
])
def test_prune_target_that_removes_nothing_fails_before_scoring(stage, needles, one_kv_group_dir, tmp_path, capsys,
                                                                 no_work):
    (tmp_path / "r.yaml").write_text(json.dumps({"stages": [{"method": "prune", **stage}]}))
    cli_error(capsys, ["compress", "--model", one_kv_group_dir, "--recipe", tmp_path / "r.yaml"], *needles)


def test_prune_slots_on_a_single_key_value_group(one_kv_group_dir, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(json.dumps({"stages": [{"method": "prune", "heads": 0.25, "gqa_mode": "slots",
                                                             "importance": "magnitude"}]}))
    rc = main(["compress", "--model", str(one_kv_group_dir), "--recipe", str(tmp_path / "r.yaml"), "--json", *QUICK])
    assert rc == 0
    details = json.loads(capsys.readouterr().out)["stages"][0]["details"]
    assert details["heads_after"] == 6 and details["kv_heads_per_layer"] == [1, 1]


def test_layerwise_rounding_is_a_clean_warning_in_the_report_and_card(llama_dir, tmp_path, capsys):
    # 4 query heads in 2 key/value groups per layer: layerwise 0.4 means 3.2 of 8 heads; layers lose whole groups.
    (tmp_path / "r.yaml").write_text(json.dumps({"stages": [{"method": "prune", "heads": 0.4, "scope": "layerwise",
                                                             "importance": "magnitude"}]}))
    out = tmp_path / "out"
    assert main(["compress", "--model", str(llama_dir), "--recipe", str(tmp_path / "r.yaml"), "--output", str(out),
                 *QUICK]) == 0
    err = capsys.readouterr().err
    expected = "stage 1 (prune): layerwise heads=0.4 removes 4 of 8 query heads (per layer: [2, 2]), not 3"
    lines = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"hfsqueeze: warning: {expected}"), err
    assert "PruneWarning" not in err
    report = json.loads((out / "report.json").read_text())
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith(expected)
    card = (out / "README.md").read_text()
    assert "## Warnings" in card and expected in card
    assert hfsqueeze.CompressionReport.load(out).warnings == report["warnings"]


def test_library_users_still_get_a_prune_warning(tiny_tokenizer):
    from hfsqueeze.methods.prune import PruneWarning

    model = make_tiny("llama")
    with pytest.warns(PruneWarning, match="layerwise heads=0.4 removes 4 of 8"):
        report = model.compress({"stages": [{"method": "prune", "heads": 0.4, "scope": "layerwise",
                                             "importance": "magnitude"}], "evaluation": {**SMALL_EVAL,
                                                                                      "latency": False}},
                                tokenizer=tiny_tokenizer)
    assert report.warnings and os.linesep not in report.warnings[0]
