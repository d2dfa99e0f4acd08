"""The storage backend abstraction: async bytes I/O plus a tensorstore address.

Modelled on zarr v3's ``Store``: ``get`` returns None for a missing object,
conditional creation is a first-class operation, listing is an async
iterator, and capabilities are properties. Every public operation goes through
the shared retry policy and comes out with builtin exceptions:

* missing object or bucket -> ``FileNotFoundError`` (naming the bucket when it
  is the bucket that is missing);
* failed precondition -> ``FileExistsError`` (only ever surfaced as
  ``put_if_absent`` returning False);
* 401/403 -> ``PermissionError`` naming the bucket and the credential source,
  never a secret;
* transient failures that outlast the retry budget -> ``ConnectionError`` or
  ``TimeoutError``.

Paths are backend-local strings without a scheme: ``bucket/key`` for object
stores, an absolute path for the file system, ``name/key`` for memory.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, ClassVar, TypeVar

import tensorstore as ts

import atomicity
from atomicity import ObjectInfo, Versioned
from cloudckpt.storage.retry import DEFAULT_POLICY, RetryPolicy, RetryStats

T = TypeVar("T")

#: Object metadata key holding the token that identifies one put_if_absent call.
CREATE_TOKEN_KEY = "cloudckpt-create-token"


class Backend(abc.ABC):
    """Async object I/O for one storage system, plus its tensorstore kvstore spec."""

    #: URL scheme this backend serves (``gs``, ``s3``, ``file``, ``memory``).
    scheme: ClassVar[str]

    def __init__(self, *, retry: RetryPolicy | None = None) -> None:
        self.retry_policy = retry or DEFAULT_POLICY
        self.stats = RetryStats()
        self._ts_context: ts.Context | None = None

    # ----------------------------------------------------------------- capabilities
    @property
    def supports_atomic_rename(self) -> bool:
        """Whether ``rename`` moves a directory atomically."""
        return False

    @property
    def supports_conditional_delete(self) -> bool:
        """Whether ``delete_versioned`` is honoured as a conditional delete."""
        return False

    @property
    def supports_writes(self) -> bool:
        return True

    @property
    def supports_listing(self) -> bool:
        return True

    def default_temporary_path_class(self) -> type[atomicity.TemporaryPath]:
        """The atomicity strategy this store's capabilities call for."""
        return atomicity.default_temporary_path_class(self)

    # ----------------------------------------------------------------------- naming
    def url(self, path: str) -> str:
        """The URL a user would write for ``path``."""
        return f"{self.scheme}://{path}"

    @abc.abstractmethod
    def kvstore_spec(self, path: str) -> dict[str, Any]:
        """The tensorstore kvstore spec addressing the directory ``path``."""

    def tensorstore_context(self) -> ts.Context:
        """The tensorstore context (connection pools, concurrency, retries) to open with."""
        if self._ts_context is None:
            self._ts_context = ts.Context(self._tensorstore_context_spec())
        return self._ts_context

    def _tensorstore_context_spec(self) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------- public API
    async def get(self, path: str, byte_range: tuple[int, int] | None = None) -> bytes | None:
        """Reads an object, or ``[start, end)`` of it; None when it does not exist."""
        if byte_range is not None:
            start, end = byte_range
            if not 0 <= start <= end:
                raise ValueError(f"invalid byte range {byte_range} for {self.url(path)}")
        return await self._retrying("get", path, lambda: self._get(path, byte_range))

    async def put(self, path: str, data: bytes) -> None:
        """Writes an object, replacing any existing one."""
        await self._retrying("put", path, lambda: self._put(path, data))

    async def put_if_absent(self, path: str, data: bytes) -> bool:
        """Creates an object only if none exists; returns whether this call created it.

        Each call tags its object with a unique token. When a retried attempt
        finds an object already there, the token tells whether an earlier
        attempt of this same call created it (success) or another writer did
        (False).
        """
        token = uuid.uuid4().hex

        async def attempt() -> bool:
            try:
                await self._create(path, data, token)
                return True
            except FileExistsError:
                return await self._created_with_token(path, token)

        return await self._retrying("put_if_absent", path, attempt)

    # ------------------------------------------------- conditional (versioned) requests
    # The commit protocol's fencing (docs/FORMAT.md, "Claims"). Each is one
    # conditional request; a precondition failure is an answer (None/False),
    # never an exception. A transient failure is retried: a retried replace
    # whose first try took effect answers None, and the caller reads back the
    # nonce it wrote to learn that it was its own.

    async def get_versioned(self, path: str) -> Versioned | None:
        """An object's bytes, version and store mtime; None when missing."""
        return await self._retrying("get", path, lambda: self._get_versioned(path))

    async def put_versioned(self, path: str, data: bytes, *, if_version: str | None) -> str | None:
        """Creates (``if_version=None``) or replaces exactly version ``if_version``.

        Returns the new version, or None when the condition did not hold.
        """
        return await self._retrying(
            "put_if_absent" if if_version is None else "put_if_match",
            path,
            lambda: self._put_versioned(path, data, if_version),
        )

    async def delete_versioned(self, path: str, version: str) -> bool:
        """Deletes exactly ``version`` (where ``supports_conditional_delete``).

        Returns False when another version is there. Stores without the
        condition delete unconditionally; the protocol is safe either way.
        """
        return await self._retrying(
            "delete_if_match", path, lambda: self._delete_versioned(path, version)
        )

    async def now(self, path: str) -> float:
        """The current time by the clock of the store holding ``path`` (claim ages use it)."""
        return await self._retrying("now", path, lambda: self._now(path))

    async def exists(self, path: str) -> bool:
        return await self._retrying("exists", path, lambda: self._exists(path))

    async def stat(self, path: str) -> ObjectInfo:
        """Size and modification time of an object; ``FileNotFoundError`` when missing."""
        return await self._retrying("stat", path, lambda: self._stat(path))

    async def size(self, path: str) -> int:
        return (await self.stat(path)).size

    async def list_prefix(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object under the directory ``prefix``, in no particular order."""
        infos = await self._retrying("list", prefix, lambda: self._list(prefix.rstrip("/")))
        for info in infos:
            yield info

    async def delete(self, path: str) -> None:
        """Deletes an object; a missing object is not an error."""
        await self._retrying("delete", path, lambda: self._delete_many([path]))

    async def delete_many(self, paths: Iterable[str]) -> None:
        batch = list(paths)
        if batch:
            await self._retrying("delete", batch[0], lambda: self._delete_many(batch))

    async def delete_prefix(self, prefix: str) -> None:
        """Deletes every object under the directory ``prefix``."""
        prefix = prefix.rstrip("/")
        doomed = [info.path async for info in self.list_prefix(prefix)]
        await self.delete_many(doomed)

    async def symlinks_under(self, prefix: str) -> list[str]:
        """Symbolic links under the directory ``prefix``, which listings skip and reads refuse.

        Only a file system has them; object stores return ``[]``.
        """
        return []

    async def rename(self, src: str, dst: str, *, claim_version: str | None = None) -> None:
        """Atomically renames the directory ``src`` to ``dst`` (where supported).

        With ``claim_version``, only while ``<src>/_CLAIM`` is that version
        (see :class:`atomicity.Store`); otherwise ``FileNotFoundError``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no atomic rename")

    async def aclose(self) -> None:
        """Releases clients bound to the running event loop."""

    # --------------------------------------------------------------- implementation
    async def _retrying(self, op: str, path: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self.retry_policy.call(op, fn, self.stats, lambda: self.url(path))
        except Exception as exc:
            raise self._translate(exc, op, path) from exc

    def _translate(self, exc: Exception, op: str, path: str) -> Exception:
        """Maps a library error to a builtin one with a useful message."""
        return exc

    async def _created_with_token(self, path: str, token: str) -> bool:
        """Whether the existing object at ``path`` was created with ``token``."""
        return False

    async def _now(self, path: str) -> float:
        return time.time()

    @abc.abstractmethod
    async def _get_versioned(self, path: str) -> Versioned | None: ...

    @abc.abstractmethod
    async def _put_versioned(
        self, path: str, data: bytes, if_version: str | None
    ) -> str | None: ...

    @abc.abstractmethod
    async def _delete_versioned(self, path: str, version: str) -> bool: ...

    @abc.abstractmethod
    async def _get(self, path: str, byte_range: tuple[int, int] | None) -> bytes | None: ...

    @abc.abstractmethod
    async def _put(self, path: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def _create(self, path: str, data: bytes, token: str) -> None:
        """Creates the object; raises ``FileExistsError`` when it exists."""

    @abc.abstractmethod
    async def _exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    async def _stat(self, path: str) -> ObjectInfo: ...

    @abc.abstractmethod
    async def _list(self, prefix: str) -> list[ObjectInfo]: ...

    @abc.abstractmethod
    async def _delete_many(self, paths: list[str]) -> None: ...
