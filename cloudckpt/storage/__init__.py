"""Storage backends, chosen by URL scheme.

``resolve("s3://bucket/run")`` returns a new backend for the scheme and the
backend-local path. Backends are registered by scheme in a table of lazily
imported classes (as fsspec's ``registry``), so a missing client library only
matters when its scheme is used, and then the error says what to install.
A third-party backend registers itself with :func:`register_backend`.

Nothing here is shared behind a caller's back: every :func:`resolve` builds
its own backend, with its own clients and retry statistics. An owner that
resolves many paths (a checkpointer, a CLI command) keeps them in a
:class:`BackendCache`, which hands out one backend per scheme and options and
closes, on request, the clients of every backend it handed out.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any

from cloudckpt.storage.base import Backend, BucketSettings
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.storage.retry import RetryPolicy, RetryStats


@dataclass(frozen=True)
class _Entry:
    """A registered scheme: the class, or where to import it from, and what to install."""

    target: type[Backend] | str  # a class, or "package.module:ClassName"
    install_hint: str | None


_REGISTRY: dict[str, _Entry] = {
    "file": _Entry("cloudckpt.storage.file:FileBackend", None),
    "memory": _Entry("cloudckpt.storage.memory:MemoryBackend", None),
    "gs": _Entry("cloudckpt.storage.gcs:GCSBackend", "pip install gcsfs"),
    "s3": _Entry("cloudckpt.storage.s3:S3Backend", "pip install s3fs"),
}
_ALIASES = {"gcs": "gs"}
_registry_lock = threading.Lock()


def register_backend(
    scheme: str, cls_or_import_path: type[Backend] | str, install_hint: str | None = None
) -> None:
    """Makes ``scheme://`` URLs resolve to a backend class.

    Args:
        scheme: The URL scheme (``"az"`` for ``az://container/prefix``): letters,
            digits and ``-``, matched case-insensitively like URLs' schemes.
            Registering a scheme again replaces the earlier entry, so a package
            may override a built-in backend on purpose; backends already made
            (held in a :class:`BackendCache`) keep serving their owners.
        cls_or_import_path: A :class:`Backend` subclass, or ``"module:ClassName"``
            to import the first time the scheme is used (so that a missing
            client library costs nothing until then).
        install_hint: What to tell a user whose import of the class fails
            (``"pip install cloudckpt-azure"``).

    The class is constructed with the caller's ``storage_options`` as keyword
    arguments, must set ``scheme`` to the registered one (nothing checks it:
    its URLs would name another scheme), and should pass
    :class:`cloudckpt.testing.conformance.BackendTests`. Process-wide and
    thread-safe; register at import time, before any path of the scheme is
    resolved.

    Raises:
        ValueError: ``scheme`` is not a valid scheme name, or it is ``gcs``
            (an alias of ``gs``: register ``gs``), or the import path has no ``:``.
        TypeError: ``cls_or_import_path`` is neither a Backend subclass nor a
            string. A lazily imported class is checked when first used.
    """
    if not scheme or not scheme.isascii() or not scheme.replace("-", "").isalnum():
        raise ValueError(f"invalid scheme {scheme!r}: use letters, digits and '-', like 'az'")
    if not isinstance(cls_or_import_path, str) and not (
        isinstance(cls_or_import_path, type) and issubclass(cls_or_import_path, Backend)
    ):
        raise TypeError(
            f"register_backend({scheme!r}, ...) needs a Backend subclass or a "
            f"'module:ClassName' string, got {cls_or_import_path!r}"
        )
    if isinstance(cls_or_import_path, str) and ":" not in cls_or_import_path:
        raise ValueError(
            f"import path {cls_or_import_path!r} must be 'module:ClassName', "
            "e.g. 'mypackage.azure:AzureBackend'"
        )
    if scheme.lower() in _ALIASES:  # resolving the alias would never reach this entry
        raise ValueError(
            f"{scheme!r} is an alias of {_ALIASES[scheme.lower()]!r}; register that scheme"
        )
    with _registry_lock:
        _REGISTRY[scheme.lower()] = _Entry(cls_or_import_path, install_hint)


def supported_schemes() -> list[str]:
    """Every registered scheme, sorted."""
    with _registry_lock:
        return sorted(_REGISTRY)


def backend_class(scheme: str) -> type[Backend]:
    """The backend class registered for ``scheme``, imported on first use.

    Raises:
        ValueError: No backend is registered for ``scheme``.
        ImportError: The backend's module (or its client library) is missing;
            the message says what to install.
    """
    scheme = _ALIASES.get(scheme, scheme)
    with _registry_lock:
        entry = _REGISTRY.get(scheme)
    if entry is None:
        raise ValueError(
            f"unsupported storage scheme {scheme!r}; supported: "
            + ", ".join(f"{s}://" for s in supported_schemes())
            + " and plain paths (register others with cloudckpt.storage.register_backend)"
        )
    if not isinstance(entry.target, str):
        return entry.target
    module_name, _, class_name = entry.target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        hint = f"; install it with: {entry.install_hint}" if entry.install_hint else ""
        raise ImportError(
            f"{scheme}:// needs {module_name}, which failed to import ({exc}){hint}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{entry.target} (registered for {scheme}://) is not a Backend subclass")
    return cls


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
    """A new backend for ``scheme`` configured with ``options``.

    The caller owns it: ``await backend.aclose()`` on each event loop it was
    used on releases its clients there.
    """
    return backend_class(_ALIASES.get(scheme, scheme))(**options)


def resolve(url: str | os.PathLike[str], **options: Any) -> tuple[Backend, str]:
    """A new backend serving ``url``, and the path within it (see :func:`get_backend`)."""
    scheme, path = split_url(url)
    return get_backend(scheme, **options), path


class BackendCache:
    """The backends one owner opened: one per scheme and options, closed by that owner.

    A checkpointer or a CLI command resolves many paths; sharing a backend
    between them keeps one client (one connection pool, one credential
    lookup) per event loop. The cache is the owner's, never the process's:
    two checkpointers never share a backend or its retry statistics.

    Thread-safe. Backends are told apart by scheme and the ``repr`` of the
    sorted options, so option values need a ``repr`` that says what they are
    (strings, numbers, booleans, a :class:`RetryPolicy` or :class:`Deadlines`).
    After :meth:`aclose` the cache and its backends stay usable: a later
    request opens new clients.
    """

    def __init__(self) -> None:
        self._backends: dict[tuple[str, str], Backend] = {}
        self._adopted: list[Backend] = []
        self._lock = threading.Lock()

    def get_backend(self, scheme: str, **options: Any) -> Backend:
        """This cache's backend for ``scheme`` and ``options``, created on first use."""
        scheme = _ALIASES.get(scheme, scheme)
        key = (scheme, repr(sorted(options.items())))
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = self._backends[key] = get_backend(scheme, **options)
        return backend

    def resolve(self, url: str | os.PathLike[str], **options: Any) -> tuple[Backend, str]:
        """This cache's backend serving ``url``, and the path within it."""
        scheme, path = split_url(url)
        return self.get_backend(scheme, **options), path

    def adopt(self, backend: Backend) -> None:
        """Also closes ``backend``'s clients in :meth:`aclose` (one the caller passed in).

        Closing a client bound to this owner's loop does not close the
        backend for its other users: each loop has its own client.
        """
        with self._lock:
            if backend not in self._backends.values() and backend not in self._adopted:
                self._adopted.append(backend)

    def backends(self) -> list[Backend]:
        """Every backend this cache created or adopted."""
        with self._lock:
            return [*self._backends.values(), *self._adopted]

    async def aclose(self) -> None:
        """Closes every backend's clients bound to the running event loop (best effort)."""
        for backend in self.backends():
            try:
                await backend.aclose()
            except Exception:  # closing is best effort: the loop is going away anyway
                pass


__all__ = [
    "Backend",
    "BackendCache",
    "BucketSettings",
    "Deadlines",
    "RetryPolicy",
    "RetryStats",
    "backend_class",
    "get_backend",
    "register_backend",
    "resolve",
    "split_url",
    "supported_schemes",
]
