"""Parity: a fixed input and the model's outputs on it, recorded at save time and checked after a reload.

`save_compressed` writes ``parity.safetensors`` with `record_parity`; before a push, `verify_parity` reloads the
artifact in a fresh Python process with the exact code its model card shows and compares (`compare_outputs`).

The outputs are compared with a tolerance (bitsandbytes 4-bit may run another CPU kernel after a reload), so a change
smaller than it passes: a LoRA adapter trained a few steps moves the logits by less, and deleting or zeroing it went
unseen. So the parity file also records the side files a stage writes (`Stage.side_files`: the kept adapter, sha256
of its weight file and of its config, under ``adapter``), and `check_parity_files` compares those bytes, whatever
the tolerance. An hfsqueeze artifact (``report.json`` of ours) without its parity file is refused too: deleting the
file must not switch the check off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..compat.bnb import guard_bnb_cpu_repack
from ..core.errors import ArtifactError, HubError
from ..core.hf import eval_mode, input_device, to_device
from ..core.stage import SideFiles, Stage
from ..evaluation.report import REPORT_SCHEMA
from ..registry import stages

PARITY_FILE = "parity.safetensors"
PARITY_SCHEMA = "hfsqueeze.parity"
# 1: input ids and outputs; 2: also the kept LoRA adapter's checksums (``adapter``: null when none was saved);
# 3: also the device type the outputs were recorded on and the kernel that computed them (``device``, ``kernel``).
PARITY_VERSION = 3
_OPT_OUT = "check_parity=False (CLI: --no-parity-check)"
PARITY_TOKENS = 16
PARITY_SEED = 20240607
# Relative to the largest reference output. Reloading the same weights is bit-exact for fp32/16-bit; bitsandbytes
# 4-bit may run a different CPU kernel after a reload (repacked weights), which moves logits by ~1e-3 of their range.
DEFAULT_PARITY_TOLERANCE = 1e-2
# Relative to the largest reference output, per kernel (`parity_kernel`): the tolerance used instead when the outputs
# are checked on another kind of device than they were recorded on (recorded on CUDA and reloaded on the CPU, or the
# reverse). The arithmetic differs there by construction (cuBLAS against the CPU's GEMMs, bitsandbytes' CUDA int8 and
# 4-bit kernels against its CPU ones, 16-bit roundings in another order); a changed config or weights still moves
# the logits by far more. Parity files before version 3 carry no device: they were recorded on the CPU.
CROSS_DEVICE_TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2, "float16": 5e-2, "bnb-int8": 5e-2, "bnb-4bit": 5e-2}
# A kernel missing above (a newer format) gets the loosest tolerance of the table.
_UNKNOWN_KERNEL_TOLERANCE = max(CROSS_DEVICE_TOLERANCE.values())


def parity_input_ids(config: Any, tokens: int = PARITY_TOKENS) -> torch.Tensor:
    """The fixed parity input: ``tokens`` pseudo-random ids below the vocabulary size, shape ``[1, tokens]``."""
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise ArtifactError(f"cannot build a parity input: the config has vocab_size={vocab!r}")
    generator = torch.Generator().manual_seed(PARITY_SEED)
    return torch.randint(0, vocab, (1, tokens), generator=generator)


def parity_kernel(model: Any) -> str:
    """What computes ``model``'s outputs, as `CROSS_DEVICE_TOLERANCE` names it: ``bnb-int8``, ``bnb-4bit``, or the
    dtype of its floating weights (``float32``, ``bfloat16``, ``float16``). Class names only: no bnb import."""
    names = {type(m).__name__ for m in model.modules()}
    if "Linear8bitLt" in names:
        return "bnb-int8"
    if "Linear4bit" in names:
        return "bnb-4bit"
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).replace("torch.", "")


def parity_tolerance(meta: dict[str, Any], device_type: str, tolerance: float = DEFAULT_PARITY_TOLERANCE
                     ) -> tuple[float, str]:
    """The relative tolerance for outputs recorded as ``meta`` says and checked on ``device_type``, and a phrase
    saying why (empty when both ran on the same kind of device, where ``tolerance`` applies)."""
    recorded = str(meta.get("device") or "cpu")
    if recorded == device_type:
        return tolerance, ""
    kernel = str(meta.get("kernel") or "unknown")
    cross = CROSS_DEVICE_TOLERANCE.get(kernel, _UNKNOWN_KERNEL_TOLERANCE)
    return max(tolerance, cross), (f"recorded on {recorded}, checked on {device_type}: the cross-device tolerance "
                                   f"for {kernel}, {cross:g} of the largest output (CROSS_DEVICE_TOLERANCE)")


def _outputs(model: Any, input_ids: torch.Tensor) -> tuple[str, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=to_device(input_ids, model))
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return name, value.detach().float().cpu().contiguous()
    raise ArtifactError(f"cannot record parity: {type(model).__name__} returns neither logits nor last_hidden_state")


def record_parity(model: Any, out_dir: str | os.PathLike) -> Path:
    """Run ``model`` on the fixed parity input and write the ids and outputs to ``out_dir/parity.safetensors``.

    The model is run in eval mode (restored afterwards). bitsandbytes 4-bit layers are kept from repacking their
    weights for the CPU kernel during this forward, so the live model can still be saved correctly afterwards.

    Args:
        model (`PreTrainedModel`): the model exactly as it is being saved.
        out_dir (`str` or `os.PathLike`): the artifact directory.

    Returns:
        `Path`: the written file.

    Example:

    ```python
    model.save_pretrained("out")
    record_parity(model, "out")
    ```
    """
    input_ids = parity_input_ids(model.config)
    with eval_mode(guard_bnb_cpu_repack(model)):
        name, outputs = _outputs(model, input_ids)
    side = {}
    for stage, declared in _side_files():  # written beside the weights by then (`Stage.on_save`)
        side[declared.key] = None
        if stage.has_side_files(model):
            missing = [f for f in declared.names if not (Path(out_dir) / f).is_file()]
            if missing:
                raise ArtifactError(f"cannot record parity: the model carries a {declared.name} but {out_dir} has "
                                    f"no {', '.join(missing)}; write the {declared.key} files first")
            side[declared.key] = stage.side_file_checksums(Path(out_dir))
    path = Path(out_dir) / PARITY_FILE
    save_file({"input_ids": input_ids.contiguous(), "outputs": outputs}, str(path),
              metadata={"hfsqueeze": json.dumps(  # one key: safetensors writes several in random order
                  {"schema": PARITY_SCHEMA, "version": PARITY_VERSION, "output": name, "model": type(model).__name__,
                   **side, "device": input_device(model).type, "kernel": parity_kernel(model)},
                  sort_keys=True)})
    return path


def _side_files() -> list[tuple[Stage, SideFiles]]:
    """The registered stages that write side files into artifacts (`Stage.side_files`: a kept LoRA adapter), each
    with its declaration; the parity file records each one's checksums under its key."""
    return [(stage, declared) for stage in stages() if (declared := stage.side_files()) is not None]


def is_parity_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a parity file hfsqueeze wrote (a safetensors file carrying our schema tag)."""
    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("hfsqueeze", "{}"))
    except Exception:  # noqa: BLE001 - missing, truncated or foreign file: not ours
        return False
    return isinstance(meta, dict) and meta.get("schema") == PARITY_SCHEMA


def _parity_metadata(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("hfsqueeze", "{}"))
    except Exception as exc:  # noqa: BLE001 - a damaged file is the user's problem to see, in one line
        raise ArtifactError(f"{path} is damaged ({type(exc).__name__}); re-save the artifact") from None
    if not isinstance(meta, dict) or meta.get("schema") != PARITY_SCHEMA:
        raise ArtifactError(f"{path} is not hfsqueeze's parity file (no {PARITY_SCHEMA!r} tag); re-save the artifact, "
                            f"or load it unchecked with {_OPT_OUT}")
    version = meta.get("version")
    recorded = [declared.key for _, declared in _side_files()]
    if not isinstance(version, int) or not 1 <= version <= PARITY_VERSION \
            or (version >= 2 and any(key not in meta for key in recorded)) \
            or (version >= 3 and not ("device" in meta and "kernel" in meta)):
        raise ArtifactError(f"{path} has parity version {version!r} (this hfsqueeze reads 1 to {PARITY_VERSION}; 2 "
                            "records the adapter, 3 the device and kernel); re-save the artifact with this version")
    return meta


def _saved_report(root: Path) -> dict[str, Any] | None:
    """The artifact's ``report.json`` when it is hfsqueeze's (its schema), else ``None``."""
    try:
        data = json.loads((root / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == REPORT_SCHEMA else None


def check_parity_files(artifact_dir: str | os.PathLike) -> None:
    """Check, before anything is loaded, what comparing outputs cannot: the parity file and the adapter's bytes.

    - An hfsqueeze artifact (``report.json`` of ours) must hold ``parity.safetensors``; a plain Transformers
      directory, which never had one, passes.
    - When ``report.json`` says a LoRA adapter was kept, its files must be there.
    - When the parity file records the adapter (version 2), the files must match its sha256 checksums, and an
      artifact saved without one must not hold adapter files.

    Raises:
        `ArtifactError`: one line naming the file and the opt-out (``check_parity=False``).
    """
    root = Path(artifact_dir)
    path = root / PARITY_FILE
    report = _saved_report(root)
    if not path.is_file():
        if report is not None:
            raise ArtifactError(f"{root} is an hfsqueeze artifact (report.json) but has no {PARITY_FILE}, the outputs "
                                "recorded when it was saved, so nothing shows it is what was saved; re-save it, or "
                                f"load it unchecked with {_OPT_OUT}")
        return
    meta = _parity_metadata(path)
    report_stages = report.get("stages") if report is not None else None
    for stage, declared in _side_files():
        _check_side_files(root, meta, stage, declared, report_stages if isinstance(report_stages, list) else None)


def _check_side_files(root: Path, meta: dict[str, Any], stage: Stage, declared: SideFiles,
                      report_stages: list[Any] | None) -> None:
    """One stage's side files (a kept LoRA adapter) against the report and the checksums the parity file holds."""
    present = [f for f in declared.names if (root / f).is_file()]
    missing = [f for f in declared.names if f not in present]
    if report_stages is not None and stage.kept_side_files(report_stages) and missing:
        raise ArtifactError(f"{root}: report.json says a {declared.name} was kept, but {', '.join(missing)} is "
                            f"missing; the model would load without {declared.lost} (restore the file, or load it "
                            f"unchecked with {_OPT_OUT})")
    if meta["version"] < 2:
        return  # saved before side files were recorded: report.json above and the outputs are all there is
    recorded = meta.get(declared.key)
    if recorded is None:
        if present:
            raise ArtifactError(f"{root} was saved without a {declared.name}, but holds {', '.join(present)}; remove "
                                f"them, or load it unchecked with {_OPT_OUT}")
        return
    if missing:
        raise ArtifactError(f"{root}/{PARITY_FILE} records a {declared.name}, but {', '.join(missing)} is missing; "
                            f"restore it, or load it unchecked with {_OPT_OUT}")
    got = stage.side_file_checksums(root)
    file_of = dict(zip(declared.checksums, declared.names))
    changed = [file_of.get(key, key) for key in got if not isinstance(recorded, dict) or got[key] != recorded.get(key)]
    if changed:
        raise ArtifactError(f"{root}: the {declared.name}'s {' and '.join(changed)} differs from the one recorded "
                            f"when it was saved (sha256); it was changed after saving (re-save it, or load it "
                            f"unchecked with {_OPT_OUT})")


def _read_parity(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file is the user's problem to see, in one line
        raise ArtifactError(f"{path} is damaged ({type(exc).__name__}); re-save the artifact") from None
    if "input_ids" not in tensors or "outputs" not in tensors:
        raise ArtifactError(f"{path} lacks the recorded input_ids/outputs; re-save the artifact")
    info = json.loads(meta.get("hfsqueeze", "{}"))
    return tensors, info if isinstance(info, dict) else {}


def check_saved_parity(model: Any, artifact_dir: str | os.PathLike,
                       tolerance: float = DEFAULT_PARITY_TOLERANCE) -> dict[str, Any] | None:
    """Run a freshly loaded ``model`` on the input recorded at save time and compare with the recorded outputs.

    Returns the comparison (`compare_outputs`), or ``None`` when the artifact has no parity file.

    Raises:
        `ArtifactError`: the outputs differ (config.json or the weights were changed after saving), naming how much.
    """
    path = Path(artifact_dir) / PARITY_FILE
    if not path.is_file():
        return None
    reference, meta = _read_parity(path)
    with eval_mode(guard_bnb_cpu_repack(model)):
        _, got = _outputs(model, reference["input_ids"])
    tolerance, why = parity_tolerance(meta, input_device(model).type, tolerance)
    problem, result = parity_problem(reference["outputs"], got, tolerance=tolerance, output=_output_name(meta),
                                     why=why)
    if problem:
        raise ArtifactError(f"{artifact_dir} does not reproduce the outputs recorded when it was saved: {problem}; "
                            "its config.json or weights were changed after saving (re-save it, or load with "
                            "check_parity=False to inspect it anyway)")
    return result


_RUNNER = '''\
import os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from safetensors.torch import load_file, save_file
_parity = load_file({parity!r})

{code}

model.eval()
# Inputs go where the input embeddings are (the first device of a model spread with device_map="auto").
_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
_dev = _emb.weight.device if _emb is not None else next(model.parameters()).device
with torch.no_grad():
    _out = model(input_ids=_parity["input_ids"].to(_dev))
_t = getattr(_out, "logits", None)
if _t is None:
    _t = _out.last_hidden_state
save_file({{"outputs": _t.detach().float().cpu().contiguous()}}, {result!r}, metadata={{"device": _dev.type}})
'''


def verify_parity(
    artifact_dir: str | os.PathLike,
    load_code: str | None = None,
    *,
    tolerance: float = DEFAULT_PARITY_TOLERANCE,
    timeout: float = 900,
) -> dict[str, Any]:
    """Reload the artifact in a fresh Python process and compare its outputs on the recorded input.

    Args:
        artifact_dir (`str` or `os.PathLike`): a saved artifact containing ``parity.safetensors``.
        load_code (`str`, *optional*): Python code that defines ``model`` (e.g. the card's code, pointed at
            ``artifact_dir``). Defaults to `hfsqueeze.load_compressed`, which runs no code from the artifact; pass
            code that uses ``trust_remote_code=True`` only for an artifact whose code you trust.
        tolerance (`float`, defaults to `1e-2`): allowed largest absolute difference, relative to the largest
            absolute reference output.
        timeout (`float`, defaults to `900`): seconds the reload may take.

    Returns:
        `dict`: ``output``, ``tokens``, ``max_abs_diff``, ``tolerance`` (absolute), ``top1_agreement`` (logits only).

    Raises:
        `HubError`: the reload failed, or the outputs differ; the message says what differed.

    Example:

    ```python
    verify_parity("out")
    ```
    """
    artifact = Path(artifact_dir)
    parity_path = artifact / PARITY_FILE
    if not parity_path.is_file():
        raise ArtifactError(f"{artifact} has no {PARITY_FILE} (outputs recorded at save time), so it cannot be "
                            "checked before upload; re-save it with hfsqueeze.save_compressed, or pass "
                            "check_parity=False (CLI: --no-parity-check) to push it unchecked")
    check_parity_files(artifact)
    reference, meta = _read_parity(parity_path)
    how = "the card's load code" if load_code else "hfsqueeze.load_compressed"
    if load_code is None:
        load_code = ("import hfsqueeze\n\n"
                     f"model = hfsqueeze.load_compressed({str(artifact.resolve())!r}, check_parity=False)\n")
    with tempfile.TemporaryDirectory(prefix="hfsqueeze-parity-") as tmp:
        script, result = Path(tmp) / "reload.py", Path(tmp) / "outputs.safetensors"
        script.write_text(_RUNNER.format(parity=str(parity_path.resolve()), result=str(result), code=load_code))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=timeout,
                                  cwd=tmp, env=env)
        except subprocess.TimeoutExpired:
            raise HubError(f"parity check failed: reloading {artifact} in a fresh process took more than "
                           f"{timeout:.0f} s; nothing was pushed") from None
        if proc.returncode != 0 or not result.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise HubError(f"parity check failed: reloading {artifact} in a fresh process with {how} "
                           f"raised {lines[-1] if lines else f'exit status {proc.returncode}'}; nothing was pushed")
        got = load_file(str(result))["outputs"]
        with safe_open(str(result), "pt") as fh:
            checked_on = (fh.metadata() or {}).get("device", "cpu")
    tolerance, why = parity_tolerance(meta, checked_on, tolerance)
    return {**compare_outputs(reference["outputs"], got, tolerance=tolerance, output=_output_name(meta), why=why),
            "loader": how}


def _output_name(meta: dict[str, Any]) -> str:
    return str(meta.get("output") or "outputs")


def parity_problem(expected: torch.Tensor, got: torch.Tensor, *, tolerance: float = DEFAULT_PARITY_TOLERANCE,
                   output: str = "logits", why: str = "") -> tuple[str | None, dict[str, Any]]:
    """Compare reference and reloaded outputs: ``(what differed or None, the comparison)``; ``why`` says where the
    tolerance came from when it is not the default (`parity_tolerance`)."""
    if tuple(expected.shape) != tuple(got.shape):
        return (f"the reloaded model's {output} have shape {tuple(got.shape)}, the in-memory model's "
                f"{tuple(expected.shape)}"), {"output": output}
    if not torch.isfinite(got).all():
        return f"the reloaded model's {output} contain NaN or inf", {"output": output}
    diff = (expected - got).abs()
    atol = tolerance * float(expected.abs().max().clamp_min(1e-6))
    flat = int(diff.argmax())
    position = flat // expected.shape[-1] % expected.shape[-2] if expected.dim() >= 2 else flat
    result: dict[str, Any] = {"output": output, "tokens": int(expected.shape[-2]) if expected.dim() >= 2 else 1,
                              "max_abs_diff": float(diff.max()), "tolerance": atol,
                              "relative_tolerance": tolerance, **({"tolerance_reason": why} if why else {})}
    if output == "logits":
        result["top1_agreement"] = float((expected.argmax(-1) == got.argmax(-1)).float().mean())
    if result["max_abs_diff"] <= atol:
        return None, result
    agree = f", top-1 agreement {result['top1_agreement']:.1%}" if "top1_agreement" in result else ""
    return (f"the reloaded model's {output} differ from the in-memory model's by up to {result['max_abs_diff']:.4g} "
            f"(at token {position}; allowed {atol:.3g}{f', {why}' if why else ''}{agree})"), result


def compare_outputs(expected: torch.Tensor, got: torch.Tensor, *, tolerance: float = DEFAULT_PARITY_TOLERANCE,
                    output: str = "logits", why: str = "") -> dict[str, Any]:
    """Compare reference and reloaded outputs; raise `HubError` naming what differed."""
    problem, result = parity_problem(expected, got, tolerance=tolerance, output=output, why=why)
    if problem:
        raise HubError(f"parity check failed: {problem}; nothing was pushed")
    return result


__all__ = ["CROSS_DEVICE_TOLERANCE", "DEFAULT_PARITY_TOLERANCE", "PARITY_FILE",
           "check_parity_files", "check_saved_parity", "compare_outputs", "is_parity_file", "parity_input_ids",
           "parity_kernel", "parity_problem", "parity_tolerance", "record_parity", "verify_parity"]
