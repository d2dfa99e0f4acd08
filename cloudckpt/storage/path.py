"""Where a checkpoint or item lives: a backend plus a path within it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cloudckpt import storage as backends
from cloudckpt.storage import Backend


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
    def from_url(cls, url: str | os.PathLike[str] | StoragePath, **options: Any) -> StoragePath:
        if isinstance(url, StoragePath):
            return url
        backend, path = backends.resolve(url, **options)
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
