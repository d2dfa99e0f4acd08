"""The minimal async store protocol the atomicity strategies need.

A store addresses objects by slash-separated paths. Directories are implicit:
``list_prefix(p)`` yields every object whose path starts with ``p + "/"``.
Implementations live outside this package (cloudckpt's backends implement it);
this package only depends on the protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as a listing reports it.

    Attributes:
        path: Full path of the object in the store's namespace.
        size: Size in bytes.
        mtime: Last modification time in seconds since the epoch, by the
            store's clock, or None when the store does not report it.
    """

    path: str
    size: int
    mtime: float | None = None


@dataclass(frozen=True)
class Versioned:
    """An object's bytes with the version a conditional request must name.

    Attributes:
        data: The object's bytes.
        version: Opaque token (GCS generation, S3 ETag, a file's inode and
            mtime, the memory store's generation) naming exactly this version.
        mtime: When this version was written, by the store's clock, if known.
    """

    data: bytes
    version: str
    mtime: float | None = None


@runtime_checkable
class Store(Protocol):
    """What a temporary-path strategy needs from a store.

    Contract:
      * ``put_if_absent`` is a real conditional create (``If-None-Match: *``,
        ``ifGenerationMatch=0``, ``O_EXCL``/link), never exists-then-put. It
        returns True when this call created the object, False when another
        writer's object was already there.
      * ``get`` returns None for a missing object.
      * ``delete`` of a missing object is a no-op.
      * ``get_versioned``/``put_versioned``/``delete_versioned`` are single
        conditional requests on one version: ``put_versioned(p, d,
        if_version=None)`` creates only if absent, ``if_version=v`` replaces
        only version ``v``; each returns the new version, or None when the
        condition did not hold. ``delete_versioned`` deletes only version
        ``v`` where ``supports_conditional_delete``; elsewhere it deletes
        unconditionally (the protocol never relies on it for safety).
      * ``now(path)`` is the current time of the store holding ``path`` (seconds since the epoch), the
        clock claim ages are judged by.
      * ``rename`` is only called when ``supports_atomic_rename`` is True; it
        moves a whole directory atomically and raises ``FileExistsError`` when
        the destination exists. With ``claim_version``, it renames only while
        ``<src>/_CLAIM`` is still that version, checked and renamed under the
        lock every conditional change of that claim takes (so a renewal or
        another conditional act cannot slip in between); otherwise it raises
        ``FileNotFoundError`` and moves nothing.
    """

    @property
    def supports_atomic_rename(self) -> bool: ...

    async def get(self, path: str) -> bytes | None: ...

    async def exists(self, path: str) -> bool: ...

    async def put(self, path: str, data: bytes) -> None: ...

    async def put_if_absent(self, path: str, data: bytes) -> bool: ...

    @property
    def supports_conditional_delete(self) -> bool: ...

    async def get_versioned(self, path: str) -> Versioned | None: ...

    async def put_versioned(
        self, path: str, data: bytes, *, if_version: str | None
    ) -> str | None: ...

    async def delete_versioned(self, path: str, version: str) -> bool: ...

    async def now(self, path: str) -> float: ...

    def list_prefix(self, prefix: str) -> AsyncIterator[ObjectInfo]: ...

    async def delete(self, path: str) -> None: ...

    async def delete_many(self, paths: Iterable[str]) -> None: ...

    async def delete_prefix(self, prefix: str) -> None: ...

    async def rename(self, src: str, dst: str, *, claim_version: str | None = None) -> None: ...


@runtime_checkable
class ChildLister(Protocol):
    """A store that lists a directory's children without listing what is under them.

    Contract: ``list_children(prefix)`` returns the names of the immediate
    sub-directories of ``prefix`` (those holding at least one object), from a
    delimiter listing whose cost grows with the children, not with their
    objects. ``prefix`` is matched literally; a name is never empty, ``.``
    or ``..`` and never holds a ``/``.
    """

    async def list_children(self, prefix: str) -> list[str]: ...


def join(*parts: str) -> str:
    """Joins path parts with single slashes (no normalisation beyond that)."""
    out = parts[0].rstrip("/")
    for part in parts[1:]:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}" if out else part
    return out


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def parent(path: str) -> str:
    stripped = path.rstrip("/")
    if "/" not in stripped:
        return ""
    head = stripped.rsplit("/", 1)[0]
    return head or "/"
