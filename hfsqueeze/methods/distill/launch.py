"""Which distributed engine a distill run trains under (DDP, FSDP2, DeepSpeed ZeRO), checked before training and
proved after it (`shard` places the teacher for it).

Imports no training stack: `DistillStage.validate` runs these checks before a model is loaded.

Under ``accelerate launch`` the Trainer gets its engine from environment variables, and where an engine cannot run
accelerate falls back without a word: an FSDP config on CPU processes trains plain DDP, and without a CPU flag each
process trains alone (world size 1, the same run N times). hfsqueeze refuses those cases in one line instead, and
records in the report the engine that really wrapped the model.

What runs where (accelerate 1.16, DeepSpeed 0.19, torch 2.13):

- DDP: CPU (gloo) and GPU.
- DeepSpeed ZeRO-1/2/3: GPU, and CPU processes too once the Trainer asks for the ``gloo`` backend (accelerate gives
  DeepSpeed no backend on a machine without GPUs and then reports world size 1 to the Trainer).
- FSDP: GPU only. Torch's ``fully_shard`` itself runs with gloo, but accelerate engages FSDP only for a GPU-type
  backend and turns it into DDP on CPU processes. Only FSDP2 (``fsdp_version: 2``) is accepted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from ...core.errors import BackendMissingError, RecipeError

NONE, DDP, FSDP, DEEPSPEED = "none", "ddp", "fsdp", "deepspeed"
_INSTEAD = ("on CPU processes use DeepSpeed ZeRO-3 to shard parameters (accelerate launch --config_file "
            "scripts/accelerate_deepspeed_zero3.yaml) or DDP (accelerate launch --multi_gpu --num_processes N)")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True)
class Launch:
    """The engine a run was launched with: from accelerate's environment or the stage's ``training_args``.

    Attributes:
        engine: ``"none"`` (one process), ``"ddp"``, ``"fsdp"`` or ``"deepspeed"``.
        world_size: processes the launcher started (``WORLD_SIZE``).
        fsdp_version: 1 or 2 under FSDP, else ``None``.
    """

    engine: str = NONE
    world_size: int = 1
    fsdp_version: int | None = None

    @classmethod
    def detect(cls, training_args: dict[str, Any]) -> Launch:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if training_args.get("deepspeed") or _flag("ACCELERATE_USE_DEEPSPEED"):
            return cls(DEEPSPEED, world_size)
        if training_args.get("fsdp") or _flag("ACCELERATE_USE_FSDP"):
            fsdp_config = training_args.get("fsdp_config") or {}
            version = fsdp_config.get("version", fsdp_config.get("fsdp_version")) if isinstance(fsdp_config, dict) \
                else None
            return cls(FSDP, world_size, int(version or os.environ.get("FSDP_VERSION", "1") or 1))
        return cls(DDP if world_size > 1 else NONE, world_size)


def check_launch(launch: Launch, cuda: bool) -> None:
    """Refuse, before anything is trained, an engine that cannot run here (accelerate would silently replace it)."""
    if launch.engine == FSDP:
        if not cuda:
            raise RecipeError("FSDP needs GPUs: accelerate engages FSDP only with a GPU backend (nccl) and "
                              "trains CPU processes with plain DDP instead (each holding the whole model); "
                              f"{_INSTEAD}")
        if launch.fsdp_version != 2:
            raise RecipeError(f"FSDP version {launch.fsdp_version} is not supported; set fsdp_version: 2 in "
                              "the accelerate config (FSDP2, scripts/accelerate_fsdp.yaml)")
    if launch.engine == DEEPSPEED:
        if importlib.util.find_spec("deepspeed") is None:  # importing it takes seconds; this runs in validate
            raise BackendMissingError("the accelerate config asks for DeepSpeed, which is not installed; "
                                      "install it with: pip install deepspeed")
        if _flag("ACCELERATE_USE_CPU"):
            raise RecipeError("DeepSpeed does not engage with use_cpu: true (accelerate then trains plain "
                              "DDP); set use_cpu: false in the accelerate config (without GPUs DeepSpeed runs on the "
                              "CPU with gloo)")


def argument_defaults(launch: Launch, cuda: bool, on_cpu: bool) -> dict[str, Any]:
    """TrainingArguments the engine needs: where the Trainer trains and, for DeepSpeed on CPU, the gloo backend."""
    if launch.engine == DEEPSPEED:
        # Without a backend accelerate reports world size 1 to the Trainer while DeepSpeed sees every process.
        return {"use_cpu": False} if cuda else {"use_cpu": False, "ddp_backend": "gloo"}
    if launch.engine == FSDP:
        return {"use_cpu": False}  # the engine places the student on each process's GPU
    return {"use_cpu": on_cpu}


_EXPECTED_TYPES = {FSDP: ("FSDP",), DEEPSPEED: ("DEEPSPEED",), DDP: ("MULTI_CPU", "MULTI_GPU", "MULTI_XPU"),
                   NONE: ("NO",)}


def check_engaged(trainer: Any, launch: Launch) -> None:
    """Refuse a Trainer whose accelerator is not the launched engine over all processes (checked before training)."""
    seen = trainer.accelerator.distributed_type.name
    world = trainer.args.world_size
    if launch.world_size > 1 and world != launch.world_size:
        raise RecipeError(f"the launcher started {launch.world_size} processes but the Trainer sees world "
                          f"size {world} ({seen}): each process would train alone, repeating the same run; launch "
                          "DDP on CPU with accelerate launch --multi_gpu or torchrun, and check the accelerate config")
    if seen not in _EXPECTED_TYPES[launch.engine]:
        raise RecipeError(f"the launch asks for {launch.engine} but accelerate set up {seen}; refusing to "
                          f"train with another engine than the one configured ({_INSTEAD})")


def engaged(trainer: Any) -> dict[str, Any]:
    """What wrapped the student (for the report): the engine, its ZeRO stage / FSDP version, the wrapper's type."""
    state = trainer.accelerator.state
    out: dict[str, Any] = {"engine": trainer.accelerator.distributed_type.name.lower(),
                           "wrapped": type(trainer.model_wrapped).__name__}
    if getattr(state, "deepspeed_plugin", None) is not None:
        out["zero_stage"] = int(state.deepspeed_plugin.zero_stage)
    if getattr(state, "fsdp_plugin", None) is not None:
        out["fsdp_version"] = int(state.fsdp_plugin.fsdp_version)
    return out


