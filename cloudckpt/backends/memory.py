"""``memory://`` backend: process-local, for fast unit tests only.

Objects live in one tensorstore ``memory`` key-value store shared by the whole
process, so array data written by tensorstore and the JSON objects written
through this backend sit side by side, and listing or deleting a prefix sees
both, as on a real store.
"""

from __future__ import annotations

import threading
from typing import Any

import tensorstore as ts

from atomicity import ObjectInfo
from cloudckpt.backends.base import Backend

# One context, hence one memory key-value store, for the whole process.
_CONTEXT = ts.Context()
_KVSTORE = ts.KvStore.open({"driver": "memory"}, context=_CONTEXT).result()
# Serialises check-and-create: every conditional create in the process goes
# through this backend, so a lock makes it atomic.
_CREATE_LOCK = threading.Lock()


class MemoryBackend(Backend):
    """In-process object store addressed as ``memory://<name>/<key>``."""

    scheme = "memory"

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        return {"driver": "memory", "path": path.rstrip("/") + "/"}

    def tensorstore_context(self) -> ts.Context:
        return _CONTEXT

    async def _get(self, path: str, byte_range: tuple[int, int] | None) -> bytes | None:
        kwargs = {} if byte_range is None else {"byte_range": slice(*byte_range)}
        result = await _KVSTORE.read(path, **kwargs)
        return None if result.state == "missing" else bytes(result.value)

    async def _put(self, path: str, data: bytes) -> None:
        await _KVSTORE.write(path, bytes(data))

    async def _create(self, path: str, data: bytes, token: str) -> None:
        with _CREATE_LOCK:
            if _KVSTORE.read(path).result().state != "missing":
                raise FileExistsError(self.url(path))
            _KVSTORE.write(path, bytes(data)).result()

    async def _exists(self, path: str) -> bool:
        return (await _KVSTORE.read(path)).state != "missing"

    async def _stat(self, path: str) -> ObjectInfo:
        result = await _KVSTORE.read(path)
        if result.state == "missing":
            raise FileNotFoundError(f"no object at {self.url(path)}")
        return ObjectInfo(path, len(result.value), result.stamp.time)

    async def _list(self, prefix: str) -> list[ObjectInfo]:
        start = prefix + "/"
        keys = await _KVSTORE.list(ts.KvStore.KeyRange(start, start[:-1] + "0"))
        out = []
        for key in keys:
            result = await _KVSTORE.read(key)
            if result.state != "missing":
                out.append(ObjectInfo(key.decode(), len(result.value), result.stamp.time))
        return out

    async def _delete_many(self, paths: list[str]) -> None:
        for path in paths:
            await _KVSTORE.write(path, None)
