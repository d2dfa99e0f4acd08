"""Early reads: a restore's documents, fetched beside its commit-marker check.

Before any data, a restore reads the step's commit marker, then its step
metadata, then its items' documents (``pytree.json``), each request waiting
for the one before: on a cloud bucket, round trips of 20-50 ms each. Instead,
the checkpointer starts the documents' GETs together with the marker's
(:func:`early_reads`), and a reader takes its document from there
(:func:`read_document`).

A document read beside the marker may predate the commit: while the two
requests were in flight the step may have been cleaned up and saved again.
The fixed-name documents are create-only and name the attempt that wrote
them, so one that names the attempt the marker commits is that attempt's
own, the committed one. Anything else is read again after the check, as a
restore always did: a document naming another attempt, an answer that was an
error or a 404 (on a file system the step is renamed into place when it
commits), a marker that names no attempt, or a document written before
documents named their attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TypeVar

from cloudckpt.format import jsonio
from cloudckpt.storage.path import StoragePath

T = TypeVar("T")


class EarlyReads:
    """GETs started before the commit check.

    An answer the check vouches for serves every reader of its object in this
    restore (a composite's ``metadata()`` reads the step metadata twice); one it
    does not is dropped, and each reader reads the object itself.
    """

    def __init__(self, targets: Iterable[StoragePath]) -> None:
        self._tasks: dict[tuple[int, str], asyncio.Future[bytes | None]] = {}
        for target in targets:
            key = (id(target.backend), target.path)
            if key not in self._tasks:
                self._tasks[key] = asyncio.ensure_future(target.backend.get(target.path))
        #: The attempt the commit marker names, once the check has passed (None before,
        #: and for a marker that names none): the only attempt an early answer may name.
        self.attempt: str | None = None

    def answer(self, target: StoragePath) -> asyncio.Future[bytes | None] | None:
        return self._tasks.get((id(target.backend), target.path))

    def drop(self, target: StoragePath) -> None:
        self._tasks.pop((id(target.backend), target.path), None)

    async def aclose(self) -> None:
        """Stops the reads still running (a failed check, an item not in the checkpoint)."""
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_EARLY: contextvars.ContextVar[EarlyReads | None] = contextvars.ContextVar(
    "cloudckpt_early_reads", default=None
)


@contextlib.asynccontextmanager
async def early_reads(targets: Iterable[StoragePath]) -> AsyncIterator[EarlyReads]:
    """Starts GETs of ``targets``; readers in this context (and its tasks) may take them.

    The caller sets ``attempt`` once the commit check has passed; until then
    no early answer is used.
    """
    early = EarlyReads(targets)
    token = _EARLY.set(early)
    try:
        yield early
    finally:
        _EARLY.reset(token)
        await early.aclose()


async def read_document(target: StoragePath, parse: Callable[..., T]) -> T | None:
    """The checksummed JSON document at ``target``, ``parse``d; None when there is none.

    ``parse(payload, where=...)`` validates the payload (untrusted) and types
    it. The early read of ``target`` is used when there is one and the
    document's ``attempt`` is the one the commit marker names; otherwise the
    object is read now.
    """
    where = str(target)
    early = _EARLY.get()
    if early is not None and (pending := early.answer(target)) is not None:
        try:
            data = await pending
        except Exception:  # read again below, which raises what is wrong
            data = None
        if data is not None and early.attempt is not None:
            try:
                value = parse(jsonio.loads(data, where=where), where=where)
            except (ValueError, TypeError):  # parsed again below, where it raises
                value = None
            if value is not None and getattr(value, "attempt", None) == early.attempt:
                return value
        early.drop(target)
    data = await target.backend.get(target.path)
    return None if data is None else parse(jsonio.loads(data, where=where), where=where)
