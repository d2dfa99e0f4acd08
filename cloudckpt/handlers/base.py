"""The handler protocol: how one kind of item is saved and restored.

Who calls what, in order, for one save (all on the checkpointer's side):

1. ``async_save(directory, args)`` on the caller's thread: validates ``args``
   and copies whatever the caller may mutate afterwards (device arrays to
   host memory). It does no I/O and returns awaitables.
2. The awaitables run on the checkpointer's event loop, concurrently with
   other items', writing under ``directory`` (on every process).
3. ``finalize(directory)`` once, on the primary process, after every process
   has finished writing and before the checkpoint is committed.

``restore`` and ``metadata`` are coroutines run on the checkpointer's loop.
A handler that does not need the copy/commit split subclasses
:class:`CheckpointHandler` and implements the coroutine ``save``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import uuid
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, ClassVar

from cloudckpt.handlers.args import CheckpointArgs
from cloudckpt.storage.path import StoragePath

#: typestr -> handler class, filled as handler classes are defined. Restoring
#: by recorded type only ever resolves classes already imported: nothing in a
#: checkpoint can make cloudckpt import code.
_KNOWN_HANDLERS: dict[str, type[CheckpointHandler]] = {}

_ATTEMPT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "cloudckpt_save_attempt", default=None
)


def save_attempt() -> str:
    """The id of the save attempt whose ``async_save``/``save`` is being called.

    Handlers name every data object after it (``<item>/@<attempt>/...``, see
    docs/FORMAT.md), so that a writer fenced off while paused can never put
    bytes under the names of the attempt that committed the step. The
    checkpointer sets it, identically on every process of one save; a handler
    driven directly, outside a checkpointer, gets a fresh id per call.
    """
    return _ATTEMPT.get() or uuid.uuid4().hex[:24]


@contextlib.contextmanager
def attempt_scope(attempt: str) -> Iterator[None]:
    """Makes ``attempt`` what :func:`save_attempt` returns while a save is prepared."""
    token = _ATTEMPT.set(attempt)
    try:
        yield
    finally:
        _ATTEMPT.reset(token)


class CheckpointHandler(abc.ABC):
    """Saves and restores one kind of item under a directory."""

    #: Args type to default-construct when restoring without args (None: cannot).
    default_restore_args: ClassVar[type[CheckpointArgs] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None):
            _KNOWN_HANDLERS[cls.typestr()] = cls

    @classmethod
    def typestr(cls) -> str:
        """A stable name recorded in step metadata to find this handler again."""
        return f"{cls.__module__}.{cls.__qualname__}"

    @abc.abstractmethod
    async def save(self, directory: StoragePath, args: CheckpointArgs) -> None:
        """Writes the item under ``directory`` (every process calls it)."""

    @abc.abstractmethod
    async def restore(self, directory: StoragePath, args: CheckpointArgs | None = None) -> Any:
        """Reads the item back."""

    async def metadata(self, directory: StoragePath) -> Any:
        """Describes the saved item without reading its bulk data (None if nothing to say)."""
        return None

    async def finalize(self, directory: StoragePath) -> None:
        """Runs once on the primary process after all writes, before the commit."""

    def bind_process_group(self, primary_host: int, members: Sequence[int]) -> None:
        """Told by the checkpointer which process is primary and which processes save."""

    def close(self) -> None:
        """Releases resources; the handler is not used afterwards."""


class AsyncCheckpointHandler(CheckpointHandler):
    """A handler whose save splits into a blocking copy and a background commit."""

    @abc.abstractmethod
    def async_save(self, directory: StoragePath, args: CheckpointArgs) -> Sequence[Awaitable[None]]:
        """Validates and copies now (no I/O); returns the writes to run in the background."""

    async def save(self, directory: StoragePath, args: CheckpointArgs) -> None:
        await asyncio.gather(*self.async_save(directory, args))


def handler_class_by_typestr(typestr: str) -> type[CheckpointHandler] | None:
    """The handler class recorded as ``typestr``, if it is known to this process."""
    return _KNOWN_HANDLERS.get(typestr)
