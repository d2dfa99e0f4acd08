"""A GCS client dropped without ``aclose`` closes its session on its own loop, quietly.

gcsfs closes a session it finds open when its filesystem is collected, on
the loop the filesystem was told about. An asynchronous filesystem is told
about none, and gcsfs then closes the session on whatever loop runs at that
moment: fsspec's own IO thread, or the collecting thread's running loop.
aiohttp refuses ("attached to a different loop"), inside a finalizer, so
the error surfaces at some unrelated later moment (CI saw it fail the crash
campaign as two unraisable exceptions). The backend tells each filesystem
its loop, so a session whose loop is gone is closed at once (its sockets
shut, as gcsfs does at interpreter exit) and one whose loop still runs is
closed on it.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

import fsspec.asyn
import pytest

from cloudckpt.storage.gcs import GCSBackend
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET


def _opened(backend: GCSBackend, loop: asyncio.AbstractEventLoop) -> Any:
    """The aiohttp session ``backend`` opened on ``loop`` by one request."""
    assert loop.run_until_complete(backend.exists(f"{BUCKET}/no-such-object")) is False
    return loop.run_until_complete(backend._fs())._session


@pytest.mark.parametrize("loop_state", ["idle", "closed"])
def test_a_session_whose_loop_does_not_run_is_closed_when_collected(
    servers: LocalServers, monkeypatch: pytest.MonkeyPatch, loop_state: str
) -> None:
    fsspec.asyn.get_loop()  # fsspec's IO thread runs, as after any synchronous fsspec call
    caught: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", caught.append)
    backend = GCSBackend(endpoint_url=servers.gcs.endpoint)
    loop = asyncio.new_event_loop()
    try:
        session = _opened(backend, loop)
        assert not session.closed
        if loop_state == "closed":
            loop.close()
        del backend  # no aclose: the session is still open, its loop not running
        gc.collect()
        assert [str(u.exc_value) for u in caught] == []
        assert session.closed
    finally:
        loop.close()


def test_a_session_whose_loop_runs_is_closed_on_that_loop(
    servers: LocalServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    caught: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", caught.append)
    loop = asyncio.new_event_loop()
    try:
        backend = GCSBackend(endpoint_url=servers.gcs.endpoint)
        session = _opened(backend, loop)

        async def drop() -> None:
            nonlocal backend
            del backend  # dropped without aclose while its loop runs
            gc.collect()
            for _ in range(3):
                await asyncio.sleep(0)  # the close gcsfs scheduled on this loop runs

        loop.run_until_complete(drop())
        assert [str(u.exc_value) for u in caught] == []
        assert session.closed
    finally:
        loop.close()
