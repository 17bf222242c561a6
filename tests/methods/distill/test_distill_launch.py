"""Distillation under ``accelerate launch``: each engine engages for real or is refused in one line.

The launch tests start two real CPU processes with the config files in ``scripts/`` and assert what wrapped the
student (the report records the wrapper's type and the world size), never only that the run finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from hfsqueeze.core.errors import RecipeError
from hfsqueeze.methods.distill import launch
from hfsqueeze.methods.distill.launch import Launch, argument_defaults, check_engaged, check_launch

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "scripts"
STEPS, BATCH, BLOCK = 3, 2, 64
RECIPE = (
    "evaluation: {max_tokens: 256, seq_len: 128, latency: false, disk_size: false}\n"
    "stages:\n  - method: distill\n    block_size: 64\n"
    "    data: {text: builtin, max_tokens: 12000, eval_tokens: 1024}\n"
    f"    training_args: {{max_steps: {STEPS}, per_device_train_batch_size: {BATCH}, learning_rate: 1.0e-3}}\n"
)
ACCELERATE_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU", "FSDP_VERSION",
                  "WORLD_SIZE")


def _launch(tmp_path: Path, model_dir: Path, launcher: list[str], port: int) -> tuple[subprocess.CompletedProcess,
                                                                                      float]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HFSQUEEZE_DISABLE_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
           "--main_process_port", str(port), str(SCRIPTS / "distill.py"), "--model", str(model_dir),
           "--recipe", str(recipe), "--output", str(tmp_path / "out"), "--report-json", str(tmp_path / "report.json")]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    return proc, time.perf_counter() - started


def _details(tmp_path: Path, proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "report.json").read_text())["stages"][0]["details"]


def _assert_trained_on_two(d: dict) -> None:
    assert d["world_size"] == 2 and d["steps"] == STEPS
    assert d["tokens_seen"] == STEPS * BATCH * 2 * BLOCK  # each process trained on its own share of every step


# ---- launches on this machine's CPU --------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_launch_wraps_the_student_in_distributed_data_parallel(tmp_path, model_dir):
    proc, seconds = _launch(tmp_path, model_dir, ["--multi_gpu"], 29531)
    d = _details(tmp_path, proc)
    _assert_trained_on_two(d)
    assert d["engine"] == "multi_cpu" and d["wrapped"] == "DistributedDataParallel"
    print(f"ddp launch: {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_launch_engages_zero_on_cpu_processes(stage, tmp_path, model_dir):
    pytest.importorskip("deepspeed")
    config = SCRIPTS / f"accelerate_deepspeed_zero{stage}.yaml"
    proc, seconds = _launch(tmp_path, model_dir, ["--config_file", str(config)], 29541 + stage)
    d = _details(tmp_path, proc)
    _assert_trained_on_two(d)
    assert d["engine"] == "deepspeed" and d["wrapped"] == "DeepSpeedEngine" and d["zero_stage"] == stage
    # ZeRO-2 shards only gradients and optimizer state, which a frozen teacher has none of; ZeRO-3 shards it.
    assert d["teacher_sharded"] == ("zero3" if stage == 3 else None)
    if stage == 3:  # each process holds about half the teacher (its norms stay whole)
        assert 0.45 < d["teacher_local_fraction"] < 0.6
    else:
        assert d["teacher_local_fraction"] == 1.0
    # The saved student is whole (ZeRO-3 partitions parameters in place; they were gathered back) and trained.
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(model_dir)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for (name, p), q in zip(before.named_parameters(), after.parameters()):
        assert p.shape == q.shape, name
    assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters()))
    assert d["perplexity_after"] > 0 and d["perplexity_after"] == d["perplexity_after"]
    print(f"deepspeed zero-{stage} launch: {seconds:.1f} s, teacher share per process {d['teacher_local_fraction']}")


@pytest.mark.slow
def test_fsdp_launch_on_cpu_is_refused_in_one_line(tmp_path, model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP runs there (tests/test_gpu.py)")
    proc, seconds = _launch(tmp_path, model_dir, ["--config_file", str(SCRIPTS / "accelerate_fsdp.yaml")], 29551)
    # A process exits 2 (user error) before loading the model; the launcher stops the other, exits 1 and prints its own
    # summary of the failed children.
    assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distill.py: error:")]
    assert errors, proc.stderr[-4000:]
    assert "stage 1 (distill): FSDP needs GPUs" in errors[0] and "accelerate_deepspeed_zero3.yaml" in errors[0]
    assert "[rank0]: Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    print("\n".join(["fsdp refusal:", errors[0]]))
    print(f"fsdp refusal: {seconds:.1f} s")


# ---- what is refused, without launching ----------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    for name in ACCELERATE_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_launch_is_read_from_accelerate_environment_and_training_args(clean_env):
    assert Launch.detect({}) == Launch("none", 1)
    clean_env.setenv("WORLD_SIZE", "2")
    assert Launch.detect({}) == Launch("ddp", 2)
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_env.setenv("FSDP_VERSION", "2")
    assert Launch.detect({}) == Launch("fsdp", 2, 2)
    clean_env.delenv("ACCELERATE_USE_FSDP")
    assert Launch.detect({"fsdp": "full_shard", "fsdp_config": {"version": 2}}).engine == "fsdp"
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert Launch.detect({}).engine == "deepspeed"


def test_fsdp_without_gpus_and_fsdp1_are_refused():
    with pytest.raises(RecipeError, match="FSDP needs GPUs.*trains CPU processes with plain DDP"):
        check_launch(Launch("fsdp", 2, 2), cuda=False)
    with pytest.raises(RecipeError, match="FSDP version 1 is not supported; set fsdp_version: 2"):
        check_launch(Launch("fsdp", 2, 1), cuda=True)
    check_launch(Launch("fsdp", 2, 2), cuda=True)


def test_deepspeed_with_use_cpu_is_refused(clean_env):
    pytest.importorskip("deepspeed")
    clean_env.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(RecipeError, match="DeepSpeed does not engage with use_cpu: true"):
        check_launch(Launch("deepspeed", 2), cuda=False)


def test_deepspeed_on_cpu_processes_asks_for_gloo():
    assert argument_defaults(Launch("deepspeed", 2), cuda=False, on_cpu=True) == {"use_cpu": False,
                                                                                  "ddp_backend": "gloo"}
    assert argument_defaults(Launch("ddp", 2), cuda=False, on_cpu=True) == {"use_cpu": True}


def _trainer(kind: str, world_size: int):
    from accelerate.utils import DistributedType

    return types.SimpleNamespace(accelerator=types.SimpleNamespace(distributed_type=DistributedType[kind]),
                                 args=types.SimpleNamespace(world_size=world_size))


def test_a_silent_fallback_or_a_duplicated_run_is_refused():
    with pytest.raises(RecipeError, match="asks for fsdp but accelerate set up MULTI_CPU"):
        check_engaged(_trainer("MULTI_CPU", 2), Launch("fsdp", 2, 2))
    with pytest.raises(RecipeError, match="started 2 processes but the Trainer sees world size 1"):
        check_engaged(_trainer("NO", 1), Launch("ddp", 2))
    check_engaged(_trainer("MULTI_CPU", 2), Launch("ddp", 2))
    check_engaged(_trainer("DEEPSPEED", 2), Launch("deepspeed", 2))


# ---- FSDP2 itself on CPU (gloo), outside accelerate ----------------------------------------------------------------
FSDP2_SCRIPT = textwrap.dedent("""
    import sys, warnings, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from conftest import make_tiny
    from torch.distributed.fsdp import FSDPModule
    from hfsqueeze.methods.distill.shard import _fsdp2_shard, materialize_fsdp2
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    model = make_tiny("llama")
    ids = torch.arange(40).view(2, 20)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    _fsdp2_shard(model, torch.device("cpu"))
    layer = model.model.layers[0]
    assert isinstance(model, FSDPModule) and isinstance(layer, FSDPModule)
    local = layer.mlp.up_proj.weight.to_local()
    assert local.shape[0] * 2 == shapes["model.layers.0.mlp.up_proj.weight"][0], local.shape  # half on each rank
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref)
    materialize_fsdp2(model)
    assert not any(isinstance(m, FSDPModule) for m in model.modules()), "still wrapped"
    assert type(model).__name__ == "LlamaForCausalLM" and not model._forward_pre_hooks
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay tied
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref)
    model.load_state_dict(model.state_dict())  # no FSDP state-dict hook is left behind

    # QLoRA under FSDP: 4-bit weights stored in the training dtype while sharded, given back bit for bit as bnb stores
    # them (Params4bit, uint8), so the artifact is the one a run without FSDP writes.
    from hfsqueeze.methods.distill.shard import restore_4bit, set_quant_storage, training_dtype
    from hfsqueeze.methods.quantize.apply import apply_quantize
    from hfsqueeze.methods.quantize.config import QuantizeConfig
    model = make_tiny("llama")
    apply_quantize(model, QuantizeConfig(bits=4, quant_type="nf4"))
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_quant_storage(model, training_dtype(model)) == 14
    weight = model.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ == "Params4bit" and weight.dtype == weight.quant_storage == torch.float32
    _fsdp2_shard(model, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref)
    materialize_fsdp2(model)
    assert restore_4bit(model) == 14 and set_quant_storage(model, torch.uint8) == 14
    weight = model.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.uint8
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)
    print("rank", dist.get_rank(), "ok")
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_fsdp2_shards_a_teacher_and_a_4bit_student_and_gives_them_back_whole_on_gloo(tmp_path):
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           str(script), str(REPO / "tests")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(" ok") == 2


def test_engine_module_names_what_runs_where():
    # The refusal points at a config file that exists.
    assert "accelerate_deepspeed_zero3.yaml" in launch._INSTEAD
    for name in ("accelerate_fsdp.yaml", "accelerate_deepspeed_zero2.yaml", "accelerate_deepspeed_zero3.yaml"):
        assert (SCRIPTS / name).is_file()
