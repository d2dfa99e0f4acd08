"""Storage backends, chosen by URL scheme.

``resolve("s3://bucket/run")`` returns the backend for the scheme and the
backend-local path. Backends are registered by scheme in a table of lazily
imported classes, so a missing client library only matters when its scheme is
used, and then the error says what to install.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from cloudckpt.storage.base import Backend
from cloudckpt.storage.retry import RetryPolicy, RetryStats

# scheme -> (module, class, pip requirement that provides the client library)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "file": ("cloudckpt.storage.file", "FileBackend", None),
    "memory": ("cloudckpt.storage.memory", "MemoryBackend", None),
    "gs": ("cloudckpt.storage.gcs", "GCSBackend", "gcsfs"),
    "s3": ("cloudckpt.storage.s3", "S3Backend", "s3fs"),
}
_ALIASES = {"gcs": "gs"}

_instances: dict[tuple[str, str], Backend] = {}
_lock = threading.Lock()


def supported_schemes() -> list[str]:
    return sorted(_REGISTRY)


def backend_class(scheme: str) -> type[Backend]:
    """The backend class registered for ``scheme``."""
    scheme = _ALIASES.get(scheme, scheme)
    try:
        module_name, class_name, requirement = _REGISTRY[scheme]
    except KeyError:
        raise ValueError(
            f"unsupported storage scheme {scheme!r}; supported: "
            + ", ".join(f"{s}://" for s in supported_schemes())
            + " and plain paths"
        ) from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"{scheme}:// needs {requirement}, which failed to import ({exc}); "
            f"install it with: pip install {requirement}"
        ) from exc
    return getattr(module, class_name)


def split_url(url: str | os.PathLike[str]) -> tuple[str, str]:
    """Splits a URL into (scheme, backend-local path); plain paths are ``file``."""
    text = os.fspath(url)
    if not text:
        raise ValueError("empty checkpoint path; give a URL like s3://bucket/run or a directory")
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "file", os.path.abspath(text)
    scheme = _ALIASES.get(scheme.lower(), scheme.lower())
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError(f"file URLs must be absolute (file:///path), got {text!r}")
        return "file", os.path.abspath(rest)
    backend_class(scheme)  # unknown scheme -> ValueError naming the supported ones
    bucket = rest.split("/", 1)[0]
    path = rest.rstrip("/")
    if not bucket:
        raise ValueError(f"{text!r} names no bucket; expected {scheme}://bucket/prefix")
    return scheme, path


def get_backend(scheme: str, **options: Any) -> Backend:
    """The shared backend instance for ``scheme`` configured with ``options``."""
    scheme = _ALIASES.get(scheme, scheme)
    key = (scheme, repr(sorted(options.items())))
    with _lock:
        backend = _instances.get(key)
        if backend is None:
            backend = _instances[key] = backend_class(scheme)(**options)
    return backend


def resolve(url: str | os.PathLike[str], **options: Any) -> tuple[Backend, str]:
    """The backend serving ``url`` and the path within it."""
    scheme, path = split_url(url)
    return get_backend(scheme, **options), path


def all_backends() -> list[Backend]:
    """Every backend instance created so far (to close their per-loop clients)."""
    with _lock:
        return list(_instances.values())


__all__ = [
    "Backend",
    "RetryPolicy",
    "RetryStats",
    "all_backends",
    "backend_class",
    "get_backend",
    "resolve",
    "split_url",
    "supported_schemes",
]
