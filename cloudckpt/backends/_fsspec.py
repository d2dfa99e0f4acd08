"""What the GCS and S3 backends share: an fsspec async filesystem per event loop.

gcsfs and s3fs clients hold aiohttp sessions, which belong to the event loop
that created them. A backend is shared across loops (every checkpointer owns
one), so it keeps one client per loop and closes it with ``aclose`` on that
loop. Listing caches are off: a checkpoint store must see its own writes.

Every request addresses exactly the keys it is given. ``[ ] * ? { }`` and the
rest are legal in S3 and GCS keys, so nothing here goes through fsspec's
path expansion (``_rm``, ``_find``, ``_glob``, ``_expand_path``): listings
and deletions are the stores' own requests, made by each backend
(``_find_exact``, ``_delete_exact``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import weakref
from typing import Any

from atomicity import ObjectInfo
from cloudckpt.backends.base import Backend
from cloudckpt.backends.retry import RetryPolicy, http_status_of


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated"):
        value = info.get(key)
        if isinstance(value, dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class FsspecObjectBackend(Backend):
    """Object-store backend on top of an fsspec ``AsyncFileSystem``."""

    def __init__(self, *, retry: RetryPolicy | None = None) -> None:
        super().__init__(retry=retry)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._known_buckets: set[str] = set()
        #: Where credentials come from, for error messages; never a secret.
        self.credential_description = "the default credential chain"

    # ------------------------------------------------------------ client per loop
    def _new_filesystem(self) -> Any:
        """A fresh asynchronous filesystem with the library's own retries off."""
        raise NotImplementedError

    async def _start(self, fs: Any) -> None:
        """Opens the filesystem's session on the running loop."""

    async def _stop(self, fs: Any) -> None:
        """Closes the filesystem's session on the running loop."""

    async def _fs(self) -> Any:
        loop = asyncio.get_running_loop()
        fs = self._clients.get(loop)
        if fs is None:
            fs = self._new_filesystem()
            await self._start(fs)
            self._clients[loop] = fs
        return fs

    async def aclose(self) -> None:
        fs = self._clients.pop(asyncio.get_running_loop(), None)
        if fs is not None:
            await self._stop(fs)

    # ----------------------------------------------------------------- bucket checks
    @staticmethod
    def bucket_of(path: str) -> str:
        return path.split("/", 1)[0]

    async def _bucket_exists(self, bucket: str) -> bool:
        raise NotImplementedError

    async def _missing(self, path: str) -> FileNotFoundError | None:
        """None when ``path``'s bucket exists (so the object alone is missing)."""
        bucket = self.bucket_of(path)
        if bucket in self._known_buckets:
            return None
        if await self._bucket_exists(bucket):
            self._known_buckets.add(bucket)
            return None
        return FileNotFoundError(
            f"bucket {bucket!r} does not exist ({self.url(path)}); create it or fix the URL"
        )

    # ------------------------------------------------------------------ operations
    async def _get(self, path: str, byte_range: tuple[int, int] | None) -> bytes | None:
        fs = await self._fs()
        start, end = byte_range if byte_range is not None else (None, None)
        if byte_range is not None and start == end:
            return b"" if await self._exists(path) else None
        try:
            return bytes(await fs._cat_file(path, start=start, end=end))
        except FileNotFoundError:
            missing_bucket = await self._missing(path)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None

    async def _put(self, path: str, data: bytes) -> None:
        fs = await self._fs()
        try:
            await fs._pipe_file(path, data)
        except FileNotFoundError:
            raise (await self._missing(path) or FileNotFoundError(self.url(path))) from None

    async def _create(self, path: str, data: bytes, token: str) -> None:
        fs = await self._fs()
        try:
            await self._create_object(fs, path, data, token)
        except FileExistsError:
            raise
        except FileNotFoundError:
            raise (await self._missing(path) or FileNotFoundError(self.url(path))) from None

    async def _create_object(self, fs: Any, path: str, data: bytes, token: str) -> None:
        """Create-only upload tagged with ``token``; ``FileExistsError`` when taken."""
        raise NotImplementedError

    async def _info(self, path: str) -> dict[str, Any] | None:
        fs = await self._fs()
        try:
            info = await fs._info(path)
        except FileNotFoundError:
            missing_bucket = await self._missing(path)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None
        return info if info.get("type") == "file" else None

    async def _exists(self, path: str) -> bool:
        return await self._info(path) is not None

    async def _stat(self, path: str) -> ObjectInfo:
        info = await self._info(path)
        if info is None:
            raise FileNotFoundError(f"no object at {self.url(path)}")
        return ObjectInfo(path, int(info["size"]), _mtime(info))

    async def _find_exact(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every object whose key starts with ``prefix + "/"``: path -> info (one listing).

        The prefix is a literal string, never a pattern.
        """
        raise NotImplementedError

    async def _delete_exact(self, paths: list[str]) -> None:
        """Deletes exactly these objects (missing ones are fine), never a pattern."""
        raise NotImplementedError

    async def _list(self, prefix: str) -> list[ObjectInfo]:
        try:
            found = await self._find_exact(prefix)
        except FileNotFoundError:
            found = {}
        if not found:
            missing_bucket = await self._missing(prefix)
            if missing_bucket is not None:
                raise missing_bucket
        return [
            ObjectInfo(path, int(info.get("size", 0)), _mtime(info))
            for path, info in found.items()
            if info.get("type", "file") == "file" and path.startswith(prefix + "/")
        ]

    async def _delete_many(self, paths: list[str]) -> None:
        await self._delete_exact(paths)

    # --------------------------------------------------------------------- errors
    def _translate(self, exc: Exception, op: str, path: str) -> Exception:
        if isinstance(exc, (FileNotFoundError, ConnectionError, TimeoutError)):
            return exc
        status = http_status_of(exc)
        if isinstance(exc, PermissionError) or status in (401, 403) or "Forbidden" in str(exc):
            return PermissionError(
                f"access denied: {op} {self.url(path)} in bucket {self.bucket_of(path)!r} "
                f"(credentials: {self.credential_description}); grant this identity read, "
                "create, list and delete on the prefix, or use other credentials"
            )
        return exc
