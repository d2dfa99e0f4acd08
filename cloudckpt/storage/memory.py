"""``memory://`` backend: process-local, for fast unit tests only.

Requests complete synchronously (tensorstore's memory driver does no I/O),
which keeps the interleaving explorer's tens of thousands of schedules fast.

Objects live in one tensorstore ``memory`` key-value store shared by the whole
process, so array data written by tensorstore and the JSON objects written
through this backend sit side by side, and listing or deleting a prefix sees
both, as on a real store.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import tensorstore as ts

from atomicity import ObjectInfo, Versioned
from cloudckpt.storage.base import Backend

# One context, hence one memory key-value store, for the whole process.
_CONTEXT = ts.Context()
_KVSTORE = ts.KvStore.open({"driver": "memory"}, context=_CONTEXT).result()
# Serialises every conditional request (check and act): each goes through this
# backend, so a lock makes it atomic, as a store's own precondition check is.
_CREATE_LOCK = threading.Lock()
# tensorstore's memory store stamps reads, not writes, with a time. Modification
# times are recorded here per (path, generation) when written through this
# backend, or when first seen otherwise: a version never looks older than it is.
_MTIMES: dict[str, tuple[str, float]] = {}


class MemoryBackend(Backend):
    """In-process object store addressed as ``memory://<name>/<key>``."""

    scheme = "memory"

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        return {"driver": "memory", "path": path.rstrip("/") + "/"}

    def tensorstore_context(self) -> ts.Context:
        return _CONTEXT

    async def _get(self, path: str, byte_range: tuple[int, int] | None) -> bytes | None:
        kwargs = {} if byte_range is None else {"byte_range": slice(*byte_range)}
        result = _KVSTORE.read(path, **kwargs).result()
        return None if result.state == "missing" else bytes(result.value)

    async def _put(self, path: str, data: bytes) -> None:
        stamp = _KVSTORE.write(path, bytes(data)).result()
        _MTIMES[path] = (bytes(stamp.generation).hex(), time.time())

    async def _create(self, path: str, data: bytes, token: str) -> None:
        with _CREATE_LOCK:
            if _KVSTORE.read(path).result().state != "missing":
                raise FileExistsError(self.url(path))
            _KVSTORE.write(path, bytes(data)).result()

    @property
    def supports_conditional_delete(self) -> bool:
        return True

    async def _get_versioned(self, path: str) -> Versioned | None:
        result = _KVSTORE.read(path).result()
        if result.state == "missing":
            return None
        return Versioned(bytes(result.value), _version(result), _mtime(path, result))

    async def _put_versioned(self, path: str, data: bytes, if_version: str | None) -> str | None:
        with _CREATE_LOCK:
            current = _KVSTORE.read(path).result()
            if if_version is None:
                if current.state != "missing":
                    return None
            elif current.state == "missing" or _version(current) != if_version:
                return None
            stamp = _KVSTORE.write(path, bytes(data)).result()
            version = bytes(stamp.generation).hex()
            _MTIMES[path] = (version, time.time())
            return version

    async def _delete_versioned(self, path: str, version: str) -> bool:
        with _CREATE_LOCK:
            current = _KVSTORE.read(path).result()
            if current.state == "missing" or _version(current) != version:
                return False
            _KVSTORE.write(path, None).result()
            return True

    async def _exists(self, path: str) -> bool:
        return _KVSTORE.read(path).result().state != "missing"

    async def _stat(self, path: str) -> ObjectInfo:
        result = await _KVSTORE.read(path)
        if result.state == "missing":
            raise FileNotFoundError(f"no object at {self.url(path)}")
        return ObjectInfo(path, len(result.value), _mtime(path, result))

    async def _list(self, prefix: str) -> list[ObjectInfo]:
        start = prefix + "/"
        keys = _KVSTORE.list(ts.KvStore.KeyRange(start, start[:-1] + "0")).result()
        out = []
        for key in keys:
            result = _KVSTORE.read(key).result()
            if result.state != "missing":
                out.append(
                    ObjectInfo(key.decode(), len(result.value), _mtime(key.decode(), result))
                )
        return out

    async def _delete_many(self, paths: list[str]) -> None:
        for path in paths:
            await _KVSTORE.write(path, None)


def _version(result: ts.KvStore.ReadResult) -> str:
    return bytes(result.stamp.generation).hex()


def _mtime(path: str, result: ts.KvStore.ReadResult) -> float:
    version = _version(result)
    known = _MTIMES.get(path)
    if known is None or known[0] != version:
        known = _MTIMES[path] = (version, time.time())
    return known[1]
