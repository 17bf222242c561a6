"""Pushing compressed artifacts to the Hugging Face Hub, behind a round-trip parity gate.

`push_to_hub` saves an in-memory model (or takes a saved artifact), reloads it in a fresh Python process with the
exact code the model card shows, compares its outputs on a fixed input with the ones recorded at save time
(``parity.safetensors``, see `hfsqueeze.artifact.parity`), and only then uploads the artifact in one commit: the files
`save_compressed` writes and those the user names (`hfsqueeze.artifact.files.upload_files`), never a symbolic link, a
pickle file or the private ``tuning/`` folder unasked. The commit names the head it was built on (``parent_commit``),
so a retry after a lost answer can never stack a second copy.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .artifact.card import merge_model_card, render_model_card
from .artifact.files import upload_files
from .artifact.load import check_artifact_code, load_snippet
from .artifact.parity import DEFAULT_PARITY_TOLERANCE, verify_parity
from .artifact.save import save_compressed
from .core.errors import ArtifactError, HubError
from .registry import stages as registered_stages

logger = logging.getLogger("hfsqueeze")

TRANSIENT_STATUS = (429, 500, 502, 503, 504)
RETRY_BASE_SECONDS = 2.0
STALE_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth")


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


def check_access(token: str | None = None, endpoint: str | None = None) -> str:
    """Ask the Hub who the token belongs to: fails in one line on no token, a rejected one or an unreachable Hub."""
    return _whoami(_api(endpoint), resolve_token(token))


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
    include: Sequence[str] = (),
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
        include (`Sequence[str]`, *optional*): glob patterns (on the path inside the artifact, ``*`` crossing
            folders) of further files to upload, e.g. ``["tuning/*"]`` or ``["extra/data.csv"]``. Only the files
            `save_compressed` writes go up otherwise: ``tuning/`` (a `hfsqueeze.tune` run, calibration text included)
            and hidden files stay local, and any other file is refused. Pickle files (``*.bin``, ``*.pt``, ``*.pth``,
            ``*.pkl``, ``*.pickle``, ``*.ckpt``) are never uploaded, even when named.

    Returns:
        `huggingface_hub.CommitInfo`: the commit (``.oid``, ``.commit_url``).

    Raises:
        `HubError`: no or rejected token, failed parity check, or an upload that failed (nothing was committed).
        `ArtifactError`: before anything runs or is uploaded: a symbolic link anywhere in the artifact, a file it
            should not hold (a pickle, a file hfsqueeze does not write and ``include`` does not name), an ``include``
            pattern that matches nothing, or Python code hfsqueeze did not generate.

    Example:

    ```python
    hfsqueeze.push_to_hub(model, "acme/smollm2-135m-int8", tokenizer=tok, private=True)
    hfsqueeze.push_to_hub("out/", "acme/smollm2-135m-int8")
    hfsqueeze.push_to_hub("tuned/", "acme/smollm2-135m-tuned", include=["tuning/trials.jsonl", "tuning/pareto.png"])
    ```
    """
    include = (include,) if isinstance(include, str) else tuple(include)
    token = resolve_token(token)
    try:
        return _push(model_or_dir, repo_id, tokenizer=tokenizer, private=private, token=token,
                     commit_message=commit_message, report=report, endpoint=endpoint, check_parity=check_parity,
                     parity_tolerance=parity_tolerance, max_retries=max_retries,
                     trust_remote_code=trust_remote_code, include=include)
    except HubError as exc:
        raise HubError(_scrub(str(exc), token)) from None


def _push(model_or_dir, repo_id, *, tokenizer, private, token, commit_message, report, endpoint, check_parity,
          parity_tolerance, max_retries, trust_remote_code, include):
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
        # Before anything is read, run or uploaded: only our files and the ones the user named go up.
        files = upload_files(artifact, include)
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
                                 repo_id=repo_id, out_dir=artifact, parity=parity, files=files)
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
        return _commit_with_retries(api, repo_id, artifact, include, readme, message, description, token,
                                    max_retries, parent=info.sha)


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


def _operations(api: Any, repo_id: str, artifact: Path, include: Sequence[str], readme: bytes, token: str) -> list:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme)]
    local = set()
    # Selected again right before the commit: a link that appeared since the first check is refused, not followed.
    for name in upload_files(artifact, include, log=False):
        if name == "README.md":
            continue
        local.add(name)
        path = artifact / name
        ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=_hub_content(path, name, repo_id)))
    # Weights left over from an earlier push with another layout (e.g. shards) would shadow the new ones.
    for name in api.list_repo_files(repo_id, token=token):
        if name not in local and name.endswith(STALE_WEIGHT_SUFFIXES):
            ops.append(CommitOperationDelete(path_in_repo=name))
    return ops


def _hub_content(path: Path, name: str, repo_id: str) -> bytes | str:
    """What the Hub gets for the artifact file ``name``: the bytes the stage that wrote it as a side file says
    (`Stage.hub_file`: the adapter config's base points at the repository itself), else the file as it is."""
    for stage in registered_stages():
        declared = stage.side_files()
        if declared is not None and name in declared.names:
            content = stage.hub_file(path, repo_id)
            if content is not None:
                return content
    return str(path)


def _commit_with_retries(api, repo_id, artifact, include, readme, message, description, token, max_retries, *,
                         parent):
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(max_retries + 1):
        try:
            ops = _operations(api, repo_id, artifact, include, readme, token)
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


__all__ = ["check_access", "push_to_hub", "resolve_token"]
