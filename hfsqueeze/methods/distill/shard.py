"""The teacher under a distributed engine, and the student given back whole after training.

The teacher is frozen and has neither gradients nor optimizer state, so ZeRO-1/2 (which shard only those) have
nothing of it to shard: each process holds it whole, once. Under ZeRO-3 and FSDP2 it is sharded like the student.
After training, the student's and the teacher's parameters are gathered back into whole tensors on every process,
so the rest of ``compress`` (evaluation, saving) sees ordinary modules.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ...compat.bnb import is_bnb_quantized
from .launch import DEEPSPEED, FSDP, NONE, Launch, engaged

logger = logging.getLogger("hfsqueeze")


def _zero_stage(trainer: Any) -> int:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def _teacher_ds_config(trainer: Any, teacher: nn.Module) -> dict[str, Any]:
    """The student's DeepSpeed config (its "auto" values filled by the Trainer), minus what only training needs.

    ZeRO-3 keeps parameters under ``stage3_param_persistence_threshold`` (100k elements by default) whole on every
    process; for a teacher that only runs forwards, TRL's thresholds (scaled by the hidden size) shard all but the
    smallest (norms, biases).
    """
    config = copy.deepcopy(trainer.accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        config["zero_optimization"].update({"stage3_param_persistence_threshold": 10 * hidden,
                                            "reduce_bucket_size": hidden * hidden,
                                            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)})
    return config


def local_fraction(module: nn.Module) -> float:
    """The share of a module's parameter elements this process holds (1.0 whole; about 1/N sharded N ways)."""
    held = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3: its partition, plus the whole tensor when it is kept persistent
            held, total = held + p.ds_tensor.numel() + (p.ds_numel if getattr(p, "ds_persist", False) else 0), \
                total + p.ds_numel
        elif hasattr(p, "to_local"):  # an FSDP2 DTensor
            held, total = held + p.to_local().numel(), total + p.numel()
        else:
            held, total = held + p.numel(), total + p.numel()
    return held / max(total, 1)


def _fsdp2_shard(module: nn.Module, device: torch.device) -> None:
    """Shard a frozen module with FSDP2 the way accelerate's default policy shards the student: each decoder layer
    (``_no_split_modules``), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    layer_names = set(getattr(module, "_no_split_modules", None) or [])
    for sub in module.modules():
        if sub is not module and type(sub).__name__ in layer_names:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)


def _is_4bit(param: Any) -> bool:
    return type(param).__name__ == "Params4bit"


def training_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's unquantized floating parameters: what FSDP gathers next to the 4-bit weights."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and not _is_4bit(p)), torch.float32)


def set_quant_storage(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every bitsandbytes 4-bit weight's packed bytes as ``dtype`` (bnb's ``quant_storage``); the bits stay.

    FSDP shards and gathers parameters as flat tensors of one dtype: QLoRA under FSDP needs the packed 4-bit weights
    in the training dtype (bnb's FSDP-QLoRA recipe, ``bnb_4bit_quant_storage``). The view is bit for bit the layout
    bnb itself makes for that storage dtype; ``torch.uint8`` gives back the usual one. Returns how many weights it set.
    """
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or not _is_4bit(weight) or weight.dtype == dtype:
            continue
        weight.data = weight.data.reshape(-1).view(dtype).unsqueeze(1)
        weight.quant_storage = dtype
        module.quant_storage = dtype
        count += 1
    return count


def restore_4bit(model: nn.Module) -> int:
    """Give bitsandbytes 4-bit modules back their ``Params4bit`` weight (with its quantization state) where an engine
    replaced it with a plain tensor of the same bytes (`materialize_fsdp2`); bnb keeps the state on the module for
    this (``fix_4bit_weight_quant_state_from_module``). Returns how many it restored."""
    from bitsandbytes.nn import Params4bit

    count = 0
    for module in model.modules():
        state, weight = getattr(module, "quant_state", None), getattr(module, "weight", None)
        if state is None or weight is None or _is_4bit(weight):
            continue
        module.weight = Params4bit(weight.data, requires_grad=False, quant_state=state, blocksize=state.blocksize,
                                   compress_statistics=state.nested, quant_type=state.quant_type,
                                   quant_storage=weight.dtype, module=module, bnb_quantized=True)
        count += 1
    return count


class EngineSetup(TrainerCallback):
    """Readies the student for the engine (4-bit storage under FSDP), places or shards the teacher once the Trainer
    has set up its engine, and undoes both after training."""

    def __init__(self, trainer: Any, launch: Launch):
        super().__init__()
        self.trainer = trainer
        self.launch = launch
        # Before train(): accelerate wraps the student with FSDP as training starts.
        self.quant_storage = set_quant_storage(trainer.model, training_dtype(trainer.model)) \
            if launch.engine == FSDP else 0
        self.engine: Any = None  # the teacher's DeepSpeed engine under ZeRO-3
        self.sharded = ""
        self.engaged: dict[str, Any] = {}
        self.teacher_fraction = 1.0

    @classmethod
    def of(cls, trainer: Any) -> EngineSetup:
        return next(c for c in trainer.callback_handler.callbacks if isinstance(c, cls))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The student's engine exists now, so its DeepSpeed config is complete (no "auto" values left)."""
        self.place()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Record what wrapped the student while it is still wrapped (restore unwraps an FSDP2 model in place)."""
        self.engaged = {**engaged(self.trainer), "teacher_sharded": self.sharded or None,
                        "teacher_local_fraction": self.teacher_fraction}
        if self.quant_storage:
            self.engaged["quant_storage"] = str(training_dtype(self.trainer.model)).replace("torch.", "")

    def place(self) -> None:
        """Shard the teacher under ZeRO-3 or FSDP2, else put it on the process's device (once per process)."""
        if self.engine is not None or self.sharded:
            return  # a resumed run calls on_train_begin again
        trainer, teacher = self.trainer, self.trainer.teacher
        spread = len({str(d) for d in (getattr(teacher, "hf_device_map", None) or {}).values()}) > 1
        movable = not is_bnb_quantized(teacher) and not spread
        if self.launch.engine == DEEPSPEED and _zero_stage(trainer) == 3 and movable:
            import deepspeed

            self.engine, *_ = deepspeed.initialize(model=teacher, config=_teacher_ds_config(trainer, teacher))
            self.engine.eval()
            self.sharded = "zero3"
        elif self.launch.engine == FSDP and movable:
            _fsdp2_shard(teacher, trainer.args.device)
            self.sharded = "fsdp2"
        elif movable and self.launch.engine != NONE:
            teacher.to(trainer.args.device)
        self.teacher_fraction = round(local_fraction(teacher), 3)
        logger.info("distill: teacher %s, %.0f%% of its parameters on this process",
                    f"sharded ({self.sharded})" if self.sharded else "whole", 100 * self.teacher_fraction)

    def restore(self, student: nn.Module) -> None:
        """Gather the student's and the teacher's parameters back into whole tensors on every process."""
        if self.launch.engine == DEEPSPEED and _zero_stage(self.trainer) == 3:
            engines = [self.trainer.model_wrapped] + ([self.engine] if self.engine is not None else [])
            for module, engine in ((student, engines[0]), (self.trainer.teacher, self.engine)):
                if engine is not None:
                    gather_zero3(module, engine)
        if self.launch.engine == FSDP:
            materialize_fsdp2(student)
            if self.sharded:
                materialize_fsdp2(self.trainer.teacher)
            if self.quant_storage:
                restore_4bit(student)
                set_quant_storage(student, torch.uint8)  # the artifact stores 4-bit weights as bnb always does


def gather_zero3(module: nn.Module, engine: Any) -> None:
    """Turn a ZeRO-3 partitioned module back into an ordinary one: whole parameters on every process, no hooks."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    params = list(module.parameters())
    with GatheredParameters(params, modifier_rank=None):
        whole = [p.data.detach().clone() for p in params]
    engine.destroy()  # removes ZeRO-3's gather/partition hooks from every submodule
    for p, data in zip(params, whole):
        p.data = data


def _fsdp2_hooks(state: Any) -> list[Any]:
    """Every hook handle FSDP2 registered for one ``fully_shard`` call: forward, state-dict and per-parameter ones."""
    handles = [state._pre_forward_hook_handle, state._post_forward_hook_handle]
    for group in getattr(state, "_fsdp_param_groups", []):
        handles += list(group._module_to_pre_save_state_dict_hook_handle.values())
        handles += list(group._module_to_pre_load_state_dict_hook_handle.values())
        handles += [fsdp_param._post_load_hook_handle for fsdp_param in group.fsdp_params]
    return [h for h in {id(h): h for h in handles if h is not None}.values()]


def materialize_fsdp2(module: nn.Module) -> None:
    """Turn an FSDP2 (``fully_shard``) module back into an ordinary one: whole parameters on every process.

    Torch has no public inverse of ``fully_shard``: gather the full state dict (a collective), drop FSDP's hooks, give
    every wrapped module back its own class, and register the whole tensors as its parameters (tied ones stay tied).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in module.modules()):
        return
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    # The parameter objects FSDP registered, by name, before the hooks go (tied names share one object).
    owners = [(prefix, sub) for prefix, sub in module.named_modules(remove_duplicate=False)]
    for _, sub in owners:
        if isinstance(sub, FSDPModule):
            for handle in _fsdp2_hooks(sub._get_fsdp_state()):  # noqa: SLF001 - no public API undoes fully_shard
                handle.remove()
            sub.__class__ = next(c for c in type(sub).__mro__[1:] if not issubclass(c, FSDPModule))
    replaced: dict[int, nn.Parameter] = {}
    for prefix, sub in owners:
        for attr, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                whole = full[f"{prefix}.{attr}" if prefix else attr]
                whole = whole.full_tensor() if hasattr(whole, "full_tensor") else whole
                replaced[id(param)] = nn.Parameter(whole.detach().clone(), requires_grad=param.requires_grad)
            sub._parameters[attr] = replaced[id(param)]
