"""Exception hierarchy.

Every class subclasses a builtin as well, so callers can catch either ``HfSqueezeError`` or the builtin they expect
(``ValueError`` for bad recipes, ``ImportError`` for missing backends).
"""

import contextlib
import importlib
from typing import Iterator


class HfSqueezeError(Exception):
    """Base class of every error raised on purpose by hfsqueeze."""


class RecipeError(HfSqueezeError, ValueError):
    """A recipe (YAML, dict or object) is malformed: unknown key, wrong type, impossible value, unknown method."""


class UnsupportedModelError(HfSqueezeError, ValueError):
    """The model's architecture is not supported by a stage."""


class BackendMissingError(HfSqueezeError, ImportError):
    """An optional backend (bitsandbytes, peft, ...) is not installed. The message carries the pip command."""


class ArtifactError(HfSqueezeError, OSError):
    """A saved artifact is missing, incomplete, would be overwritten, or failed its reload check."""


class HubError(HfSqueezeError, RuntimeError):
    """Pushing to or talking with the Hugging Face Hub failed (auth, network, parity gate)."""


class HfSqueezeWarning(UserWarning):
    """A stage did something other than asked (e.g. a prune target rounded); also recorded in the report."""


def require_backend(module: str, pip_name: str | None = None):
    """Import an optional backend or raise a `BackendMissingError` naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendMissingError(
            f"this stage needs the '{module}' package, which is not installed; install it with: "
            f"pip install {pip_name or module}"
        ) from exc


@contextlib.contextmanager
def prefixed(where: str) -> Iterator[None]:
    """Prefix the message of any `HfSqueezeError` raised inside with ``where`` (e.g. ``stage 2 (prune)``)."""
    try:
        yield
    except HfSqueezeError as exc:
        message = str(exc)
        raise type(exc)(message if message.startswith(f"{where}: ") else f"{where}: {message}") from None
