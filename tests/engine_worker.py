"""Subprocess scenarios for tests/test_engine_hostile.py (signals and fork need a process).

``python -m tests.engine_worker SCENARIO ROOT`` prints ``EVENT ...`` lines and one
``RESULT <json>`` line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudckpt as cc


def emit(*words: Any) -> None:
    print(*words, flush=True)


class SlowHandler(cc.AsyncCheckpointHandler):
    """Writes one object after a pause, long enough to be interrupted mid-save."""

    def async_save(self, directory: cc.StoragePath, args: Any) -> Sequence[Awaitable[None]]:
        return [self._write(directory, args.seconds)]

    async def _write(self, directory: cc.StoragePath, seconds: float) -> None:
        emit("EVENT WRITING")
        await directory.backend.put((directory / "part").path, b"x" * 1000)
        await asyncio.sleep(seconds)
        await directory.backend.put((directory / "late").path, b"y" * 1000)

    async def restore(self, directory: cc.StoragePath, args: Any = None) -> Any:
        return None


@cc.register_with_handler(SlowHandler, for_save=True)
@dataclass(frozen=True)
class SlowSave(cc.CheckpointArgs):
    seconds: float = 3.0


def scenario_interrupt(root: str) -> dict[str, Any]:
    """A blocking save interrupted by SIGINT (sent by the parent at EVENT WRITING)."""
    # Ctrl-C as an interactive Python gets it: a process started from a background job
    # or nohup inherits SIGINT ignored, and Python then installs no KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    step = f"{root}/1"
    ck = cc.Checkpointer(cc.CompositeCheckpointHandler())
    outcome = "returned"
    start = time.monotonic()
    try:
        ck.save(step, args=cc.args.Composite(slow=SlowSave(3.0)))
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    raised_after = time.monotonic() - start
    committed_at_raise = _is_committed(step)
    time.sleep(4.0)  # longer than the save had left: would it commit in the background?
    ck.close()
    return {
        "outcome": outcome,
        "raised_after_s": raised_after,
        "committed_at_raise": committed_at_raise,
        "committed_later": _is_committed(step),
        "objects_later": _list(root),
    }


def _is_committed(url: str) -> bool:
    import atomicity
    from cloudckpt.engine.loop import LoopThread

    location = cc.StoragePath.from_url(url)
    with LoopThread("engine-worker-check") as loop:
        return loop.run(atomicity.is_committed(location.backend, location.path))


def _list(url: str) -> list[str]:
    from cloudckpt.engine.loop import LoopThread

    location = cc.StoragePath.from_url(url)

    async def listing() -> list[str]:
        return sorted([i.path async for i in location.backend.list_prefix(location.path)])

    with LoopThread("engine-worker-list") as loop:
        return loop.run(listing())


def scenario_fork(root: str) -> dict[str, Any]:
    """A checkpointer of the parent used in a forked child raises, quickly, instead of hanging."""
    ck = cc.Checkpointer(cc.CompositeCheckpointHandler())
    ck.save(f"{root}/1", args=cc.args.Composite(meta=cc.args.JsonSave({"a": 1})))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what each use does, then leave without cleanup
        os.close(read)
        report = {}
        for name, use in (
            (
                "save",
                lambda: ck.save(f"{root}/2", args=cc.args.Composite(meta=cc.args.JsonSave(2))),
            ),
            ("restore", lambda: ck.restore(f"{root}/1")),
            ("new_checkpointer", lambda: cc.Checkpointer(cc.CompositeCheckpointHandler())),
            ("new_manager", lambda: cc.CheckpointManager(root)),
        ):
            try:
                use()
                report[name] = "no error"
            except RuntimeError as exc:
                report[name] = f"RuntimeError: {exc}"
            except Exception as exc:
                report[name] = f"{type(exc).__name__}: {exc}"
        ck.close()  # a no-op in the child: must not hang
        report["closed"] = "ok"
        os.write(write, json.dumps(report).encode())
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return {"child": "hung"}
    data = os.read(read, 1 << 20)
    restored = ck.restore(f"{root}/1")  # the parent's checkpointer still works
    ck.close()
    return {
        "child": json.loads(data) if data else None,
        "child_status": status,
        "parent_restore": restored.meta,
    }


if __name__ == "__main__":
    scenario, root = sys.argv[1], sys.argv[2]
    result = {"interrupt": scenario_interrupt, "fork": scenario_fork}[scenario](root)
    emit("RESULT", json.dumps(result))
