"""Pushing compressed artifacts to the Hugging Face Hub, behind a round-trip parity gate.

`push_to_hub` saves an in-memory model (or takes a saved artifact), reloads it in a fresh Python process with the
exact code the model card shows, compares its outputs on a fixed input with the ones recorded at save time
(``parity.safetensors``, written by `record_parity`), and only then uploads everything in one commit. The commit names
the head it was built on (``parent_commit``), so a retry after a lost answer can never stack a second copy.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .adapters import ADAPTER_CONFIG, hub_adapter_config
from .errors import ArtifactError, HubError
from .utils import LazyModule

torch = LazyModule("torch")  # imported on first use: the CLI reads this module's options to print --help

logger = logging.getLogger("hfsqueeze")

PARITY_FILE = "parity.safetensors"
PARITY_SCHEMA = "hfsqueeze.parity"
PARITY_TOKENS = 16
PARITY_SEED = 20240607
# Relative to the largest reference output. Reloading the same weights is bit-exact for fp32/16-bit; bitsandbytes
# 4-bit may run a different CPU kernel after a reload (repacked weights), which moves logits by ~1e-3 of their range.
DEFAULT_PARITY_TOLERANCE = 1e-2
TRANSIENT_STATUS = (429, 500, 502, 503, 504)
RETRY_BASE_SECONDS = 2.0
STALE_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth")


# ---- parity ---------------------------------------------------------------------------------------------------
def parity_input_ids(config: Any, tokens: int = PARITY_TOKENS) -> torch.Tensor:
    """The fixed parity input: ``tokens`` pseudo-random ids below the vocabulary size, shape ``[1, tokens]``."""
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise ArtifactError(f"cannot build a parity input: the config has vocab_size={vocab!r}")
    generator = torch.Generator().manual_seed(PARITY_SEED)
    return torch.randint(0, vocab, (1, tokens), generator=generator)


def _outputs(model: Any, input_ids: torch.Tensor) -> tuple[str, torch.Tensor]:
    device = getattr(model, "device", torch.device("cpu"))
    with torch.no_grad():
        out = model(input_ids=input_ids.to(device))
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
    from safetensors.torch import save_file

    from .methods.quantize import guard_bnb_cpu_repack

    input_ids = parity_input_ids(model.config)
    guard_bnb_cpu_repack(model)
    was_training = model.training
    try:
        model.eval()
        name, outputs = _outputs(model, input_ids)
    finally:
        model.train(was_training)
    path = Path(out_dir) / PARITY_FILE
    save_file({"input_ids": input_ids.contiguous(), "outputs": outputs}, str(path),
              metadata={"hfsqueeze": json.dumps(  # one key: safetensors writes several in random order
                  {"schema": PARITY_SCHEMA, "version": 1, "output": name, "model": type(model).__name__},
                  sort_keys=True)})
    return path


def is_parity_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a parity file hfsqueeze wrote (a safetensors file carrying our schema tag)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("hfsqueeze", "{}"))
    except Exception:  # noqa: BLE001 - missing, truncated or foreign file: not ours
        return False
    return isinstance(meta, dict) and meta.get("schema") == PARITY_SCHEMA


def _read_parity(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file is the user's problem to see, in one line
        raise ArtifactError(f"{path} is damaged ({type(exc).__name__}); re-save the artifact") from None
    if "input_ids" not in tensors or "outputs" not in tensors:
        raise ArtifactError(f"{path} lacks the recorded input_ids/outputs; re-save the artifact")
    return tensors, json.loads(meta.get("hfsqueeze", "{}")).get("output", "outputs")


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
    from .methods.quantize import guard_bnb_cpu_repack

    reference, output = _read_parity(path)
    guard_bnb_cpu_repack(model)
    was_training = model.training
    try:
        model.eval()
        _, got = _outputs(model, reference["input_ids"])
    finally:
        model.train(was_training)
    problem, result = parity_problem(reference["outputs"], got, tolerance=tolerance, output=output)
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
with torch.no_grad():
    _out = model(input_ids=_parity["input_ids"].to(getattr(model, "device", "cpu")))
_t = getattr(_out, "logits", None)
if _t is None:
    _t = _out.last_hidden_state
save_file({{"outputs": _t.detach().float().cpu().contiguous()}}, {result!r})
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
    from safetensors.torch import load_file

    artifact = Path(artifact_dir)
    parity_path = artifact / PARITY_FILE
    if not parity_path.is_file():
        raise ArtifactError(f"{artifact} has no {PARITY_FILE} (outputs recorded at save time), so it cannot be "
                            "checked before upload; re-save it with hfsqueeze.save_compressed, or pass "
                            "check_parity=False (CLI: --no-parity-check) to push it unchecked")
    reference, output = _read_parity(parity_path)
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
    return {**compare_outputs(reference["outputs"], got, tolerance=tolerance, output=output), "loader": how}


def parity_problem(expected: torch.Tensor, got: torch.Tensor, *, tolerance: float = DEFAULT_PARITY_TOLERANCE,
                   output: str = "logits") -> tuple[str | None, dict[str, Any]]:
    """Compare reference and reloaded outputs: ``(what differed or None, the comparison)``."""
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
                              "relative_tolerance": tolerance}
    if output == "logits":
        result["top1_agreement"] = float((expected.argmax(-1) == got.argmax(-1)).float().mean())
    if result["max_abs_diff"] <= atol:
        return None, result
    agree = f", top-1 agreement {result['top1_agreement']:.1%}" if "top1_agreement" in result else ""
    return (f"the reloaded model's {output} differ from the in-memory model's by up to {result['max_abs_diff']:.4g} "
            f"(at token {position}; allowed {atol:.3g}{agree})"), result


def compare_outputs(expected: torch.Tensor, got: torch.Tensor, *, tolerance: float = DEFAULT_PARITY_TOLERANCE,
                    output: str = "logits") -> dict[str, Any]:
    """Compare reference and reloaded outputs; raise `HubError` naming what differed."""
    problem, result = parity_problem(expected, got, tolerance=tolerance, output=output)
    if problem:
        raise HubError(f"parity check failed: {problem}; nothing was pushed")
    return result


# ---- auth -----------------------------------------------------------------------------------------------------
def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def resolve_token(token: str | None = None) -> str:
    """The token from the argument, ``HF_TOKEN`` or the cached login; `HubError` when there is none."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubError("no Hugging Face token: pass token=..., set the HF_TOKEN environment variable, or run "
                       "`hf auth login`")
    return found


def _api(endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint)


def _whoami(api: Any, token: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return api.whoami(token=token)["name"]
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubError(f"the Hub at {api.endpoint} rejected the token ({status}); pass a valid write token via "
                           "token=..., HF_TOKEN or `hf auth login`") from None
        raise HubError(f"cannot check the token with the Hub at {api.endpoint}: HTTP {status}") from None
    except (OSError, ConnectionError) as exc:
        raise HubError(f"cannot reach the Hub at {api.endpoint}: {type(exc).__name__}") from None
    except Exception as exc:
        if _is_network_error(exc):
            raise HubError(f"cannot reach the Hub at {api.endpoint}: {type(exc).__name__}") from None
        raise


def _is_network_error(exc: BaseException) -> bool:
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover (older huggingface_hub)
        import httpx
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


# ---- push -----------------------------------------------------------------------------------------------------
def _artifact_config(path: Path) -> Any:
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception:  # a stage's own model_type: the snippet functions get the plain dict
        return json.loads((path / "config.json").read_text())


def _remote_readme(api: Any, repo_id: str, token: str) -> str | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = hf_hub_download(repo_id, "README.md", token=token, endpoint=api.endpoint, local_dir=tmp)
            return Path(path).read_text()
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None


def _local_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                          for part in p.relative_to(path).parts))


def push_to_hub(
    model_or_dir: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    report: Any = None,
    endpoint: str | None = None,
    check_parity: bool = True,
    parity_tolerance: float = DEFAULT_PARITY_TOLERANCE,
    max_retries: int = 3,
    trust_remote_code: bool = False,
):
    """Upload a compressed model (in memory or saved) with its model card, in one commit, after a parity check.

    Args:
        model_or_dir (`PreTrainedModel`, `str` or `os.PathLike`): a model in memory (saved to a temporary directory
            first) or an artifact directory written by `hfsqueeze.save_compressed`.
        repo_id (`str`): ``"owner/name"``, or ``"name"`` for the token owner's namespace.
        tokenizer (*optional*): saved with an in-memory model.
        private (`bool`, defaults to `False`): create the repository as private (an existing one keeps its setting).
        token (`str`, *optional*): a write token; defaults to ``HF_TOKEN``, then the cached login.
        commit_message (`str`, *optional*): defaults to a summary of the recipe.
        report (`CompressionReport`, *optional*): for an in-memory model; defaults to ``model.hfsqueeze_report``.
        endpoint (`str`, *optional*): the Hub URL; defaults to ``HF_ENDPOINT``.
        check_parity (`bool`, defaults to `True`): reload and compare before uploading.
        parity_tolerance (`float`, defaults to `1e-2`): see `verify_parity`.
        max_retries (`int`, defaults to `3`): retries of the commit on transient errors (429, 5xx, network).
        trust_remote_code (`bool`, defaults to `False`): off, the artifact's Python files must be exactly the ones
            hfsqueeze generates (anything else is refused, never run or uploaded) and the parity reload uses
            `hfsqueeze.load_compressed`; on, the parity reload runs the card's own load code.

    Returns:
        `huggingface_hub.CommitInfo`: the commit (``.oid``, ``.commit_url``).

    Raises:
        `HubError`: no or rejected token, failed parity check, or an upload that failed (nothing was committed).

    Example:

    ```python
    hfsqueeze.push_to_hub(model, "acme/smollm2-135m-int8", tokenizer=tok, private=True)
    hfsqueeze.push_to_hub("out/", "acme/smollm2-135m-int8")
    ```
    """
    token = resolve_token(token)
    try:
        return _push(model_or_dir, repo_id, tokenizer=tokenizer, private=private, token=token,
                     commit_message=commit_message, report=report, endpoint=endpoint, check_parity=check_parity,
                     parity_tolerance=parity_tolerance, max_retries=max_retries,
                     trust_remote_code=trust_remote_code)
    except HubError as exc:
        raise HubError(_scrub(str(exc), token)) from None


def _push(model_or_dir, repo_id, *, tokenizer, private, token, commit_message, report, endpoint, check_parity,
          parity_tolerance, max_retries, trust_remote_code):
    from .card import merge_model_card, render_model_card
    from .save import check_artifact_code, load_snippet, save_compressed

    api = _api(endpoint)
    user = _whoami(api, token)
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    with tempfile.TemporaryDirectory(prefix="hfsqueeze-push-") as tmp:
        if isinstance(model_or_dir, (str, os.PathLike)):
            artifact = Path(model_or_dir)
            if not (artifact / "config.json").is_file():
                raise ArtifactError(f"{artifact} is not a saved artifact (no config.json); save one with "
                                    "hfsqueeze.save_compressed(model, dir) or pass the model itself")
        else:
            artifact = save_compressed(model_or_dir, Path(tmp) / "artifact", tokenizer, report=report)
            if not (artifact / PARITY_FILE).is_file():
                record_parity(model_or_dir, artifact)
        config = _artifact_config(artifact)
        # Before anything from the artifact can run (parity reload) or be published: its code must be ours.
        check_artifact_code(artifact, config, trust_remote_code=trust_remote_code)
        parity = None
        if check_parity:
            code = load_snippet(config, str(artifact.resolve())) if trust_remote_code else None
            parity = verify_parity(artifact, code, tolerance=parity_tolerance)
            logger.info("parity check passed: max |diff| %.3g over %d tokens", parity["max_abs_diff"],
                        parity["tokens"])
        else:
            logger.warning("pushing %s without the parity check", artifact)

        report_d = json.loads((artifact / "report.json").read_text()) if (artifact / "report.json").is_file() \
            else None
        recipe_yaml = (artifact / "recipe.yaml").read_text() if (artifact / "recipe.yaml").is_file() else None
        card = render_model_card(config, report_d, load_code=load_snippet(config, repo_id), recipe_yaml=recipe_yaml,
                                 repo_id=repo_id, out_dir=artifact, parity=parity)
        _create_repo(api, repo_id, private, token)
        info = api.model_info(repo_id, token=token)
        if private and not info.private:
            logger.warning("%s already exists and is public; private=True only applies to new repositories", repo_id)
        card = merge_model_card(_remote_readme(api, repo_id, token), card)
        readme = str(card).encode()
        message = commit_message or _default_message(report_d)
        description = "Pushed with hfsqueeze" + (
            f"; the artifact was reloaded in a fresh process and matched (max |diff| {parity['max_abs_diff']:.3g})."
            if parity else " without a parity check.")
        return _commit_with_retries(api, repo_id, artifact, readme, message, description, token, max_retries,
                                    parent=info.sha)


def _default_message(report: dict[str, Any] | None) -> str:
    stages = (report or {}).get("stages") or []
    labels = [(s.get("details") or {}).get("format") or s.get("method") for s in stages]
    return f"Upload compressed model ({' + '.join(str(x) for x in labels)}) with hfsqueeze" if labels \
        else "Upload model with hfsqueeze"


def _create_repo(api: Any, repo_id: str, private: bool, token: str) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        raise HubError(f"cannot create or access the repository {repo_id!r} on {api.endpoint}: HTTP {status}"
                       + (" (the token may not have write access to this namespace)" if status in (401, 403)
                          else "")) from None


def _operations(api: Any, repo_id: str, artifact: Path, readme: bytes, token: str) -> list:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme)]
    local = set()
    for path in _local_files(artifact):
        name = path.relative_to(artifact).as_posix()
        if name == "README.md":
            continue
        local.add(name)
        content = hub_adapter_config(path, repo_id) if name == ADAPTER_CONFIG else str(path)
        ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    # Weights left over from an earlier push with another layout (e.g. shards) would shadow the new ones.
    for name in api.list_repo_files(repo_id, token=token):
        if name not in local and name.endswith(STALE_WEIGHT_SUFFIXES):
            ops.append(CommitOperationDelete(path_in_repo=name))
    return ops


def _commit_with_retries(api, repo_id, artifact, readme, message, description, token, max_retries, *, parent):
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(max_retries + 1):
        try:
            ops = _operations(api, repo_id, artifact, readme, token)
            info = api.create_commit(repo_id, ops, commit_message=message, token=token, parent_commit=parent,
                                     commit_description=description)
            logger.info("pushed %s: %s", repo_id, info.commit_url)
            return info
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status == 412:
                raise HubError(f"push to {repo_id} refused: the repository changed while uploading (it is no longer "
                               f"at {parent[:8]}); nothing was committed, push again") from None
            if status not in TRANSIENT_STATUS or attempt == max_retries:
                server = ""
                if exc.response is not None:
                    server = exc.response.headers.get("X-Error-Message") or ""
                raise HubError(f"push to {repo_id} failed with HTTP {status}" + (f" ({server})" if server else "")
                               + f" after {attempt + 1} attempt(s); nothing was committed") from None
            reason = f"HTTP {status}"
        except Exception as exc:
            if not _is_network_error(exc):
                raise
            # The answer is lost: the commit may or may not have landed. The head tells.
            head = api.model_info(repo_id, token=token).sha
            if head != parent:
                raise HubError(f"the connection to {api.endpoint} broke during the commit and {repo_id} moved from "
                               f"{parent[:8]} to {head[:8]}; check that commit before pushing again") from None
            if attempt == max_retries:
                raise HubError(f"push to {repo_id} failed: {type(exc).__name__} after {attempt + 1} attempt(s); "
                               "nothing was committed") from None
            reason = type(exc).__name__
        wait = RETRY_BASE_SECONDS * 2**attempt
        logger.warning("push to %s failed (%s); retrying in %.0f s (%d/%d)", repo_id, reason, wait, attempt + 1,
                       max_retries)
        time.sleep(wait)
    raise AssertionError("unreachable")


# ---- CLI ------------------------------------------------------------------------------------------------------
def _push_flags(parser: Any) -> None:
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--commit-message", default=None, help="Hub commit message")
    parser.add_argument("--no-parity-check", dest="check_parity", action="store_false",
                        help="skip the reload parity check before uploading")
    if not any("--trust-remote-code" in a.option_strings for a in parser._actions):
        parser.add_argument("--trust-remote-code", action="store_true",
                            help="allow Python code in the artifact that hfsqueeze did not generate, and run the "
                                 "card's own load code for the parity check")


def add_push_parser(subparsers: Any) -> Any:
    """Add ``hfsqueeze push DIR --repo ID`` to an argparse ``subparsers``; its handler is `run_push`."""
    parser = subparsers.add_parser(
        "push", help="upload a saved artifact with its model card, after a reload parity check",
        description="Upload a saved hfsqueeze artifact to the Hugging Face Hub in one commit. The token comes from "
                    "HF_TOKEN or `hf auth login` (never from the command line, which the report records).",
    )
    parser.add_argument("artifact", metavar="DIR", help="artifact directory written by `hfsqueeze compress --output`")
    parser.add_argument("--repo", required=True, metavar="ID", help="Hub repository id (owner/name, or name)")
    _push_flags(parser)
    return parser


def add_push_options(parser: Any) -> None:
    """Add ``--push-to-hub REPO`` (and ``--private``, ``--commit-message``, ``--no-parity-check``) to ``compress``."""
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="after compressing, push to this Hub repository (owner/name, or name); the token "
                             "comes from HF_TOKEN or `hf auth login`")
    _push_flags(parser)


def check_push_args(args: Any) -> None:
    """Fail before any heavy work when ``--push-to-hub`` cannot succeed: a malformed repo id, no token, a token the
    Hub rejects, or a Hub that cannot be reached (one ``whoami`` call to the endpoint the push will use)."""
    repo = args.push_to_hub
    if repo.count("/") > 1 or not all(part.strip() for part in repo.split("/")):
        raise HubError(f"--push-to-hub {repo!r} is not a repository id; use owner/name or name")
    _whoami(_api(None), resolve_token(None))


def run_push(args: Any) -> int:
    """Handler of ``hfsqueeze push``: push ``args.artifact`` to ``args.repo``; returns the exit code."""
    info = push_to_hub(args.artifact, args.repo, private=args.private, commit_message=args.commit_message,
                       check_parity=args.check_parity, trust_remote_code=args.trust_remote_code)
    sys.stdout.write(f"pushed {info.commit_url}\n")
    return 0


def push_from_cli(args: Any, *, model: Any, tokenizer: Any = None, artifact: str | os.PathLike | None = None) -> Any:
    """After ``hfsqueeze compress --push-to-hub REPO``: push the saved ``artifact``, or the model in memory."""
    if not getattr(args, "push_to_hub", None):
        return None
    source = artifact if artifact else model
    info = push_to_hub(source, args.push_to_hub, tokenizer=None if artifact else tokenizer, private=args.private,
                       commit_message=args.commit_message, check_parity=args.check_parity,
                       trust_remote_code=getattr(args, "trust_remote_code", False))
    sys.stdout.write(f"pushed {info.commit_url}\n")
    return info


__all__ = [
    "PARITY_FILE",
    "add_push_options",
    "add_push_parser",
    "check_push_args",
    "check_saved_parity",
    "compare_outputs",
    "is_parity_file",
    "parity_input_ids",
    "parity_problem",
    "push_from_cli",
    "push_to_hub",
    "record_parity",
    "resolve_token",
    "run_push",
    "verify_parity",
]
