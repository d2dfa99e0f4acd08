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
  ``TimeoutError``;
* any write or delete on a backend opened with ``read_only=True`` ->
  ``PermissionError``, before a request is made.

Backends are owned, not shared: whoever creates one (directly, through
``cloudckpt.storage.resolve`` or a ``BackendCache``) closes its clients with
``aclose`` on each event loop it used.

Paths are backend-local strings without a scheme: ``bucket/key`` for object
stores, an absolute path for the file system, ``name/key`` for memory.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import tensorstore as ts

import atomicity
from atomicity import ObjectInfo, Versioned
from cloudckpt.storage.deadline import (
    Deadlines,
    Latencies,
    configure_tensorstore,
    counting_cuts,
    earlier_cuts,
    hedged,
    process_index,
    timed,
    was_cut,
    within,
)
from cloudckpt.storage.retry import DEFAULT_POLICY, RetryPolicy, RetryStats

T = TypeVar("T")

#: The kind (:meth:`Backend.latencies`) of every request a backend makes itself:
#: judged together, so that an operation made once per save (the commit
#: marker) is bounded by the answer times of the others, not by the floor.
BACKEND_REQUESTS = "backend"

#: Object metadata key holding the token that identifies one put_if_absent call.
CREATE_TOKEN_KEY = "cloudckpt-create-token"


@dataclass(frozen=True)
class BucketSettings:
    """A bucket's configuration, as its storage API reports it (``Backend.bucket_settings``).

    Each setting is the service's own answer, unparsed, so that a reader sees
    exactly what the store said; a setting that could not be read is in
    ``errors`` instead, with the exception the request raised (its message
    names the missing permission where the store says it).

    Settings by scheme:

    * ``s3``: ``"lifecycle"`` (the ``Rules`` list of GetBucketLifecycleConfiguration;
      ``[]`` when the bucket has none), ``"versioning"`` (the GetBucketVersioning
      response), ``"location"`` (the GetBucketLocation response);
    * ``gs``: ``"metadata"`` (the bucket resource of ``storage.buckets.get``).

    Attributes:
        bucket: The bucket's name.
        values: Setting name -> the store's answer.
        errors: Setting name -> why it could not be read.
    """

    bucket: str
    values: Mapping[str, Any] = field(default_factory=dict)
    errors: Mapping[str, BaseException] = field(default_factory=dict)


class Backend(abc.ABC):
    """Async object I/O for one storage system, plus its tensorstore kvstore spec.

    Args:
        retry: The retry policy of every request (default: ``DEFAULT_POLICY``).
        read_only: Refuse every write and delete with ``PermissionError``
            (a restore-only job, a shared read-only dataset).
    """

    #: URL scheme this backend serves (``gs``, ``s3``, ``file``, ``memory``).
    scheme: ClassVar[str]

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        read_only: bool = False,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.retry_policy = retry or DEFAULT_POLICY
        self.read_only = read_only
        #: Per-request deadlines and hedging (see ``deadline``); None: unbounded (local stores,
        #: where an abandoned attempt would race its own retry).
        self.deadlines = deadlines
        self.stats = RetryStats()
        self._ts_context: ts.Context | None = None
        self._latencies: dict[str, Latencies] = {}

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
        """Whether writes and deletes are allowed (False when opened ``read_only``)."""
        return not self.read_only

    @property
    def supports_put_buffers(self) -> bool:
        """Whether ``put_buffers`` writes objects straight from caller buffers (S3's)."""
        return False

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
            if self.deadlines is not None:
                configure_tensorstore(self.deadlines)
            self._ts_context = ts.Context(self._tensorstore_context_spec())
        return self._ts_context

    def _tensorstore_context_spec(self) -> dict[str, Any]:
        return {}

    def latencies(self, kind: str) -> Latencies:
        """The recent answer times of ``kind`` requests to this store (adaptive deadlines).

        ``kind`` is :data:`BACKEND_REQUESTS` (this backend's own requests) or
        a channel of the handlers (tensorstore's writes, its reads).
        """
        seen = self._latencies.get(kind)
        if seen is None:
            seen = self._latencies.setdefault(kind, Latencies(kind))
        return seen

    # ------------------------------------------------------------------- public API
    async def get(
        self,
        path: str,
        byte_range: tuple[int, int] | None = None,
        *,
        expected_size: int | None = None,
    ) -> bytes | None:
        """Reads an object, or ``[start, end)`` of it; None when it does not exist.

        ``expected_size`` (the object's listed size) sizes the request's
        deadline and hedge delay for a whole-object read; without it the
        object is taken to be small (metadata, markers).
        """
        if byte_range is not None:
            start, end = byte_range
            if not 0 <= start <= end:
                raise ValueError(f"invalid byte range {byte_range} for {self.url(path)}")
            nbytes = end - start
        else:
            nbytes = max(expected_size or 0, 0)
        return await self._retrying(
            "get", path, lambda: self._get(path, byte_range), nbytes=nbytes, hedge=True
        )

    async def put(self, path: str, data: bytes) -> None:
        """Writes an object, replacing any existing one."""
        self._check_writable("write", path)
        await self._retrying("put", path, lambda: self._put(path, data), nbytes=len(data))

    async def put_if_absent(self, path: str, data: bytes) -> bool:
        """Creates an object only if none exists; returns whether this call created it.

        Each call tags its object with a unique token. When a retried attempt
        finds an object already there, the token tells whether an earlier
        attempt of this same call created it (success) or another writer did
        (False).
        """
        self._check_writable("create", path)
        token = uuid.uuid4().hex

        async def attempt() -> bool:
            try:
                await self._create(path, data, token)
                return True
            except FileExistsError:
                return await self._created_with_token(path, token)

        return await self._retrying("put_if_absent", path, attempt, nbytes=len(data))

    # ------------------------------------------------- conditional (versioned) requests
    # The commit protocol's fencing (docs/FORMAT.md, "Claims"). Each is one
    # conditional request; a precondition failure is an answer (None/False),
    # never an exception. A transient failure is retried: a retried replace
    # whose first try took effect answers None, and the caller reads back the
    # nonce it wrote to learn that it was its own.

    async def get_versioned(self, path: str) -> Versioned | None:
        """An object's bytes, version and store mtime; None when missing."""
        return await self._retrying("get", path, lambda: self._get_versioned(path), hedge=True)

    async def put_versioned(self, path: str, data: bytes, *, if_version: str | None) -> str | None:
        """Creates (``if_version=None``) or replaces exactly version ``if_version``.

        Returns the new version, or None when the condition did not hold.
        """
        self._check_writable("write", path)
        return await self._retrying(
            "put_if_absent" if if_version is None else "put_if_match",
            path,
            lambda: self._put_versioned(path, data, if_version),
            nbytes=len(data),
        )

    async def delete_versioned(self, path: str, version: str) -> bool:
        """Deletes exactly ``version`` (where ``supports_conditional_delete``).

        Returns False when another version is there. Stores without the
        condition delete unconditionally; the protocol is safe either way.
        """
        self._check_writable("delete", path)
        return await self._retrying(
            "delete_if_match", path, lambda: self._delete_versioned(path, version)
        )

    async def now(self, path: str) -> float:
        """The current time by the clock of the store holding ``path`` (claim ages use it)."""
        return await self._retrying("now", path, lambda: self._now(path))

    async def exists(self, path: str) -> bool:
        return await self._retrying("exists", path, lambda: self._exists(path), hedge=True)

    async def stat(self, path: str) -> ObjectInfo:
        """Size and modification time of an object; ``FileNotFoundError`` when missing."""
        return await self._retrying("stat", path, lambda: self._stat(path), hedge=True)

    async def size(self, path: str) -> int:
        return (await self.stat(path)).size

    async def list_prefix(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object under the directory ``prefix``, in no particular order."""
        infos = await self._retrying(
            "list", prefix, lambda: self._list(prefix.rstrip("/")), bounded_inside=True
        )
        for info in infos:
            yield info

    async def list_children(self, prefix: str) -> list[str]:
        """Names of the immediate sub-directories of the directory ``prefix``, sorted.

        One delimiter listing (S3 ``Delimiter=/`` common prefixes, GCS
        ``delimiter=/`` prefixes, one ``scandir`` on a file system), every
        page followed: its cost grows with the number of children, not with
        the objects under them. ``prefix`` is matched literally. A name is
        never empty, ``.`` or ``..`` and never holds a ``/``, so joined back
        onto ``prefix`` it addresses exactly that child.
        """
        prefix = prefix.rstrip("/")
        names = await self._retrying(
            "list", prefix, lambda: self._list_children(prefix), hedge=True
        )
        return sorted(n for n in set(names) if n not in ("", ".", "..") and "/" not in n)

    async def delete(self, path: str) -> None:
        """Deletes an object; a missing object is not an error."""
        self._check_writable("delete", path)
        await self._retrying("delete", path, lambda: self._delete_many([path]), bounded_inside=True)

    async def delete_many(self, paths: Iterable[str]) -> None:
        batch = list(paths)
        if batch:
            self._check_writable("delete", batch[0])
            await self._retrying(
                "delete", batch[0], lambda: self._delete_many(batch), bounded_inside=True
            )

    async def delete_prefix(self, prefix: str) -> None:
        """Deletes every object under the directory ``prefix``."""
        prefix = prefix.rstrip("/")
        self._check_writable("delete", prefix)
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
        self._check_writable("rename", src)
        raise NotImplementedError(f"{type(self).__name__} has no atomic rename")

    async def bucket_settings(self, path: str) -> BucketSettings | None:
        """The configuration of the bucket holding ``path``; None where there is no bucket.

        Reads bucket-level settings, which need permissions a training identity
        usually lacks (S3 ``s3:GetLifecycleConfiguration``,
        ``s3:GetBucketVersioning``, ``s3:GetBucketLocation``; GCS
        ``storage.buckets.get``): a read that fails (refused, or any other
        error) lands in :attr:`BucketSettings.errors` and never raises. One
        attempt per setting, no retries: this is a diagnostic. The default
        (backends without buckets: file, memory) returns None without I/O.
        """
        return None

    async def aclose(self) -> None:
        """Releases this backend's clients bound to the running event loop.

        The owner of a backend calls it on every event loop it used the
        backend on, before that loop closes. The backend stays usable: a
        later request opens a new client.
        """

    # --------------------------------------------------------------- implementation
    def _check_writable(self, op: str, path: str) -> None:
        if not self.supports_writes:
            raise PermissionError(
                f"cannot {op} {self.url(path)}: this {self.scheme}:// backend is read-only "
                "(opened with read_only=True, or a store that takes no writes); open it "
                "without read_only to save or delete"
            )

    async def _retrying(
        self,
        op: str,
        path: str,
        fn: Callable[[], Awaitable[T]],
        *,
        nbytes: int = 0,
        hedge: bool = False,
        bounded_inside: bool = False,
        kind: str = BACKEND_REQUESTS,
        held: Callable[[], float] | None = None,
    ) -> T:
        """Runs ``fn`` under the retry policy, each attempt within its deadline.

        ``nbytes`` sizes the deadline (and the hedge delay of a ``hedge``d,
        idempotent request whose size is known; 0 when it is not). An operation
        made of several requests (listing pages, deletions) bounds each of
        them itself with :meth:`_bounded` (``bounded_inside``). ``kind``: the
        :meth:`latencies` its answer times join and are judged by. ``held``:
        seconds so far (a running total) the request waited for its consumer,
        which its deadline, hedge delay and recorded time leave out.
        """
        deadlines = self.deadlines
        attempt = fn
        if deadlines is not None and not bounded_inside:

            def attempt() -> Awaitable[T]:  # each attempt its own deadline (and hedge)
                return self._bounded(op, path, fn, nbytes, hedge=hedge, kind=kind, held=held)

        try:
            return await self.retry_policy.call(
                op, counting_cuts(attempt), self.stats, lambda: self.url(path)
            )
        except Exception as exc:
            if deadlines is not None and was_cut(exc):
                raise TimeoutError(
                    f"{op} {self.url(path)} on process {process_index()} stalled: no attempt "
                    f"answered within its deadline (at most {deadlines.request_s(nbytes):.1f}s "
                    f"for {nbytes} bytes, less once this store's answer times are known) "
                    "before the retry budget ran out "
                    f"({self.retry_policy.max_attempts} attempts, "
                    f"{self.retry_policy.max_total_s:.0f}s); check the store and the network, "
                    "or raise Deadlines.floor_s / RetryPolicy.max_total_s"
                ) from exc
            raise self._translate(exc, op, path) from exc

    async def _bounded(
        self,
        op: str,
        path: str,
        fn: Callable[[], Awaitable[T]],
        nbytes: int = 0,
        *,
        hedge: bool = False,
        kind: str = BACKEND_REQUESTS,
        held: Callable[[], float] | None = None,
    ) -> T:
        """One request of a multi-request operation, within its own deadline.

        ``hedge``: an idempotent request (a listing page, a data write of the
        same bytes to the same key), hedged when slow; ``kind`` and ``held`` as
        in :meth:`_retrying`. A read held back by its sinks (the restore placing
        bytes slower than they arrive) is neither hedged nor cut for that time:
        a second request would only add to the work that held it.
        """
        deadlines = self.deadlines
        if deadlines is None:
            return await fn()
        seen = self.latencies(kind)

        def one() -> Awaitable[T]:
            return timed(seen, nbytes, fn, held)

        attempt: Callable[[], Awaitable[T]] = one
        if hedge and deadlines.hedge:
            since = time.monotonic()
            before = held() if held is not None else 0.0

            def delay() -> float:
                waited = held() - before if held is not None else 0.0
                return deadlines.hedge_delay_s(nbytes, seen, since) + waited

            def attempt() -> Awaitable[T]:
                return hedged(
                    one,
                    delay,
                    # The hedge reads into memory of its own: the sinks never hold it.
                    again=lambda: timed(seen, nbytes, fn),
                    what=f"{op} of {self.url(path)}",
                    slots=seen,
                    share=deadlines.hedge_share,
                )

        return await within(
            deadlines.attempt_s(nbytes, seen, earlier_cuts.get()),
            lambda: f"{op} {self.url(path)}",
            attempt,
            held,
        )

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

    async def _list_children(self, prefix: str) -> list[str]:
        # Derived from a full listing where a store has nothing cheaper (memory:
        # no requests to save). Object and file stores override it.
        start = prefix + "/"
        return [
            info.path[len(start) :].split("/", 1)[0]
            for info in await self._list(prefix)
            if info.path.startswith(start) and "/" in info.path[len(start) :]
        ]

    @abc.abstractmethod
    async def _delete_many(self, paths: list[str]) -> None: ...
