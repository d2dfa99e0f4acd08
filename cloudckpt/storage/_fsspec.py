"""What the GCS and S3 backends share: an fsspec async filesystem per event loop.

gcsfs and s3fs clients hold aiohttp sessions, which belong to the event loop
that created them. A backend is shared across loops (every checkpointer owns
one), so it keeps one client per loop and closes it with ``aclose`` on that
loop. Listing caches are off: a checkpoint store must see its own writes.

Every request addresses exactly the keys it is given. ``[ ] * ? { }`` and the
rest are legal in S3 and GCS keys, so nothing here goes through fsspec's
path expansion (``_rm``, ``_find``, ``_glob``, ``_expand_path``): listings
and deletions are the stores' own requests, made by each backend
(``_list_page``, ``_delete_exact``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from atomicity import ObjectInfo
from cloudckpt.storage._stream import Buffer, place
from cloudckpt.storage.base import BACKEND_REQUESTS, Backend
from cloudckpt.storage.deadline import DEFAULT_DEADLINES, Deadlines
from cloudckpt.storage.held import held
from cloudckpt.storage.retry import RetryPolicy, error_code_of, http_status_of


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

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        read_only: bool = False,
        deadlines: Deadlines | None = None,
    ) -> None:
        super().__init__(retry=retry, read_only=read_only, deadlines=deadlines or DEFAULT_DEADLINES)
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

    def _no_bucket(self, path: str) -> FileNotFoundError:
        bucket = self.bucket_of(path)
        return FileNotFoundError(
            f"bucket {bucket!r} does not exist ({self.url(path)}); create it or fix the URL"
        )

    def _not_found_says(self, exc: BaseException) -> str | None:
        """What a 404 says is missing: ``"bucket"``, ``"object"``, or None when it does not say."""
        return None

    async def _ranged_read_into(
        self,
        path: str,
        buffers: list[Buffer],
        request: Callable[[list[Buffer]], Awaitable[int]],
        kind: str = BACKEND_REQUESTS,
    ) -> int | None:
        """``read_into``'s shared part: ``request(into)`` GETs the range into ``into``.

        Retried and hedged (named ``read``). Only the first request writes into
        ``buffers``; a hedge or a retry reads into memory of its own, copied in
        once it has won (by then every other request of the read is stopped).
        None when the object is missing; a missing bucket raises, naming it.
        """
        want = sum(b.nbytes for b in buffers)
        if want == 0:
            return 0 if await self.exists(path) else None
        first = True

        async def attempt() -> tuple[int, bytearray | None]:
            nonlocal first
            if first:
                first = False
                return await request(buffers), None
            own = bytearray(want)
            return await request([memoryview(own)]), own

        try:
            got, own = await self._retrying(
                "read", path, attempt, nbytes=want, hedge=True, kind=kind, held=held(buffers)
            )
        except FileNotFoundError as exc:
            missing_bucket = await self._missing(path, exc)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None
        if own is not None:
            place(buffers, memoryview(own)[:got])
        return got

    async def _missing(self, path: str, exc: BaseException) -> FileNotFoundError | None:
        """None when only the object at ``path`` is missing; the error to raise when its bucket is.

        Asks for nothing at the bucket level: the training identity of
        terraform/ holds object permissions and a prefix-scoped listing only.
        The object request's own error tells the two apart where it has a body
        (S3 ``NoSuchKey``/``NoSuchBucket``, GCS "No such object"/"bucket does
        not exist"); where it does not (S3 HEAD, emulators) one listing scoped
        to the object's own key decides, once per bucket and backend.
        """
        bucket = self.bucket_of(path)
        says = self._not_found_says(exc)
        if says == "object" or (says is None and bucket in self._known_buckets):
            return None
        if says is None:
            _, key = self._split(path)
            try:
                await self._list_page(bucket, key, None, 1)
            except FileNotFoundError:
                return self._no_bucket(path)
            self._known_buckets.add(bucket)
            return None
        return self._no_bucket(path)

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    async def _list_page(
        self, bucket: str, key_prefix: str, token: str | None, limit: int | None
    ) -> tuple[list[ObjectInfo], str | None]:
        """One page of objects whose keys start with ``key_prefix``, and the next page's token.

        ``FileNotFoundError`` when the bucket does not exist.
        """
        raise NotImplementedError

    async def _list_dirs_page(
        self, bucket: str, key_prefix: str, token: str | None
    ) -> tuple[list[str], str | None]:
        """One page of a delimiter listing: the common prefixes (``<key_prefix><name>/``)
        under ``key_prefix``, and the next page's token.

        ``FileNotFoundError`` when the bucket does not exist.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ operations
    async def _get(self, path: str, byte_range: tuple[int, int] | None) -> bytes | None:
        fs = await self._fs()
        start, end = byte_range if byte_range is not None else (None, None)
        if byte_range is not None and start == end:
            return b"" if await self._exists(path) else None
        try:
            return bytes(await fs._cat_file(path, start=start, end=end))
        except FileNotFoundError as exc:
            missing_bucket = await self._missing(path, exc)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None

    async def _put(self, path: str, data: bytes) -> None:
        fs = await self._fs()
        try:
            await fs._pipe_file(path, data)
        except FileNotFoundError:
            # An upload can only miss its bucket.
            raise self._no_bucket(path) from None

    async def _create(self, path: str, data: bytes, token: str) -> None:
        fs = await self._fs()
        try:
            await self._create_object(fs, path, data, token)
        except FileExistsError:
            raise
        except FileNotFoundError:
            raise self._no_bucket(path) from None
        except Exception as exc:
            if http_status_of(exc) == 501 or error_code_of(exc) == "NotImplemented":
                # S3 before August 2024, and some S3-compatible stores, refuse
                # If-None-Match on PUT. Never retry without it: that would be a
                # commit that cannot keep two writers apart.
                raise NotImplementedError(
                    f"the store at {self.url(path)} does not support create-only puts "
                    "(S3 If-None-Match: * / GCS ifGenerationMatch=0), which cloudckpt needs to "
                    "commit safely; use a store that does (see docs/CLOUDS.md)"
                ) from exc
            raise

    async def _create_object(self, fs: Any, path: str, data: bytes, token: str) -> None:
        """Create-only upload tagged with ``token``; ``FileExistsError`` when taken."""
        raise NotImplementedError

    async def _info(self, path: str) -> dict[str, Any] | None:
        """The object's metadata (``size``, a modification time, user metadata), or None."""
        raise NotImplementedError

    async def _exists(self, path: str) -> bool:
        return await self._info(path) is not None

    async def _stat(self, path: str) -> ObjectInfo:
        info = await self._info(path)
        if info is None:
            raise FileNotFoundError(f"no object at {self.url(path)}")
        return ObjectInfo(path, int(info["size"]), _mtime(info))

    async def _delete_exact(self, paths: list[str]) -> None:
        """Deletes exactly these objects (missing ones are fine), never a pattern."""
        raise NotImplementedError

    async def _list(self, prefix: str) -> list[ObjectInfo]:
        # Every page, following the continuation token: a cloud returns at most
        # 1,000 keys per page, and an emulator's page size proves nothing.
        bucket, key = self._split(prefix)
        key_prefix = key + "/" if key else ""
        found: list[ObjectInfo] = []
        token: str | None = None
        seen_tokens: set[str] = set()
        while True:
            try:
                page, token = await self._bounded(
                    "list",
                    prefix,
                    lambda t=token: self._list_page(bucket, key_prefix, t, None),
                    hedge=True,
                )
            except FileNotFoundError:
                raise self._no_bucket(prefix) from None
            found.extend(info for info in page if info.path.startswith(prefix + "/"))
            if token is None:
                break
            if token in seen_tokens:  # a server that loops would list forever
                raise OSError(f"listing {self.url(prefix)} returned the same page token twice")
            seen_tokens.add(token)
        self._known_buckets.add(bucket)
        return found

    async def _list_children(self, prefix: str) -> list[str]:
        # One delimiter listing: a page per 1,000 children, however many objects
        # each holds. Every page, as in ``_list``.
        bucket, key = self._split(prefix)
        key_prefix = key + "/" if key else ""
        names: list[str] = []
        token: str | None = None
        seen_tokens: set[str] = set()
        while True:
            try:
                page, token = await self._list_dirs_page(bucket, key_prefix, token)
            except FileNotFoundError:
                raise self._no_bucket(prefix) from None
            names.extend(
                common[len(key_prefix) : -1]
                for common in page
                if common.startswith(key_prefix) and common.endswith("/")
            )
            if token is None:
                break
            if token in seen_tokens:
                raise OSError(f"listing {self.url(prefix)} returned the same page token twice")
            seen_tokens.add(token)
        self._known_buckets.add(bucket)
        return names

    async def _delete_many(self, paths: list[str]) -> None:
        await self._delete_exact(paths)

    # --------------------------------------------------------------------- errors
    def _translate(self, exc: Exception, op: str, path: str) -> Exception:
        if isinstance(exc, (FileNotFoundError, ConnectionError, TimeoutError)):
            return exc
        status = http_status_of(exc)
        if isinstance(exc, PermissionError) or status in (401, 403) or "Forbidden" in str(exc):
            where = (
                f"access denied: {op} {self.url(path)} in bucket {self.bucket_of(path)!r} "
                f"(credentials: {self.credential_description})"
            )
            permission = denied_permission(exc)
            if permission is not None:
                return PermissionError(
                    f"{where}: the store refused {permission}; grant it to this identity on "
                    "the prefix (the terraform/ modules grant what cloudckpt needs), or use "
                    "other credentials"
                )
            return PermissionError(
                f"{where}; grant this identity read, create, list and delete on the prefix, "
                "or use other credentials"
            )
        return exc


_DENIED = (
    re.compile(r"not authorized to perform: ([A-Za-z0-9]+:[A-Za-z0-9]+)"),  # AWS
    re.compile(r"does not have ([a-z]+(?:\.[A-Za-z]+)+) access"),  # GCS
    re.compile(r"Permission '([a-z]+(?:\.[A-Za-z]+)+)' denied"),  # GCS
)


def denied_permission(exc: BaseException) -> str | None:
    """The permission a 403's body names (S3 ``s3:ListBucket``, GCS ``storage.buckets.get``)."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = f"{current} {getattr(current, 'gcs_message', '')}"
        for pattern in _DENIED:
            match = pattern.search(text)
            if match:
                return match.group(1)
        current = current.__cause__ or current.__context__
    return None
