"""Where a checkpoint or item lives: a backend plus a path within it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cloudckpt import storage as backends
from cloudckpt.storage import Backend, BackendCache


@dataclass(frozen=True)
class StoragePath:
    """A directory-like location in a backend. ``path / "name"`` joins.

    Attributes:
        backend: The backend serving the location.
        path: The backend-local path (``bucket/prefix`` or an absolute path).
    """

    backend: Backend
    path: str

    @classmethod
    def from_url(
        cls,
        url: str | os.PathLike[str] | StoragePath,
        *,
        cache: BackendCache | None = None,
        **options: Any,
    ) -> StoragePath:
        """The location ``url`` names; a ``StoragePath`` is returned as it is.

        Args:
            url: ``gs://``, ``s3://``, ``memory://``, ``file://`` or a plain path.
            cache: Where to take the backend from (and leave it, for its owner to
                close). Without one, the location gets a backend of its own,
                which the caller closes with ``aclose`` on each loop it used.
            **options: Backend options (``endpoint_url``, ``region``, ...).
        """
        if isinstance(url, StoragePath):
            if cache is not None:
                cache.adopt(url.backend)
            return url
        resolver = cache if cache is not None else backends
        backend, path = resolver.resolve(url, **options)
        return cls(backend, path)

    def __truediv__(self, name: str) -> StoragePath:
        return StoragePath(self.backend, f"{self.path.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def url(self) -> str:
        return self.backend.url(self.path)

    def kvstore_spec(self) -> dict[str, Any]:
        return self.backend.kvstore_spec(self.path)

    def __str__(self) -> str:
        return self.url
