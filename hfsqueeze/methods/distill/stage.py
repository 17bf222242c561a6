"""`DistillStage`: the distill method's life: checks, recovery insertion (``recover:``), apply, card wording, and the
LoRA adapter a recovery of a quantized model keeps unmerged (its side files in the artifact, see
`hfsqueeze.compat.peft`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...compat.peft import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_removed, has_adapter, hub_adapter_config,
                            write_adapter)
from ...core.context import CompressionContext
from ...core.errors import ArtifactError, RecipeError
from ...core.search import OPTIONAL, Param
from ...core.stage import Description, ModelInfo, SearchSection, SideFiles, Stage, format_of
from .card import load_note, recovery_section
from .config import DistillConfig, check_sources, check_student, check_tasks, uses_lora
from .launch import Launch, check_launch
from .recover import expand_recovery

ADAPTER_FILES = SideFiles(key="adapter", name="LoRA adapter", names=(ADAPTER_CONFIG, ADAPTER_WEIGHTS),
                          checksums=("config_sha256", "weights_sha256"), backend="peft",
                          why="recovery kept unmerged on a quantized model", lost="its recovery")
_OPT_OUT = "check_parity=False (CLI: --no-parity-check)"


class DistillStage(Stage):
    """Knowledge distillation from a frozen teacher (see `apply_distill`); recovery after pruning (``recover:``)."""

    name = "distill"
    config_cls = DistillConfig

    def validate(self, config: DistillConfig, info: ModelInfo) -> ModelInfo | None:
        check_sources(config)
        # An engine accelerate would silently replace (FSDP on CPU processes, ...) fails before anything is measured.
        check_launch(Launch.detect(config.resolved_training_args()), torch.cuda.is_available())
        if info.frozen_by and config.adapter == "none":
            raise RecipeError(f"adapter: none cannot train after a {info.frozen_by} stage (quantized weights cannot "
                              "be fine-tuned directly); use adapter: auto or lora")
        uses_lora(config, info.quantized)
        if info.architecture:
            check_tasks(config, info.architecture)
        n_layers = check_student(config, info.num_layers)
        # A student is another model: its layer count is new and the loaded model no longer describes it.
        return info.replace(num_layers=n_layers, model=None) if config.student is not None else None

    def apply(self, model: nn.Module, config: DistillConfig, ctx: CompressionContext) -> dict[str, Any]:
        # Deferred: the training stack (transformers.Trainer, accelerate) takes seconds to import, and only a
        # recipe with a distill stage needs it; every other command stays fast.
        from .apply import apply_distill

        return apply_distill(model, config, ctx)

    def expand(self, recipe: Any) -> Any:
        return expand_recovery(recipe)

    def describe(self, config: dict[str, Any], details: dict[str, Any]) -> Description:
        teacher = config.get("teacher")
        label = "knowledge distillation" + (f" from `{teacher}`" if teacher else "")
        return Description(label=label, short=format_of(details) or "distilled", tags=["distillation"],
                           section_title="Recovery", section=recovery_section(details), load_note=load_note(details))

    @contextlib.contextmanager
    def saving(self, model: nn.Module) -> Iterator[nn.Module]:
        with adapter_removed(model):  # the weights are the quantized base; the adapter goes beside them
            yield model

    def on_save(self, model: nn.Module, directory: Path) -> None:
        write_adapter(model, directory)

    def side_files(self) -> SideFiles | None:
        return ADAPTER_FILES

    def has_side_files(self, model: nn.Module) -> bool:
        return has_adapter(model)

    def side_file_checksums(self, directory: Path) -> dict[str, str]:
        return adapter_checksums(directory)

    def kept_side_files(self, stages: list[dict[str, Any]]) -> bool:
        # The last stage that chose a route decides: a later one drops or merges an earlier adapter.
        routes = [s["details"]["route"] for s in stages
                  if isinstance(s, dict) and isinstance(s.get("details"), dict) and "route" in s["details"]]
        return bool(routes) and routes[-1] == "adapter"

    def hub_file(self, path: Path, repo_id: str) -> bytes | None:
        return hub_adapter_config(path, repo_id) if path.name == ADAPTER_CONFIG else None

    def search_section(self) -> SearchSection | None:
        # Tuned as recovery after pruning: drawn keys become a prune stage's `recover:` mapping, which `expand`
        # turns into distill stages.
        return SearchSection("recover", via="recover")

    def label(self, config: dict[str, Any]) -> str:
        return "recover"

    def search_space(self, info: ModelInfo | None = None) -> dict[str, Param]:
        return {
            OPTIONAL: Param.choice(True, False),
            "training_args.max_steps": Param.range(25, 400, log=True, integer=True),
            "alpha": Param.range(0.0, 1.0, step=0.25),
            "temperature": Param.choice(1.0, 2.0, 4.0),
        }


def adapter_checksums(artifact_dir: str | Path) -> dict[str, str]:
    """sha256 of the adapter's weight file (its bytes) and of its config (parsed, without
    ``base_model_name_or_path``, which the Hub upload rewrites to the repository id)."""
    root = Path(artifact_dir)
    digest = hashlib.sha256()
    with open(root / ADAPTER_WEIGHTS, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    try:
        config = json.loads((root / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{root / ADAPTER_CONFIG} is damaged ({type(exc).__name__}); re-save the artifact, or "
                            f"load it unchecked with {_OPT_OUT}") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{root / ADAPTER_CONFIG} is not a JSON object; re-save the artifact, or load it "
                            f"unchecked with {_OPT_OUT}")
    config.pop("base_model_name_or_path", None)
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    return {"weights_sha256": digest.hexdigest(), "config_sha256": hashlib.sha256(canonical).hexdigest()}
