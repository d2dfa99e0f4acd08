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
``wait_until_finished`` or ``close``.
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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import atomicity
from atomicity.claims import RENEW_FRACTION
from cloudckpt import orbax
from cloudckpt.engine.loop import LoopThread, check_not_forked, in_forked_child
from cloudckpt.engine.multihost import MultiprocessingOptions, ProcessGroup
from cloudckpt.format.step import StepMetadata, read_step_metadata, write_step_metadata
from cloudckpt.handlers.args import CheckpointArgs
from cloudckpt.handlers.base import AsyncCheckpointHandler, CheckpointHandler, attempt_scope
from cloudckpt.storage.path import StoragePath

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str] | StoragePath


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
        self._closed = False

    # ----------------------------------------------------------------- properties
    @property
    def handler(self) -> CheckpointHandler:
        return self._handler

    @property
    def process_group(self) -> ProcessGroup:
        return self._group

    def location(self, path: PathLike) -> StoragePath:
        return StoragePath.from_url(path, **self._storage_options)

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        self._check_open()
        return self._loop.run(coro, timeout)

    def _check_open(self) -> None:
        check_not_forked()
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed; create a new one")

    def _run_to_outcome(self, coro: Any) -> Any:
        """Runs ``coro`` on the loop; on Ctrl-C cancels it and waits until it has unwound.

        Cancelling runs the commit's own clean-up, so once ``KeyboardInterrupt``
        propagates the save has a definite outcome: nothing of it commits later.
        A second Ctrl-C while waiting stops the wait.
        """
        self._check_open()
        finished = threading.Event()
        running: dict[str, Any] = {"task": None, "cancelled": False}

        async def tracked() -> Any:
            running["task"] = asyncio.current_task()
            try:
                if running["cancelled"]:
                    coro.close()
                    raise asyncio.CancelledError
                return await coro
            finally:
                finished.set()

        def cancel() -> None:  # on the loop's thread, so it cannot race tracked()'s start
            running["cancelled"] = True
            if running["task"] is not None:
                running["task"].cancel()

        future = self._loop.submit(tracked())
        try:
            return future.result()
        except KeyboardInterrupt:
            logger.warning("interrupted: cancelling the save and removing what it wrote")
            self._loop.loop.call_soon_threadsafe(cancel)
            finished.wait()
            raise

    # ----------------------------------------------------------------------- save
    def _prepare(
        self,
        path: PathLike,
        args: CheckpointArgs | None,
        *,
        force: bool,
        metrics: Mapping[str, Any] | None,
        custom: Mapping[str, Any] | None,
    ) -> _Commit:
        """Phase 1, on the caller's thread: validate and copy; no I/O."""
        self._check_open()
        if args is None:
            raise ValueError("save needs args, e.g. args=cloudckpt.args.Composite(state=...)")
        location = self.location(path)
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
        return _Commit(
            checkpointer=self,
            location=location,
            tmp=tmp,
            directory=directory,
            writes=writes,
            force=force,
            metadata=StepMetadata(
                item_handlers=_item_handlers(self._handler),
                metrics=dict(metrics or {}),
                init_timestamp_nsecs=init_ns,
                custom=dict(custom or {}),
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
        self._run_to_outcome(job.run())

    # -------------------------------------------------------------------- restore
    async def _check_committed(self, location: StoragePath) -> orbax.OrbaxStep | None:
        """Raises unless ``location`` is committed; returns the Orbax step it is, if one."""
        strategy = location.backend.default_temporary_path_class()
        try:
            await strategy.validate_final(location.path, location.backend)
        except atomicity.ValidationError:
            # Orbax hook: a step Orbax wrote has no cloudckpt marker (docs/FORMAT.md).
            found = await orbax.probe(location)
            if found is not None:
                orbax.require_committed(location, found)
                return found
            if not await _has_objects(location):
                raise FileNotFoundError(f"no checkpoint at {location}") from None
            raise
        return None

    def restore(self, path: PathLike, args: CheckpointArgs | None = None) -> Any:
        """Restores the committed checkpoint at ``path``.

        Raises:
            FileNotFoundError: nothing is stored at ``path``.
            ValueError: the checkpoint at ``path`` is incomplete (uncommitted).
        """
        location = self.location(path)

        async def run() -> Any:
            found = await self._check_committed(location)
            if found is not None:  # Orbax hook
                return await orbax.restore_step(location, found, self._handler, args)
            return await self._handler.restore(location, args)

        return self._run(run())

    def metadata(self, path: PathLike) -> StepMetadata:
        """The step metadata of ``path`` with per-item metadata, reading no array data."""
        location = self.location(path)

        async def run() -> StepMetadata:
            try:
                found = await self._check_committed(location)
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

        return self._run(run())

    # ---------------------------------------------------------------------- close
    def close(self) -> None:
        """Closes the handler and the event loop."""
        if self._closed:
            return
        if in_forked_child():  # the loop and clients belong to the parent process
            self._closed = True
            return
        try:
            self._handler.close()
        finally:
            self._closed = True
            self._loop.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _has_objects(location: StoragePath) -> bool:
    async for _ in location.backend.list_prefix(location.path):
        return True
    return False


def _item_handlers(handler: CheckpointHandler) -> dict[str, str] | str:
    step_item_handlers = getattr(handler, "step_item_handlers", None)
    return step_item_handlers() if callable(step_item_handlers) else handler.typestr()


class _Commit:
    """Phase 2 of one save: claim, write everywhere, meet, commit."""

    def __init__(
        self,
        *,
        checkpointer: Checkpointer,
        location: StoragePath,
        tmp: atomicity.TemporaryPath,
        directory: StoragePath,
        writes: Sequence[Awaitable[None]],
        force: bool,
        metadata: StepMetadata,
    ) -> None:
        self.checkpointer = checkpointer
        self.location = location
        self.tmp = tmp
        self.directory = directory
        self.writes = writes
        self.force = force
        self.metadata = metadata

    async def run(self) -> None:
        """Claims, writes, meets and commits; raises only when the step is not committed.

        A failure after the commit point (a lost answer, a timeout while the
        commit request was in flight) is settled by reading the claim back:
        if the step committed, the save succeeds; otherwise the attempt is
        revoked (conditionally) before anything it wrote is deleted.
        """
        group = self.checkpointer.process_group
        if not group.is_member:
            return
        handler = self.checkpointer.handler
        attempt = self.tmp.claim.attempt
        created = committed = settled = False
        started = False
        heartbeat: asyncio.Task[None] | None = None
        try:
            error: BaseException | None = None
            if group.is_primary:
                try:
                    backend = self.location.backend
                    if self.force and await atomicity.is_committed(backend, self.location.path):
                        await atomicity.delete_checkpoint(backend, self.location.path)
                    await self.tmp.create()
                    created = True
                    heartbeat = asyncio.create_task(_renew_periodically(self.tmp))
                except Exception as exc:
                    error = exc
            await group.sync(attempt, "created", error=error)
            if error is not None:
                raise error
            started = True
            try:
                with attempt_scope(attempt):  # for handlers whose save reads it when run
                    await _run_all(self.writes)
            except Exception as exc:
                error = exc
            await group.sync(attempt, "written", error=error)
            if error is not None:
                raise error
            if group.is_primary:
                try:
                    await _stop(heartbeat)
                    self.metadata.commit_timestamp_nsecs = time.time_ns()
                    await write_step_metadata(self.directory, self.metadata)
                    await handler.finalize(self.directory)
                    await self.tmp.finalize()
                    committed = True
                except Exception as exc:
                    error = exc
                    # The commit request may have taken effect although it failed
                    # here (a lost answer): read back before telling anyone.
                    settled = True  # settled here, whatever the outcome: not again below
                    try:
                        if await _remove_own_attempt(self.tmp):
                            committed, error = True, None
                            logger.warning(
                                "the save of %s committed although finalize reported %r",
                                self.location,
                                exc,
                            )
                    except atomicity.OutcomeUnknownError as unknown:
                        error = unknown
            # The others learn whether the primary committed; the primary only tells.
            primary = group.options.primary_host
            await group.sync(
                attempt, "committed", error=error, wait_for=[] if group.is_primary else [primary]
            )
            if error is not None:
                raise error
        except BaseException as exc:
            if not started:
                for write in self.writes:
                    if asyncio.iscoroutine(write):
                        write.close()
            await _stop(heartbeat)
            # Once committed, the step is a checkpoint: whatever fails later, keep it whole.
            if created and not committed and not settled and await _remove_own_attempt(self.tmp):
                logger.warning(
                    "the save of %s committed although %s interrupted it (its answer was "
                    "lost); it is reported as saved",
                    self.location,
                    type(exc).__name__,
                )
                return
            raise
        finally:
            await _stop(heartbeat)


async def _renew_periodically(tmp: atomicity.TemporaryPath) -> None:
    """Heartbeat: renews the claim so that clean-up by the store's clock sees it live."""
    interval = max(tmp.claim.grace_s * RENEW_FRACTION, 0.001)
    while True:
        await asyncio.sleep(interval)
        try:
            await tmp.renew()
        except atomicity.ClaimLostError:
            logger.warning("the claim of %s was taken over; the save will fail", tmp.get())
            return  # finalize's conditional commit fails on its own
        except Exception:
            logger.warning("could not renew the claim of %s", tmp.get(), exc_info=True)


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


async def _run_all(writes: Sequence[Awaitable[None]]) -> None:
    """Runs every write; on the first failure cancels the rest and waits for them.

    Raises the failing write's own error (not an ``ExceptionGroup``), so callers
    can catch it plainly; further failures are attached to it as notes.
    """
    try:
        async with asyncio.TaskGroup() as group:
            for write in writes:
                group.create_task(_await(write))
        return
    except ExceptionGroup as failures:
        leaves = _leaf_errors(failures)
    first = leaves[0]
    for other in leaves[1:]:
        first.add_note(f"another write of the same save also failed: {other!r}")
    raise first


def _leaf_errors(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    out: list[Exception] = []
    for exc in group.exceptions:
        out.extend(_leaf_errors(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _await(awaitable: Awaitable[None]) -> None:
    await awaitable


async def _remove_own_attempt(tmp: atomicity.TemporaryPath) -> bool:
    """After a failure: True when the step committed after all, else revoke and remove it.

    ``abort`` reads the claim back before deleting anything, so a step whose
    commit request took effect although its answer was lost (or a timeout
    cancelled the wait) is never deleted. Shielded from a second cancellation.

    Raises:
        atomicity.OutcomeUnknownError: the outcome could not be read back; the
            caller must not report the save as failed.
    """
    return await asyncio.shield(tmp.abort())


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
            self._inflight = self._loop.submit(commit())
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
