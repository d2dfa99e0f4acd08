"""The engine's public seams (issue 13).

* ``Checkpointer.run_on_loop``/``submit_to_loop`` run work on the
  checkpointer's own loop (where its storage clients live) and refuse, without
  leaving a never-awaited coroutine behind, once it is closed.
* Closing a checkpointer closes the clients of the backends it resolved, on
  its loop, and nothing else: a backend it never resolved is left alone.
* ``LoopThread.close`` runs its owner's clean-up on the loop, then stops; the
  loop itself closes nothing.

The backends here are the real memory backend; the subclass only records
``aclose`` calls, which have no other observable effect on it.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path

import pytest

import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage.memory import MemoryBackend

from .helpers import unique


class RecordingMemoryBackend(MemoryBackend):
    """The memory backend, noting which thread closed its clients."""

    def __init__(self) -> None:
        super().__init__()
        self.closed_on: list[str] = []

    async def aclose(self) -> None:
        self.closed_on.append(threading.current_thread().name)
        await super().aclose()


async def _thread_name() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


def test_work_runs_on_the_checkpointers_loop(tmp_path: Path) -> None:
    ckptr = cc.AsyncCheckpointer(cc.CompositeCheckpointHandler())
    try:
        on_loop = ckptr.run_on_loop(_thread_name())
        assert on_loop != threading.current_thread().name
        assert ckptr.submit_to_loop(_thread_name()).result(30) == on_loop
        ckptr.save(str(tmp_path / "1"), args=cc.args.Composite(meta=cc.args.JsonSave([1])))
        ckptr.wait_until_finished()
        location = ckptr.location(str(tmp_path / "1"))
        assert ckptr.run_on_loop(location.backend.exists(location.path + "/_COMMITTED"))
    finally:
        ckptr.close()
    for call in (ckptr.run_on_loop, ckptr.submit_to_loop):
        coro = _thread_name()
        with pytest.raises(RuntimeError, match="AsyncCheckpointer is closed"):
            call(coro)
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    with pytest.raises(RuntimeError, match="is closed"):
        ckptr.check_open()


def test_close_closes_only_the_backends_it_resolved() -> None:
    mine, other = RecordingMemoryBackend(), RecordingMemoryBackend()
    step = cc.StoragePath(mine, f"{unique('seams')}/1")
    ckptr = cc.Checkpointer(cc.CompositeCheckpointHandler())
    loop_thread = ckptr.run_on_loop(_thread_name())
    ckptr.save(step, args=cc.args.Composite(meta=cc.args.JsonSave({"a": 1})))
    # Used on the checkpointer's loop, but never resolved by it: not its to close.
    assert ckptr.run_on_loop(other.exists(f"{unique('seams')}/x")) is False
    assert dict(ckptr.restore(step)) == {"meta": {"a": 1}}
    ckptr.close()
    assert mine.closed_on == [loop_thread]
    assert other.closed_on == []


def test_a_manager_closes_the_backend_of_its_root() -> None:
    root = cc.StoragePath(RecordingMemoryBackend(), unique("seams-root"))
    options = cc.CheckpointManagerOptions(max_to_keep=1, enable_async=False)
    with cc.CheckpointManager(root, options=options) as mngr:
        for step in (1, 2):
            mngr.save(step, args=cc.args.Composite(meta=cc.args.JsonSave({"step": step})))
        mngr.wait_until_finished()  # retention deletes step 1 in the background
        assert mngr.all_steps() == [2]
        assert root.backend.closed_on == []  # type: ignore[attr-defined]
    assert len(root.backend.closed_on) == 1  # type: ignore[attr-defined]


def test_loop_close_runs_the_owners_cleanup_then_stops() -> None:
    ran: list[str] = []

    async def cleanup() -> None:
        ran.append(threading.current_thread().name)
        raise OSError("closing is best effort: the loop still stops")

    loop = LoopThread("seams-loop")
    assert loop.run(_thread_name()) == "seams-loop"
    loop.close(cleanup=cleanup())
    assert ran == ["seams-loop"]
    with pytest.raises(RuntimeError, match="closed"):
        loop.run(_thread_name())
    late = cleanup()
    loop.close(cleanup=late)  # already closed: the clean-up is discarded, never left pending
    assert inspect.getcoroutinestate(late) == inspect.CORO_CLOSED
    assert ran == ["seams-loop"]
