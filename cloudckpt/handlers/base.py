"""The handler protocol: how one kind of item is saved and restored.

Who calls what, in order, for one save (all on the checkpointer's side):

1. ``async_save(directory, args)`` on the caller's thread: validates ``args``
   and copies whatever the caller may mutate afterwards (device arrays to
   host memory). It does no I/O and returns awaitables.
2. ``step_item_handlers()`` right after, on the same thread: its answer goes
   into the step metadata the primary process writes.
3. The awaitables run on the checkpointer's event loop, concurrently with
   other items', writing under ``directory`` (on every process).
4. ``finalize(directory)`` once, on the primary process, after every process
   has finished writing and before the checkpoint is committed.

``restore`` and ``metadata`` are coroutines run on the checkpointer's loop.
``bind_process_group`` is called once, when the checkpointer is made;
``close`` once, when it closes. A handler that does not need the copy/commit
split subclasses :class:`CheckpointHandler` and implements the coroutine
``save``.

Identity: every concrete handler class has a ``typestr``, recorded in step
metadata so that a later process can find the handler again. Declare it as
the class attribute ``TYPESTR`` (a stable string, never changed once
checkpoints carry it); see :attr:`CheckpointHandler.TYPESTR`.
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
from cloudckpt.handlers.registry import register_handler_type
from cloudckpt.storage.path import StoragePath


def abstract_methods(cls: type) -> set[str]:
    """Names of ``cls``'s abstract methods (empty for a class that can be instantiated).

    Computed the way ``abc`` does (its own abstract attributes, and its bases'
    that it did not override), because ``abc`` sets ``__abstractmethods__``
    only after ``__init_subclass__`` has returned.
    """
    names = {name for name, value in vars(cls).items() if _is_abstract(value)}
    for base in cls.__bases__:
        for name in getattr(base, "__abstractmethods__", ()):
            if _is_abstract(getattr(cls, name, None)):
                names.add(name)
    return names


def _is_abstract(value: object) -> bool:
    return bool(getattr(value, "__isabstractmethod__", False))


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
    """Saves and restores one kind of item under a directory.

    Defining a concrete subclass (one with no abstract method left) records
    it under its ``typestr()`` in the process-wide table of handler
    identities (:mod:`cloudckpt.handlers.registry`); another class (other
    module or qualified name) with the same typestr is a ``TypeError`` there
    and then. Instantiating a subclass
    that leaves an abstract method out is a ``TypeError`` naming it.
    """

    #: The handler's identity in checkpoints: a stable string, written into
    #: step metadata and looked up when restoring without args. Declare it on
    #: each concrete handler class and never change it once checkpoints carry
    #: it; moving or renaming the class then changes nothing on disk. It is
    #: not inherited: a subclass is another handler, with its own identity.
    #: A class that declares none is known as ``"<module>.<qualname>"``: that
    #: keeps working, but ties its checkpoints to where the class is defined
    #: (moved or renamed, its checkpoints restore only with explicit args).
    TYPESTR: ClassVar[str | None] = None

    #: Args type to default-construct when restoring without args (None: cannot).
    default_restore_args: ClassVar[type[CheckpointArgs] | None] = None

    #: Objects under the item's directory that every restore reads before anything else,
    #: each a checksummed JSON document whose ``attempt`` names the save that wrote it. A
    #: checkpointer fetches them beside its commit check (:mod:`cloudckpt.format.early`).
    RESTORE_DOCUMENTS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("TYPESTR")
        if declared is not None and (type(declared) is not str or not declared.strip()):
            raise TypeError(
                f"{cls.__qualname__}.TYPESTR must be a non-empty string, got {declared!r}"
            )
        if not abstract_methods(cls):  # abstract bases have no identity of their own
            register_handler_type(cls)

    @classmethod
    def typestr(cls) -> str:
        """The name recorded in step metadata to find this handler again.

        The class's own ``TYPESTR`` when it declares one, else
        ``"<module>.<qualname>"`` (see :attr:`TYPESTR`).
        """
        declared = cls.__dict__.get("TYPESTR")
        return declared if declared is not None else f"{cls.__module__}.{cls.__qualname__}"

    def step_item_handlers(self) -> dict[str, str] | str:
        """What the step metadata records as ``item_handlers`` for the save just prepared.

        Called on the caller's thread right after ``async_save`` returned (an
        :class:`AsyncCheckpointHandler`, which has validated its args by then),
        or right after the coroutine ``save(...)`` was created but before any of
        it ran (a plain :class:`CheckpointHandler`: the answer cannot depend on
        that save's body). On a process that takes no part in the save it is
        called without a save, and its answer is unused. A handler of one item
        returns its ``typestr()`` (the default); a handler of several named
        items returns ``{item: typestr}``, as the composite does.
        """
        return self.typestr()

    def restore_documents(
        self, directory: StoragePath, args: CheckpointArgs | None
    ) -> list[StoragePath]:
        """What a restore of ``directory`` with ``args`` reads first (no I/O, never raises)."""
        return [directory / name for name in type(self).RESTORE_DOCUMENTS]

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
