"""Checkpointer (blocking) and AsyncCheckpointer (background commit).

A save has two phases:

1. Copy, on the caller's thread: the handler validates its args and copies
   what the caller may change afterwards (device arrays to host memory). No
   I/O happens, so bad input fails before anything is written.
2. Commit, on the checkpointer's event loop: the primary process claims the
   step (temporary path ``create``), every process runs its writes, all
   processes meet, and the primary writes the step metadata and commits
   (marker or rename). A failure anywhere leaves the step uncommitted and
   the writer removes what it wrote.

``Checkpointer.save`` waits for phase 2; ``AsyncCheckpointer.save`` returns
after phase 1 and reports a background failure once, at the next ``save``,
``wait_until_finished`` or ``close``. Phase 2 is :mod:`cloudckpt.engine.commit`.

A checkpointer owns its event loop and the storage clients opened on it: the
backends of every location it resolved (``location``) are closed on its loop
when it closes. Code built on a checkpointer (the manager) runs its own
storage work on the same loop through ``run_on_loop``/``submit_to_loop``.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import atomicity
from cloudckpt import orbax
from cloudckpt.engine.commit import StepCommit
from cloudckpt.engine.loop import LoopThread, check_not_forked, in_forked_child
from cloudckpt.engine.multihost import MultiprocessingOptions, ProcessGroup
from cloudckpt.format.early import EarlyReads, early_reads
from cloudckpt.format.step import STEP_METADATA_NAME, StepMetadata, read_step_metadata
from cloudckpt.handlers.args import CheckpointArgs
from cloudckpt.handlers.base import AsyncCheckpointHandler, CheckpointHandler, attempt_scope
from cloudckpt.storage import BackendCache
from cloudckpt.storage.path import StoragePath

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str] | StoragePath
T = TypeVar("T")


class Checkpointer:
    """Saves and restores checkpoints with one handler; ``save`` blocks until committed.

    Args:
        handler: The handler for the checkpoint's contents (usually a
            :class:`~cloudckpt.CompositeCheckpointHandler`).
        storage_options: Backend options (``endpoint_url``, ``region``, ...)
            overriding the environment.
        multiprocessing_options: Primary process and active processes.
        grace_s: How long an uncommitted save is protected from clean-up.
    """

    def __init__(
        self,
        handler: CheckpointHandler,
        *,
        storage_options: Mapping[str, Any] | None = None,
        multiprocessing_options: MultiprocessingOptions | None = None,
        grace_s: float = atomicity.DEFAULT_GRACE_S,
    ) -> None:
        if not isinstance(handler, CheckpointHandler):
            raise TypeError(f"handler must be a CheckpointHandler, got {type(handler).__name__}")
        self._handler = handler
        self._storage_options = dict(storage_options or {})
        self._group = ProcessGroup(multiprocessing_options)
        handler.bind_process_group(self._group.options.primary_host, self._group.members)
        self._grace_s = grace_s
        self._loop = LoopThread(f"cloudckpt-{type(self).__name__}")
        # This checkpointer's backends, closed on its loop by close(): never shared.
        self._backends = BackendCache()
        self._closed = False

    # ----------------------------------------------------------------- properties
    @property
    def handler(self) -> CheckpointHandler:
        """The handler every save and restore goes through."""
        return self._handler

    @property
    def process_group(self) -> ProcessGroup:
        """The processes taking part in saves, and which one commits."""
        return self._group

    def location(self, path: PathLike) -> StoragePath:
        """Where ``path`` (a URL or a local path) is, through this checkpointer's own backends.

        No I/O. The location carries the checkpointer's storage options and
        one backend per scheme and options, shared by every location it
        returns and closed by :meth:`close`: use it through :meth:`run_on_loop`
        or :meth:`submit_to_loop`, not on another event loop.

        Raises:
            ValueError: ``path`` is empty or names an unknown scheme or no bucket.
            ImportError: the scheme's client library is missing (the message says
                what to install).
        """
        return StoragePath.from_url(path, cache=self._backends, **self._storage_options)

    # ------------------------------------------------------------ the event loop
    def check_open(self) -> None:
        """Raises ``RuntimeError`` once closed, or in a forked child; otherwise does nothing.

        A forked child: a process made by ``fork()`` from one that had loaded cloudckpt.
        """
        check_not_forked()
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed; create a new one")

    def run_on_loop(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs ``coro`` on this checkpointer's event loop and waits for its result.

        Storage work on locations from :meth:`location` belongs on this loop
        (their clients are bound to it). Wherever it raises ``RuntimeError``,
        ``coro`` is closed without running.

        Raises:
            RuntimeError: the checkpointer is closed, this is a forked child, or
                the call comes from the loop's own thread (it would deadlock).
            TimeoutError: ``timeout`` seconds passed; ``coro`` keeps running.
        """
        _close_unless(self.check_open, coro)
        return self._loop.run(coro, timeout)

    def submit_to_loop(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedules ``coro`` on this checkpointer's event loop; returns a thread-safe future.

        The work runs beside a background save. ``close`` does not wait for
        it: wait on the future before closing. Work still pending then is
        abandoned with the loop (its backends are closed under it and the
        future may never complete).

        Raises:
            RuntimeError: the checkpointer is closed or this is a forked child;
                ``coro`` is closed without running.
        """
        _close_unless(self.check_open, coro)
        return self._loop.submit(coro)

    # ----------------------------------------------------------------------- save
    def _prepare(
        self,
        path: PathLike,
        args: CheckpointArgs | None,
        *,
        force: bool,
        metrics: Mapping[str, Any] | None,
        custom: Mapping[str, Any] | None,
    ) -> StepCommit:
        """Phase 1, on the caller's thread: validate and copy; no I/O."""
        self.check_open()
        if args is None:
            raise ValueError("save needs args, e.g. args=cloudckpt.args.Composite(state=...)")
        location = self.location(path)
        if not location.backend.supports_writes:
            raise PermissionError(
                f"cannot save to {location.url}: its backend is read-only (opened with "
                "read_only=True); save through a checkpointer without it"
            )
        strategy = location.backend.default_temporary_path_class()
        tmp = strategy.from_final(
            location.path,
            location.backend,
            attempt=self._group.next_attempt(location.url),
            grace_s=self._grace_s,
        )
        directory = StoragePath(location.backend, tmp.get())
        init_ns = time.time_ns()
        if not self._group.is_member:
            writes: list[Awaitable[None]] = []  # not an active process: nothing to do
        else:
            # Handlers name their objects after the attempt (save_attempt()).
            with attempt_scope(tmp.claim.attempt):
                if isinstance(self._handler, AsyncCheckpointHandler):
                    writes = list(self._handler.async_save(directory, args))
                else:
                    writes = [self._handler.save(directory, args)]
        return StepCommit(
            group=self._group,
            handler=self._handler,
            location=location,
            tmp=tmp,
            directory=directory,
            writes=writes,
            force=force,
            metadata=StepMetadata(
                item_handlers=self._handler.step_item_handlers(),
                metrics=dict(metrics or {}),
                init_timestamp_nsecs=init_ns,
                custom=dict(custom or {}),
                attempt=tmp.claim.attempt,
            ),
        )

    def save(
        self,
        path: PathLike,
        args: CheckpointArgs | None = None,
        *,
        force: bool = False,
        metrics: Mapping[str, Any] | None = None,
        custom: Mapping[str, Any] | None = None,
    ) -> None:
        """Saves and commits a checkpoint at ``path``.

        A ``KeyboardInterrupt`` (Ctrl-C) while the save is running cancels it:
        the call waits until the save has stopped and removed what it wrote,
        then re-raises, so nothing of it commits after the interrupt propagates.
        (Had the commit already completed, the step stays committed.)

        Raises:
            FileExistsError: a committed checkpoint exists at ``path`` and
                ``force`` is False, or another writer is saving there.
        """
        job = self._prepare(path, args, force=force, metrics=metrics, custom=custom)
        self._loop.run_to_outcome(
            job.run(),
            on_interrupt=lambda: logger.warning(
                "interrupted: cancelling the save and removing what it wrote"
            ),
        )

    # -------------------------------------------------------------------- restore
    async def _check_committed(
        self, location: StoragePath, early: EarlyReads | None = None
    ) -> orbax.OrbaxStep | None:
        """Raises unless ``location`` is committed; returns the Orbax step it is, if one.

        Tells ``early`` which attempt the commit marker names: the documents read
        beside the check are used only if they name it too.
        """
        strategy = location.backend.default_temporary_path_class()
        try:
            attempt = await strategy.validate_final(location.path, location.backend)
        except atomicity.ValidationError:
            # Orbax hook: a step Orbax wrote has no cloudckpt marker (docs/FORMAT.md).
            found = await orbax.probe(location)
            if found is not None:
                orbax.require_committed(location, found)
                return found
            if not await _has_objects(location):
                raise FileNotFoundError(f"no checkpoint at {location}") from None
            raise
        if early is not None:
            early.attempt = attempt
        return None

    def _documents(self, location: StoragePath, args: CheckpointArgs | None) -> list[StoragePath]:
        """What the handler reads first; [] if it cannot say (its restore raises what is wrong)."""
        try:
            return list(self._handler.restore_documents(location, args))
        except Exception:
            return []

    def restore(self, path: PathLike, args: CheckpointArgs | None = None) -> Any:
        """Restores the committed checkpoint at ``path``.

        Raises:
            FileNotFoundError: nothing is stored at ``path``.
            ValueError: the checkpoint at ``path`` is incomplete (uncommitted).
        """
        location = self.location(path)

        async def run() -> Any:
            # The handler's first documents are fetched beside the commit check.
            async with early_reads(self._documents(location, args)) as early:
                found = await self._check_committed(location, early)
                if found is not None:  # Orbax hook
                    return await orbax.restore_step(location, found, self._handler, args)
                return await self._handler.restore(location, args)

        return self.run_on_loop(run())

    def metadata(self, path: PathLike) -> StepMetadata:
        """The step metadata of ``path`` with per-item metadata, reading no array data."""
        location = self.location(path)
        documents = [location / STEP_METADATA_NAME, *self._documents(location, None)]

        async def run() -> StepMetadata:
            async with early_reads(documents) as early:
                try:
                    found = await self._check_committed(location, early)
                except atomicity.ValidationError as exc:
                    raise ValueError(
                        f"{exc}. Finalize the save first (wait for it to commit) before reading "
                        "its metadata"
                    ) from None
                if found is not None:  # Orbax hook
                    return await orbax.step_metadata(location, found, with_items=True)
                step = await read_step_metadata(location)
                step.item_metadata = await self._handler.metadata(location)
                return step

        return self.run_on_loop(run())

    # ---------------------------------------------------------------------- close
    def close(self) -> None:
        """Closes the handler, the storage clients opened on the loop, then the loop."""
        if self._closed:
            return
        if in_forked_child():  # the loop and clients belong to the parent process
            self._closed = True
            return
        try:
            self._handler.close()
        finally:
            self._closed = True
            self._loop.close(cleanup=self._backends.aclose())

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _has_objects(location: StoragePath) -> bool:
    async for _ in location.backend.list_prefix(location.path):
        return True
    return False


def _close_unless(check: Callable[[], None], coro: Coroutine[Any, Any, Any]) -> None:
    """Runs ``check``; if it raises, closes ``coro`` first (it will never be awaited)."""
    try:
        check()
    except BaseException:
        coro.close()
        raise


@dataclass
class SaveTiming:
    """Where the time of one asynchronous save went.

    Attributes:
        url: The checkpoint saved.
        blocking_s: How long ``save`` held the caller (waiting for the previous
            save, then copying to host memory).
        commit_s: Background time from then until committed; None while in
            flight, or if the save failed.
    """

    url: str
    blocking_s: float
    commit_s: float | None = None


class AsyncCheckpointer(Checkpointer):
    """A checkpointer whose ``save`` returns once data is copied to host memory.

    The commit runs on this checkpointer's event loop. A second ``save`` waits
    for the one in flight. A background failure, or a commit exceeding
    ``timeout_s``, is raised exactly once, at the next ``save``,
    ``wait_until_finished`` or ``close``, naming the path and chaining the
    original error; that step is never committed, then or later (its claim
    is revoked first). When the timeout cancels the commit request itself,
    the claim is read back: a commit that took effect is reported as saved,
    and one whose outcome cannot be read raises
    :class:`atomicity.OutcomeUnknownError` (a ``ConnectionError``) instead of
    a false "not committed".
    """

    def __init__(
        self,
        handler: CheckpointHandler,
        *,
        timeout_s: float = 600.0,
        storage_options: Mapping[str, Any] | None = None,
        multiprocessing_options: MultiprocessingOptions | None = None,
        grace_s: float | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        grace = grace_s if grace_s is not None else max(atomicity.DEFAULT_GRACE_S, 2 * timeout_s)
        if grace < timeout_s:
            raise ValueError(f"grace_s ({grace}) must be at least timeout_s ({timeout_s})")
        super().__init__(
            handler,
            storage_options=storage_options,
            multiprocessing_options=multiprocessing_options,
            grace_s=grace,
        )
        self._timeout_s = timeout_s
        self._inflight: concurrent.futures.Future[None] | None = None
        self._inflight_url = ""
        self._lock = threading.Lock()
        self._timings: collections.deque[SaveTiming] = collections.deque(maxlen=1000)

    def save(
        self,
        path: PathLike,
        args: CheckpointArgs | None = None,
        *,
        force: bool = False,
        metrics: Mapping[str, Any] | None = None,
        custom: Mapping[str, Any] | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        """Copies now and commits in the background; see the class docstring.

        ``on_commit`` runs on the checkpointer's loop once the step is
        committed (the manager uses it to update its step list).
        """
        start = time.perf_counter()
        with self._lock:
            self._wait_locked()
            job = self._prepare(path, args, force=force, metrics=metrics, custom=custom)
            timing = SaveTiming(job.location.url, time.perf_counter() - start)

            async def commit() -> None:
                began = time.perf_counter()
                await asyncio.wait_for(job.run(), self._timeout_s)
                timing.commit_s = time.perf_counter() - began
                if on_commit is not None:
                    on_commit()

            self._inflight_url = job.location.url
            self._inflight = self.submit_to_loop(commit())
            self._timings.append(timing)

    def timings(self) -> list[SaveTiming]:
        """How long recent saves blocked the caller and took to commit (oldest first)."""
        return list(self._timings)

    def is_saving_in_progress(self) -> bool:
        future = self._inflight
        return future is not None and not future.done()

    def wait_until_finished(self) -> None:
        """Waits for the save in flight; raises its failure (once)."""
        check_not_forked()
        with self._lock:
            self._wait_locked()

    def _wait_locked(self) -> None:
        future, self._inflight = self._inflight, None
        if future is None:
            return
        url = self._inflight_url
        try:
            # The loop enforces timeout_s and then settles the attempt (reads its
            # claim back, revokes it if uncommitted); the margin covers settling.
            future.result(self._timeout_s + 120)
        except KeyboardInterrupt:
            # The background save goes on; keep it, so close() still waits for it
            # and its failure is still reported.
            self._inflight = future
            raise
        except concurrent.futures.TimeoutError as exc:
            if future.done():
                raise self._timed_out(url) from exc
            raise TimeoutError(
                f"background save of {url} did not finish within {self._timeout_s:.0f}s and could "
                "not be settled; its outcome is unknown (the storage channel is not answering). "
                "It commits only if its commit request already reached the store: "
                "`cloudckpt ls` shows whether it did"
            ) from exc
        except TimeoutError as exc:
            raise self._timed_out(url) from exc
        except Exception as exc:
            raise _named(exc, url) from exc

    def _timed_out(self, url: str) -> TimeoutError:
        return TimeoutError(
            f"background save of {url} did not finish within {self._timeout_s:.0f}s and was "
            "abandoned; it was not committed (its claim was revoked, so it never will be). "
            "Raise timeout_s or check the storage channel"
        )

    def close(self) -> None:
        """Waits for the save in flight (raising its failure), then releases resources."""
        if self._closed:
            return
        if in_forked_child():
            super().close()
            return
        try:
            self.wait_until_finished()
        finally:
            super().close()

    def __enter__(self) -> AsyncCheckpointer:
        return self


def _named(exc: Exception, url: str) -> Exception:
    """The same kind of error, with a message naming the checkpoint path."""
    cls: type[Exception] = type(exc)
    if getattr(builtins, cls.__name__, None) is not cls:
        cls = next(
            (
                c
                for c in cls.__mro__
                if getattr(builtins, c.__name__, None) is c and issubclass(c, Exception)
            ),
            RuntimeError,
        )
    try:
        return cls(f"background save of {url} failed: {exc}")
    except TypeError:
        return RuntimeError(f"background save of {url} failed: {exc}")
