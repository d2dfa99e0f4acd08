"""Phase 2 of a save, the commit: claim, write everywhere, meet, commit, settle.

:class:`StepCommit` drives the temporary-path protocol of :mod:`atomicity`
(its call order is in :mod:`atomicity.types`) across the processes of a job:

1. **claim**: the primary process claims the step (``create``; with
   ``force``, a committed step there is deleted first) and starts a
   heartbeat renewing the claim; every process meets (``created``).
2. **write**: every process runs its writes concurrently; they meet
   (``written``). The first failing write cancels the others.
3. **commit**: the primary writes the step metadata, lets the handler
   finalize, and passes the commit point (``finalize``); the others learn
   whether it did (``committed``).
4. **settle**, on any failure of the primary: the claim is read back
   (``abort``). A step whose commit request took effect although its answer
   was lost is kept and reported saved; otherwise the attempt is revoked
   (conditionally) before anything it wrote is deleted. Nothing of a failed
   step ever commits later.

Everything here runs on the checkpointer's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence

import atomicity
from atomicity.claims import RENEW_FRACTION
from cloudckpt.engine.multihost import ProcessGroup
from cloudckpt.format.step import StepMetadata, write_step_metadata
from cloudckpt.handlers.base import CheckpointHandler, attempt_scope
from cloudckpt.storage.path import StoragePath

logger = logging.getLogger(__name__)


class StepCommit:
    """The commit phase of one save; ``run`` it once.

    Args:
        group: The processes taking part (this one may be a non-member: then
            ``run`` does nothing).
        handler: The handler whose ``finalize`` runs before the commit point.
        location: The step's final location.
        tmp: The step's temporary path (same attempt id on every process).
        directory: Where the writes go (``tmp.get()`` on ``location``'s backend).
        writes: This process's writes, from the handler's copy phase; never
            started ones are closed if the commit fails before writing.
        force: Replace a committed step at ``location``.
        metadata: Step metadata, written by the primary before the commit point.
    """

    def __init__(
        self,
        *,
        group: ProcessGroup,
        handler: CheckpointHandler,
        location: StoragePath,
        tmp: atomicity.TemporaryPath,
        directory: StoragePath,
        writes: Sequence[Awaitable[None]],
        force: bool,
        metadata: StepMetadata,
    ) -> None:
        self.group = group
        self.handler = handler
        self.location = location
        self.tmp = tmp
        self.directory = directory
        self.writes = writes
        self.force = force
        self.metadata = metadata
        self._created = self._committed = self._settled = self._started = False
        self._heartbeat: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Claims, writes, meets and commits; raises only when the step is not committed.

        A failure after the commit point (a lost answer, a timeout while the
        commit request was in flight) is settled by reading the claim back:
        if the step committed, the save succeeds; otherwise the attempt is
        revoked (conditionally) before anything it wrote is deleted.
        """
        if not self.group.is_member:
            return
        try:
            await self._claim()
            self._started = True
            await self._write()
            await self._commit()
        except BaseException as exc:
            if await self._committed_after_all(exc):
                return
            raise
        finally:
            await _stop(self._heartbeat)

    async def _claim(self) -> None:
        """Step 1: the primary claims the step; every process learns whether it did."""
        error: BaseException | None = None
        if self.group.is_primary:
            try:
                backend = self.location.backend
                if self.force and await atomicity.is_committed(backend, self.location.path):
                    await atomicity.delete_checkpoint(backend, self.location.path)
                await self.tmp.create()
                self._created = True
                self._heartbeat = asyncio.create_task(_renew_periodically(self.tmp))
            except Exception as exc:
                error = exc
        await self.group.sync(self.tmp.claim.attempt, "created", error=error)
        if error is not None:
            raise error

    async def _write(self) -> None:
        """Step 2: every process writes; they meet whatever happened."""
        error: BaseException | None = None
        try:
            with attempt_scope(self.tmp.claim.attempt):  # for handlers whose save reads it when run
                await _run_all(self.writes)
        except Exception as exc:
            error = exc
        await self.group.sync(self.tmp.claim.attempt, "written", error=error)
        if error is not None:
            raise error

    async def _commit(self) -> None:
        """Step 3: the primary commits; the others learn whether it did, the primary only tells."""
        error = await self._finalize() if self.group.is_primary else None
        primary = self.group.options.primary_host
        await self.group.sync(
            self.tmp.claim.attempt,
            "committed",
            error=error,
            wait_for=[] if self.group.is_primary else [primary],
        )
        if error is not None:
            raise error

    async def _finalize(self) -> BaseException | None:
        """On the primary: metadata, handler finalize, commit point. Returns the failure, if any."""
        try:
            await _stop(self._heartbeat)
            self.metadata.commit_timestamp_nsecs = time.time_ns()
            await write_step_metadata(self.directory, self.metadata)
            await self.handler.finalize(self.directory)
            await self.tmp.finalize()
            self._committed = True
            return None
        except Exception as exc:
            # The commit request may have taken effect although it failed
            # here (a lost answer): read back before telling anyone.
            self._settled = True  # settled here, whatever the outcome: not again below
            try:
                if await _remove_own_attempt(self.tmp):
                    self._committed = True
                    logger.warning(
                        "the save of %s committed although finalize reported %r",
                        self.location,
                        exc,
                    )
                    return None
            except atomicity.OutcomeUnknownError as unknown:
                return unknown
            return exc

    async def _committed_after_all(self, exc: BaseException) -> bool:
        """Step 4, after ``exc``: True when the step committed anyway, else it is removed.

        Writes never started are closed; once committed, the step is a
        checkpoint: whatever fails later keeps it whole.
        """
        if not self._started:
            for write in self.writes:
                if asyncio.iscoroutine(write):
                    write.close()
        await _stop(self._heartbeat)
        if (
            self._created
            and not self._committed
            and not self._settled
            and await _remove_own_attempt(self.tmp)
        ):
            logger.warning(
                "the save of %s committed although %s interrupted it (its answer was "
                "lost); it is reported as saved",
                self.location,
                type(exc).__name__,
            )
            return True
        return False


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
