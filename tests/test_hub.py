"""Pushing to a Hub: a real HTTP server on loopback (tests/hub_server.py) and the real huggingface_hub client."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load, load_file, save_file

import hfsqueeze
from hfsqueeze import cli
from hfsqueeze import hub as hubmod
from hfsqueeze.artifact.parity import PARITY_FILE, compare_outputs
from hfsqueeze.artifact.card import CARD_END, CARD_START
from hfsqueeze.artifact.load import load_snippet
from hfsqueeze.core.errors import HubError

from conftest import make_tiny
from hub_server import HubServer

TOKEN = "hf_TestSecretToken0123456789abcdef"  # throwaway; asserted never to leak
OTHER = "hf_OtherUserToken0123456789abcdef"
QUICK_EVAL = {"max_tokens": 128, "seq_len": 64, "repeats": 1, "latency": False,
              "per_stage": False}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The loopback Hub, with the in-process client pointed at it (HF_ENDPOINT is read at import, so patch)."""
    import huggingface_hub.constants as constants

    server = HubServer(tokens={TOKEN: "alice", OTHER: "bob"}).start()
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "ENDPOINT", server.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "cache"))
        mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # no cached login on this machine
        mp.delenv("HF_TOKEN", raising=False)
        mp.setattr(hubmod, "RETRY_BASE_SECONDS", 0.0)
        yield server
    server.stop()


def _compressed(stages, tok, name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"):
    model = make_tiny("llama")
    model.config._name_or_path = name_or_path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hfsqueeze.compress(model, {"stages": stages, "evaluation": QUICK_EVAL}, tokenizer=tok)
    return model


def _save(model, path, tokenizer=None):
    saved = hfsqueeze.save_compressed(model, path, tokenizer=tokenizer)
    assert (saved / PARITY_FILE).is_file(), "save_compressed must record the parity outputs"
    return saved


@pytest.fixture(scope="module")
def pushed(hub, tiny_tokenizer, tmp_path_factory):
    """fp32 (no recipe), nf4 and pruned pushed from memory; int8 pushed from a saved directory."""
    out = {}
    fp32 = make_tiny("llama")
    out["alice/tiny-fp32"] = (fp32, hfsqueeze.push_to_hub(fp32, "alice/tiny-fp32", tokenizer=tiny_tokenizer,
                                                          token=TOKEN))
    int8 = _compressed([{"method": "quantize", "bits": 8}], tiny_tokenizer)
    saved = _save(int8, tmp_path_factory.mktemp("int8") / "art", tiny_tokenizer)
    out["alice/tiny-int8"] = (saved, hfsqueeze.push_to_hub(saved, "tiny-int8", token=TOKEN))
    nf4 = _compressed([{"method": "quantize", "bits": 4, "quant_type": "nf4"}], tiny_tokenizer)
    out["alice/tiny-nf4"] = (nf4, hfsqueeze.push_to_hub(nf4, "alice/tiny-nf4", tokenizer=tiny_tokenizer, token=TOKEN))
    pruned = _compressed([{"method": "prune", "heads": 0.25, "ffn": 0.25, "importance": "magnitude",
                           "scope": "global"}], tiny_tokenizer)
    out["alice/tiny-pruned"] = (pruned, hfsqueeze.push_to_hub(pruned, "alice/tiny-pruned", tokenizer=tiny_tokenizer,
                                                              token=TOKEN))
    return out


def test_push_creates_one_commit_with_everything(hub, pushed):
    for repo_id in pushed:
        files = hub.files(repo_id)
        assert hub.commit_count(repo_id) == 2, repo_id  # the repo's initial commit + ours
        assert {"README.md", "config.json", "model.safetensors", PARITY_FILE} <= set(files), repo_id
    for repo_id in ("alice/tiny-int8", "alice/tiny-nf4", "alice/tiny-pruned"):
        files = hub.files(repo_id)
        assert {"recipe.yaml", "report.json", "tokenizer.json"} <= set(files), repo_id
        assert json.loads(files["report.json"])["schema"] == "hfsqueeze.report"
    int8_config = json.loads(hub.files("alice/tiny-int8")["config.json"])
    assert int8_config["quantization_config"]["load_in_8bit"] is True


def test_card_on_the_hub_parses_and_describes_the_artifact(hub, pushed):
    from huggingface_hub import ModelCard

    card = ModelCard.load("alice/tiny-int8", token=TOKEN)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"hfsqueeze", "bitsandbytes", "8-bit"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0" and card.data.language == ["en"]
    metrics = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    report = json.loads(hub.files("alice/tiny-int8")["report.json"])
    assert metrics == {("perplexity", "Perplexity"): pytest.approx(report["final"]["perplexity"], rel=1e-5)}
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-int8")' in card.text
    assert 'AutoTokenizer.from_pretrained("alice/tiny-int8")' in card.text and "model.generate(" in card.text
    assert "reloaded in a fresh process" in card.text

    pruned = ModelCard.load("alice/tiny-pruned", token=TOKEN)
    assert pruned.data.base_model_relation == "finetune" and "pruned" in pruned.data.tags
    assert "## Architecture changes" in pruned.text and "attention heads kept" in pruned.text
    assert "trust_remote_code=True" in pruned.text

    nf4 = ModelCard.load("alice/tiny-nf4", token=TOKEN)
    assert {"4-bit", "nf4"} <= set(nf4.data.tags)
    plain = ModelCard.load("alice/tiny-fp32", token=TOKEN)  # pushed without a recipe: no numbers, no filler
    assert plain.data.eval_results is None and "More Information Needed" not in plain.text


def test_from_pretrained_from_the_hub_gives_the_same_outputs(hub, pushed, tmp_path):
    """A fresh process, pointed at the server only through HF_ENDPOINT, runs each card's load code."""
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for i, repo_id in enumerate(pushed):
        parity = load(hub.files(repo_id)[PARITY_FILE])
        save_file(parity, str(ref_dir / f"{i}.safetensors"))
    fp32 = pushed["alice/tiny-fp32"][0]
    with torch.no_grad():
        live = fp32(input_ids=load_file(str(ref_dir / "0.safetensors"))["input_ids"]).logits
    assert torch.equal(live, load_file(str(ref_dir / "0.safetensors"))["outputs"])

    body = ""
    for i, repo_id in enumerate(pushed):
        config = hubmod._artifact_config(_snapshot(repo_id, tmp_path / f"cfg{i}"))
        code = load_snippet(config, repo_id)
        body += textwrap.dedent(f"""
            ref = load_file({str(ref_dir / f"{i}.safetensors")!r})
            {textwrap.indent(code, "            ").strip()}
            with torch.no_grad():
                got = model.eval()(input_ids=ref["input_ids"]).logits
            diff = (got - ref["outputs"]).abs().max().item()
            assert diff <= 1e-2 * ref["outputs"].abs().max().item(), ({repo_id!r}, diff)
            print({repo_id!r}, diff)
        """)
    script = tmp_path / "load.py"
    script.write_text("import torch\nfrom safetensors.torch import load_file\n" + body)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home"),
           "HF_TOKEN": TOKEN}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("alice/") == len(pushed)
    assert "alice/tiny-fp32 0.0" in proc.stdout  # fp32 reloads bit-exact


def _snapshot(repo_id, target):
    from huggingface_hub import snapshot_download

    return hubmod.Path(snapshot_download(repo_id, token=TOKEN, local_dir=target, allow_patterns=["config.json"]))


def test_repush_updates_the_card_in_place(hub, pushed, tiny_tokenizer):
    from huggingface_hub import HfApi, ModelCard

    api = HfApi()
    repo_id = "alice/tiny-nf4"
    model = pushed[repo_id][0]  # in memory: each push saves it again (4-bit: after inference, a known hazard)
    before = hub.commit_count(repo_id)
    hfsqueeze.push_to_hub(model, repo_id, tokenizer=tiny_tokenizer, token=TOKEN)
    assert hub.commit_count(repo_id) == before  # same artifact, same card: no empty commit

    # The owner adds a license and a paragraph of their own; a re-push keeps both and replaces only our section.
    card = ModelCard(hub.files(repo_id)["README.md"].decode())
    card.data.license = "apache-2.0"
    card.text = card.text + "\n## Intended use\n\nInternal evaluation only.\n"
    api.upload_file(path_or_fileobj=str(card).encode(), path_in_repo="README.md", repo_id=repo_id, token=TOKEN)
    model.hfsqueeze_report.final.perplexity = 123.456
    hfsqueeze.push_to_hub(model, repo_id, tokenizer=tiny_tokenizer, token=TOKEN, check_parity=False)
    text = hub.files(repo_id)["README.md"].decode()
    assert text.count(CARD_START) == 1 and text.count(CARD_END) == 1 and text.count("## Results") == 1
    assert "Internal evaluation only." in text and "license: apache-2.0" in text
    assert "123.46" in text


def test_transient_errors_are_retried(hub, tiny_tokenizer):
    model = make_tiny("llama")
    hub.fail("commit", status=503, times=2)
    hfsqueeze.push_to_hub(model, "alice/retry", token=TOKEN, check_parity=False)
    assert hub.commit_count("alice/retry") == 2
    assert "model.safetensors" in hub.files("alice/retry")


@pytest.mark.parametrize("failure", [{"status": 500}, {"drop": True}], ids=["server-500", "connection-cut"])
def test_failed_upload_leaves_no_commit(hub, failure):
    model = make_tiny("gpt2")
    hfsqueeze.push_to_hub(model, "alice/atomic", token=TOKEN, check_parity=False)
    before = hub.files("alice/atomic")
    count = hub.commit_count("alice/atomic")
    model.transformer.h[0].mlp.c_fc.weight.data += 1  # a real change to upload
    hub.fail("commit", times=10, **failure)
    try:
        with pytest.raises(HubError, match="nothing was committed"):
            hfsqueeze.push_to_hub(model, "alice/atomic", token=TOKEN, check_parity=False, max_retries=2)
    finally:
        hub.clear_failures()
    assert hub.commit_count("alice/atomic") == count
    assert hub.files("alice/atomic") == before


def test_private_repo_needs_the_owners_token(hub, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError

    hfsqueeze.push_to_hub(make_tiny("bert"), "alice/secret", token=TOKEN, private=True, check_parity=False)
    assert hub.repos["alice/secret"].private
    for token in (False, OTHER):
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("alice/secret", "config.json", token=token, cache_dir=tmp_path / str(token))
    path = hf_hub_download("alice/secret", "config.json", token=TOKEN, cache_dir=tmp_path / "owner")
    assert json.load(open(path))["model_type"] == "bert"


def test_missing_or_rejected_token_is_one_clear_line(hub):
    model = make_tiny("llama")
    with pytest.raises(HubError, match="no Hugging Face token") as missing:
        hfsqueeze.push_to_hub(model, "alice/x")
    bad = "hf_RejectedTokenabcdefabcdef0123"
    with pytest.raises(HubError, match="rejected the token") as rejected:
        hfsqueeze.push_to_hub(model, "alice/x", token=bad)
    for exc in (missing.value, rejected.value):
        assert "\n" not in str(exc)
    assert bad not in str(rejected.value)
    assert "alice/x" not in hub.repos


def test_token_never_leaks(hub, tiny_tokenizer, caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # from the environment this time
    caplog.set_level(logging.DEBUG)
    model = _compressed([{"method": "quantize", "bits": 16}], tiny_tokenizer)
    hfsqueeze.push_to_hub(model, "alice/leak", tokenizer=tiny_tokenizer, check_parity=False)
    files = hub.files("alice/leak")
    assert files["README.md"] and files["report.json"]
    for name, content in files.items():
        assert TOKEN.encode() not in content, name
    assert TOKEN not in caplog.text
    hub.fail("commit", status=500, times=10)
    try:
        with pytest.raises(HubError) as err:
            hfsqueeze.push_to_hub(model, "alice/leak2", check_parity=False, max_retries=0)
    finally:
        hub.clear_failures()
    assert TOKEN not in str(err.value) and TOKEN not in caplog.text


def test_parity_gate_blocks_a_broken_artifact(hub, tiny_tokenizer, tmp_path):
    model = make_tiny("llama")
    saved = _save(model, tmp_path / "art", tiny_tokenizer)
    weights = load_file(str(saved / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] * 3
    save_file(weights, str(saved / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HubError, match=r"parity check failed: the reloaded model's logits differ .* nothing was"):
        hfsqueeze.push_to_hub(saved, "alice/broken", token=TOKEN)
    assert "alice/broken" not in hub.repos


def _pruned_artifact(path, tok):
    model = _compressed([{"method": "prune", "heads": 0.25, "importance": "magnitude", "scope": "global"}], tok)
    saved = _save(model, path, tok)
    assert (saved / "modeling_hfsqueeze_pruned.py").is_file()
    return saved


@pytest.mark.parametrize("tamper", ["edit-modeling-file", "extra-code-file"])
def test_push_never_runs_or_uploads_code_hfsqueeze_did_not_write(tamper, hub, tiny_tokenizer, tmp_path):
    saved = _pruned_artifact(tmp_path / "art", tiny_tokenizer)
    marker = tmp_path / "code-ran"
    payload = f"\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n"
    include = {}
    if tamper == "edit-modeling-file":
        with open(saved / "modeling_hfsqueeze_pruned.py", "a") as fh:
            fh.write(payload)
    else:
        (saved / "helpers.py").write_text(payload)
        include = {"include": ["helpers.py"]}  # a file hfsqueeze does not write goes up only when named
    with pytest.raises(hfsqueeze.ArtifactError, match="refusing to run or upload it"):
        hfsqueeze.push_to_hub(saved, f"alice/tampered-{tamper}", token=TOKEN, **include)
    assert not marker.exists() and f"alice/tampered-{tamper}" not in hub.repos
    # The user may opt in explicitly; then the card's own code (trust_remote_code=True) is what gets checked.
    hfsqueeze.push_to_hub(saved, f"alice/tampered-{tamper}", token=TOKEN, trust_remote_code=True, **include)
    assert marker.exists() == (tamper == "edit-modeling-file")  # helpers.py is uploaded but nothing imports it


def test_pruned_card_names_the_code_users_will_run(hub, pushed):
    from huggingface_hub import ModelCard

    text = ModelCard.load("alice/tiny-pruned", token=TOKEN).text
    assert "runs modeling_hfsqueeze_pruned.py" in text and "hfsqueeze.load_compressed" in text
    assert "no code from the artifact ran" in text


def test_saved_artifact_without_parity_file_is_refused(hub, tmp_path):
    model = make_tiny("llama")
    saved = hfsqueeze.save_compressed(model, tmp_path / "art")
    (saved / PARITY_FILE).unlink(missing_ok=True)
    with pytest.raises(hfsqueeze.ArtifactError, match="no parity.safetensors"):
        hfsqueeze.push_to_hub(saved, "alice/unchecked", token=TOKEN)


def test_compare_outputs_names_what_differed():
    ref = torch.randn(1, 4, 10)
    assert compare_outputs(ref, ref.clone())["max_abs_diff"] == 0
    with pytest.raises(HubError, match=r"shape \(1, 3, 10\)"):
        compare_outputs(ref, ref[:, :3])
    bad = ref.clone()
    bad[0, 2, 5] += 10
    with pytest.raises(HubError, match="at token 2"):
        compare_outputs(ref, bad)


def test_cli_push(hub, pushed, tmp_path, monkeypatch, capsys):
    int8_dir = pushed["alice/tiny-int8"][0]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli.main(["push", str(int8_dir), "--repo", "cli-int8", "--private", "--commit-message", "from cli",
                 "--no-parity-check"]) == 0
    assert "/alice/cli-int8/commit/" in capsys.readouterr().out
    assert hub.repos["alice/cli-int8"].private
    assert hub.repos["alice/cli-int8"].head.title == "from cli"

    parser = argparse.ArgumentParser()
    cli.add_push_options(parser)
    assert cli.push_from_cli(parser.parse_args([]), model=None) is None
    args = parser.parse_args(["--push-to-hub", "alice/cli-int8", "--no-parity-check"])
    cli.check_push_args(args)
    assert cli.push_from_cli(args, model=None, artifact=int8_dir).oid == hub.repos["alice/cli-int8"].head.oid
    with pytest.raises(HubError, match="not a repository id"):
        cli.check_push_args(parser.parse_args(["--push-to-hub", "a/b/c"]))
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no Hugging Face token"):
        cli.check_push_args(args)


@pytest.mark.slow
def test_compress_and_push_script(hub, tiny_tokenizer, tmp_path):
    """The end-to-end example, in its own process, pointed at the server only through the environment."""
    base = tmp_path / "base"
    make_tiny("llama").save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    sets = [f"--set=evaluation.{k}={v}" for k, v in QUICK_EVAL.items()]
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home"),
           "HF_TOKEN": TOKEN, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(hfsqueeze.__file__)))}
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "compress_and_push.py")
    proc = subprocess.run([sys.executable, script, "--model", str(base), "--recipe", "int8", *sets,
                           "--repo", "alice/script-int8", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pushed " in proc.stdout
    files = hub.files("alice/script-int8")
    assert json.loads(files["config.json"])["quantization_config"]["load_in_8bit"] is True
    assert b"python scripts/compress_and_push.py --model" in files["README.md"]
    assert TOKEN not in proc.stdout + proc.stderr


def test_cli_push_to_hub_checks_token_and_reachability_before_loading(hub, tmp_path, monkeypatch, capsys):
    """A rejected token or an unreachable Hub fails in one line before the model is even loaded."""
    import socket

    import huggingface_hub.constants as constants

    from hfsqueeze.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the Hub was checked")

    monkeypatch.setattr("hfsqueeze.models.load_model", no_load)
    argv = ["compress", "--model", str(tmp_path / "never-loaded"), "--push-to-hub", "alice/checked"]
    monkeypatch.setenv("HF_TOKEN", "hf_RejectedTokenabcdefabcdef0123")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rejected the token (401)" in err[0] and "Rejected" not in err[0]

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hfsqueeze: error: cannot reach the Hub at {closed}")
    assert "alice/checked" not in hub.repos


def test_recovered_adapter_artifact_loads_from_the_hub(hub, tiny_tokenizer, tmp_path):
    """A quantized model whose recovery adapter is kept unmerged: the Hub copy loads base + adapter with a standard
    call (adapter_config.json points its base at the repository itself)."""
    pytest.importorskip("peft")
    model = _compressed([{"method": "quantize", "bits": 4, "quant_type": "nf4"},
                         {"method": "distill", "block_size": 64, "guard": False,
                          "data": {"text": "builtin", "max_tokens": 4000, "eval_tokens": 256},
                          "training_args": {"max_steps": 2, "learning_rate": 5e-3}}], tiny_tokenizer)
    assert model.hfsqueeze_report.stages[1].details["route"] == "adapter"
    hfsqueeze.push_to_hub(model, "alice/tiny-nf4-recovered", tokenizer=tiny_tokenizer, token=TOKEN)
    files = hub.files("alice/tiny-nf4-recovered")
    assert {"adapter_model.safetensors", "model.safetensors", "config.json"} <= set(files)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "alice/tiny-nf4-recovered"
    save_file(load(files[PARITY_FILE]), str(tmp_path / "ref.safetensors"))
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        ref = load_file({str(tmp_path / "ref.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained("alice/tiny-nf4-recovered", device_map="cpu").eval()
        assert any("lora_A" in n for n, _ in model.named_parameters())
        with torch.no_grad():
            got = model(input_ids=ref["input_ids"]).logits
        print("diff", (got - ref["outputs"]).abs().max().item() / ref["outputs"].abs().max().item())
    """))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home"),
           "HF_TOKEN": TOKEN}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split("diff")[-1]) <= 1e-2


# ---- what goes up: the artifact's own files, and what the user names ---------------------------------------------
@pytest.fixture
def no_parity_reload(monkeypatch):
    """Fails the test if the parity reload (which runs artifact content in a subprocess) starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("the parity reload ran before the artifact's files were checked")

    monkeypatch.setattr(hubmod, "verify_parity", refuse)


def _plain_artifact(path):
    return _save(make_tiny("llama"), path)


@pytest.mark.parametrize("link", ["notes.txt", "docs", "sub/deep/notes.txt", "model.safetensors"])
def test_push_refuses_a_symlink_anywhere(link, hub, tmp_path, no_parity_reload):
    saved = _plain_artifact(tmp_path / "art")
    secret = tmp_path / "secret.txt"
    secret.write_text("the password is hunter2")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("the password is hunter2")
    target = saved / link
    target.parent.mkdir(parents=True, exist_ok=True)
    if link == "model.safetensors":  # one of our own names, pointing elsewhere: the link is what is refused
        os.replace(target, tmp_path / "moved.safetensors")
        target.symlink_to(tmp_path / "moved.safetensors")
    elif link == "docs":
        target.symlink_to(os.path.relpath(tmp_path / "outside", saved), target_is_directory=True)
    else:
        target.symlink_to(os.path.relpath(secret, target.parent))
    for include in ({}, {"include": [link, f"{link}/*"]}):
        with pytest.raises(hfsqueeze.ArtifactError, match=rf"symbolic link, {link} -> ") as err:
            hfsqueeze.push_to_hub(saved, "alice/linked", token=TOKEN, **include)
        assert "\n" not in str(err.value)
    assert "alice/linked" not in hub.repos


def test_push_only_uploads_named_extra_files(hub, tmp_path, no_parity_reload, monkeypatch):
    saved = _plain_artifact(tmp_path / "art")
    (saved / "extra").mkdir()
    (saved / "extra" / "data.csv").write_text("a,b\n1,2\n")
    (saved / ".env").write_text("HF_TOKEN=hf_secret")  # hidden: never uploaded, not refused
    refused = r"contains extra/data\.csv, a file .* include=\['extra/data\.csv'\] \(CLI: --include extra/data\.csv\)"
    with pytest.raises(hfsqueeze.ArtifactError, match=refused):
        hfsqueeze.push_to_hub(saved, "alice/extra", token=TOKEN)
    with pytest.raises(hfsqueeze.ArtifactError, match=r"include pattern 'extra/\*\.txt' matches no file"):
        hfsqueeze.push_to_hub(saved, "alice/extra", token=TOKEN, include=["extra/*", "extra/*.txt"])
    assert "alice/extra" not in hub.repos
    monkeypatch.undo()  # the parity reload may run now
    hfsqueeze.push_to_hub(saved, "alice/extra", token=TOKEN, include=["extra/*"])
    files = hub.files("alice/extra")
    assert files["extra/data.csv"] == b"a,b\n1,2\n"
    assert ".env" not in files and "config.json" in files and PARITY_FILE in files


@pytest.mark.parametrize("name, include", [("pytorch_model.bin", {}), ("pytorch_model.bin", {"include": ["*.bin"]}),
                                           ("tokenizer.bin", {}), ("extra/state.pt", {"include": ["extra/*"]}),
                                           ("tuning/optimizer.pkl", {"include": ["tuning/"]})])
def test_push_never_uploads_a_pickle(name, include, hub, tmp_path, no_parity_reload):
    saved = _plain_artifact(tmp_path / "art")
    (saved / name).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.zeros(2)}, saved / name)
    with pytest.raises(hfsqueeze.ArtifactError, match=rf"refusing to upload {name}: pickle files .* never uploaded, "
                                                      "even with include") as err:
        hfsqueeze.push_to_hub(saved, "alice/pickled", token=TOKEN, **include)
    assert "\n" not in str(err.value)
    assert "alice/pickled" not in hub.repos


def _tuned_artifact(path):
    """A saved artifact with what `hfsqueeze tune` adds: a tuning/ folder and the report's tuning section."""
    saved = _plain_artifact(path)
    tuning = saved / "tuning"
    (tuning / "nested").mkdir(parents=True)
    (tuning / "calibration.jsonl").write_text('{"text": "my private corpus"}\n')
    (tuning / "study.journal").write_text("{}\n")
    (tuning / "run.json").write_text("{}")
    (tuning / "trials.jsonl").write_text("{}\n")
    (tuning / "pareto.png").write_bytes(b"\x89PNG")
    (tuning / "nested" / "sensitivity.json").write_text("{}")
    (tuning / "optimizer.pt").write_bytes(b"pickle")  # left out with tuning/: not a reason to refuse
    report = json.loads((saved / "report.json").read_text()) if (saved / "report.json").is_file() else {}
    report["tuning"] = {"plot": "tuning/pareto.png", "budget": {"text": "size<=0.5x"}, "trials": [], "pareto": []}
    (saved / "report.json").write_text(json.dumps(report))
    return saved


def test_tuned_artifact_pushes_without_its_tuning_folder(hub, tmp_path, caplog):
    saved = _tuned_artifact(tmp_path / "art")
    caplog.set_level(logging.INFO, logger="hfsqueeze")
    hfsqueeze.push_to_hub(saved, "alice/tuned", token=TOKEN, check_parity=False)
    files = hub.files("alice/tuned")
    assert not [name for name in files if name.startswith("tuning")]
    assert b"my private corpus" not in b"".join(files.values())
    assert "config.json" in files and "report.json" in files
    card = files["README.md"].decode()
    assert "## Tuning" in card and "tuning/" not in card  # no link to a plot that stayed local, no file row
    assert [r.message for r in caplog.records if "stays local" in r.message] == [
        "tuning/ (7 files: the tuning run, its calibration text included) stays local; pass include=['tuning/*'] "
        "(CLI: --include 'tuning/*') to upload it"]

    (saved / "tuning" / "optimizer.pt").unlink()
    hfsqueeze.push_to_hub(saved, "alice/tuned", token=TOKEN, check_parity=False, include=["tuning/*"])
    files = hub.files("alice/tuned")
    assert {"tuning/calibration.jsonl", "tuning/study.journal", "tuning/run.json", "tuning/trials.jsonl",
            "tuning/pareto.png", "tuning/nested/sensitivity.json"} <= set(files)
    assert "![Pareto front](tuning/pareto.png)" in files["README.md"].decode()


def test_stale_weights_on_the_hub_are_deleted_and_kept_local_files_are_not_uploaded(hub, tmp_path):
    from huggingface_hub import HfApi

    saved = _tuned_artifact(tmp_path / "art")
    HfApi().create_repo("alice/stale", token=TOKEN)
    for name in ("pytorch_model.bin", "model-00001-of-00002.safetensors", "notes.md"):
        HfApi().upload_file(path_or_fileobj=b"old", path_in_repo=name, repo_id="alice/stale", token=TOKEN)
    hfsqueeze.push_to_hub(saved, "alice/stale", token=TOKEN, check_parity=False)
    files = hub.files("alice/stale")
    assert "pytorch_model.bin" not in files and "model-00001-of-00002.safetensors" not in files
    assert files["notes.md"] == b"old"  # not a weight: the owner's file stays
    assert files["model.safetensors"] != b"old" and not [n for n in files if n.startswith("tuning")]


def test_cli_push_refuses_unexpected_files_in_one_line(hub, tmp_path, monkeypatch, capsys, no_parity_reload):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    saved = _plain_artifact(tmp_path / "art")
    (saved / "extra").mkdir()
    (saved / "extra" / "data.csv").write_text("a,b\n")
    (saved / "pytorch_model.bin").write_bytes(b"pickle")
    argv = ["push", str(saved), "--repo", "alice/cli-extra", "--no-parity-check"]
    for extra, expected in [([], "pytorch_model.bin: pickle files"),
                            (["--include", "*.bin", "--include", "extra/*"], "pytorch_model.bin: pickle files")]:
        assert cli.main(argv + extra) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1 and expected in err, err
    (saved / "pytorch_model.bin").unlink()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--include extra/data.csv" in err and "Traceback" not in err
    assert "alice/cli-extra" not in hub.repos
    assert cli.main(argv + ["--include", "extra/*"]) == 0
    assert "pushed " in capsys.readouterr().out
    assert "extra/data.csv" in hub.files("alice/cli-extra")


def test_cli_compress_loads_a_private_hub_model_at_a_revision_with_token(hub, tiny_tokenizer, tmp_path, capsys):
    """HF-style `--revision` picks the commit of a Hub `--model`, `--token` reads a private repository; the token
    is used for this command only and never recorded (the report keeps the command with `--token ***`)."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    api = HfApi(endpoint=hub.url)
    api.create_repo("alice/private-base", private=True, token=TOKEN)
    commits = []
    for version in (0, 1):
        folder = tmp_path / f"v{version}"
        model = make_tiny("llama")
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.mul_(1 + version)  # the second commit changes a weight
        model.save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        commits.append(api.upload_folder(repo_id="alice/private-base", folder_path=folder, token=TOKEN).oid)
    quick = [x for k, v in QUICK_EVAL.items() for x in ("--set", f"evaluation.{k}={v}")]
    base = ["compress", "--model", "alice/private-base", "--recipe", "bf16", *quick]
    capsys.readouterr()
    assert cli.main([*base, "--output", str(tmp_path / "nothing")]) == 2  # private: no token, no model
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    out = tmp_path / "first"
    assert cli.main([*base, "--revision", commits[0], "--token", TOKEN, "--output", str(out)]) == 0
    assert "HF_TOKEN" not in os.environ
    loaded = AutoModelForCausalLM.from_pretrained(out)
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "v0")
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "v1")
    weight = loaded.model.layers[0].mlp.up_proj.weight.float()
    assert torch.equal(weight, first.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16).float())
    assert not torch.equal(weight, second.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16).float())
    saved = "".join(p.read_text() for p in out.iterdir() if p.suffix in (".json", ".md", ".yaml"))
    assert TOKEN not in saved and TOKEN not in capsys.readouterr().out
    assert f"--revision {commits[0]} --token '***'" in json.loads((out / "report.json").read_text())["command"]
