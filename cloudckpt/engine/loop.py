"""An asyncio event loop running in a thread of its own.

Checkpointers own one each: blocking calls submit coroutines to it, and the
background commit of an async save runs on it while training continues.

A process created by ``fork()`` from one that had loaded cloudckpt cannot use
it: the loop thread does not exist in the child (a save would wait forever),
and tensorstore and JAX, being multithreaded, abort or deadlock after a fork.
Every use from such a child raises :class:`RuntimeError` saying so, instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_mark_forked)


def in_forked_child() -> bool:
    """Whether this process was forked from one that had already imported cloudckpt."""
    return _forked


def check_not_forked() -> None:
    """Raises ``RuntimeError`` in a process forked after cloudckpt was imported."""
    if _forked:
        raise RuntimeError(
            f"cloudckpt cannot be used in this process (pid {os.getpid()}): it was created "
            "with fork() from a process that had already loaded cloudckpt, and its event-loop "
            "thread, tensorstore and JAX do not survive a fork. Start worker processes with "
            "the 'spawn' or 'forkserver' method (multiprocessing.get_context('spawn')), or "
            "checkpoint only from the parent process"
        )


class LoopThread:
    """A daemon thread running an event loop until ``close``."""

    def __init__(self, name: str = "cloudckpt-loop") -> None:
        check_not_forked()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedules ``coro`` on the loop; returns a thread-safe future."""
        if _forked:
            coro.close()
            check_not_forked()
        if self._closed:
            coro.close()
            raise RuntimeError("this checkpointer's event loop is closed; create a new one")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs ``coro`` on the loop and waits for its result."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run called from its own loop (deadlock)")
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        """Joins the loop's ``to_thread`` workers, then stops the loop.

        Storage clients bound to the loop belong to whoever opened them (a
        checkpointer closes its ``BackendCache`` on the loop first). In a forked child this only marks the loop closed: the thread and the
        clients belong to the parent.
        """
        if self._closed:
            return
        if _forked:
            self._closed = True
            return

        async def shutdown() -> None:
            # Join the threads of asyncio.to_thread, so a closed loop leaves none behind.
            await asyncio.get_running_loop().shutdown_default_executor()

        try:
            self.run(shutdown(), timeout=30)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
