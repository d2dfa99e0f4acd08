"""A hedge that wins stops the request it replaced: no stalled request outlives its caller.

When a data request stalls and its hedge answers, the stalled original is of
no more use; left running it holds a request slot and a connection. The
proxy (:class:`cloudckpt.testing.stallproxy.StallProxy`, standing for a
wedged connection or a dead storage node on the real clouds) holds requests
with their connection open and counts those whose client still holds it.

* cloudckpt's own HTTP requests (aiohttp: the backends, GCS direct chunk
  reads) are cancelled, which closes their connection, as soon as the winner
  lands, and also when an attempt's deadline cuts a request still waiting to
  be hedged (before, that request ran on, unawaited, for ever).
* tensorstore's kvstore requests (packs) are cancelled at their future
  (``.cancel()``), so tensorstore never sends them again; but tensorstore
  0.1.x cannot abort a transfer in flight (its curl transport has no
  cancellation), so the stalled connection closes at its stall cut
  (``Deadlines.floor_s``), not before. Its zarr chunk writes and array reads
  run on as cache writebacks and reads, which a cancellation does not reach:
  closed at the cut, they are sent once more (the same bytes to the same
  per-attempt key). The tests check exactly that.

The client of the save-and-restore cases (``tests/hedge_cancel_worker.py``, a
process of its own: tensorstore reads its stall bound once per process)
pauses after the save and after the restore, with its connections alive,
while the test looks at the proxy.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest

from cloudckpt.storage.deadline import RequestStalled, hedged, within
from cloudckpt.testing.servers import LocalServers
from cloudckpt.testing.stallproxy import StallProxy

from . import zygote
from .helpers import BUCKET, run_at_once, unique
from .test_stragglers import _upstream, worker_env

#: The static bounds where cloudckpt's own requests are stalled: long, so that only an
#: adaptive hedge answers the held request and only a cancellation closes it in time.
LONG_S = 60.0
#: How long the test waits for the client to close a held connection (well inside LONG_S).
CLOSE_WITHIN_S = LONG_S / 3
#: The static bounds where tensorstore's requests are stalled: its stall cut closes the held
#: connection after this long, and the test waits for that, then for a retry that must not come.
CUT_S = 6.0
#: How long a retry of a cut request would take to come (tensorstore's backoff is ~1-2 s).
RETRY_WITHIN_S = 10.0


class FirstOf:
    """Holds the first request of ``methods`` whose path contains ``marker``."""

    def __init__(self, methods: set[str], marker: str) -> None:
        self.methods = methods
        self.marker = marker
        self.seen: list[str] = []
        self.held: list[str] = []
        self.times: list[float] = []  # arrival of each of ``seen`` (for failure messages)

    def __call__(self, method: str, path: str) -> bool:
        path = unquote(path)
        if method not in self.methods or self.marker not in path:
            return False
        self.seen.append(path)
        self.times.append(time.monotonic())
        if not self.held:
            self.held.append(path)
            return True
        return False


class Worker:
    """The client process, driven line by line."""

    def __init__(
        self, kind: str, servers: LocalServers, proxy: StallProxy, url: str, floor_s: float
    ) -> None:
        env = worker_env(kind, proxy.endpoint)
        args = [url, str(floor_s), "1", str(floor_s)]  # one attempt: no retry answers for it
        self.process = zygote.spawn("tests.hedge_cancel_worker", args, env=env)

    def next_event(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line = self.process.stdout.readline()
            if not line:
                self.process.wait(timeout=60)
                assert self.process.stderr is not None
                raise AssertionError(
                    f"worker ended (rc {self.process.returncode}):\n"
                    f"{self.process.stderr.read()[-3000:]}"
                )
            if line.startswith("{"):
                event = json.loads(line)
                assert "error" not in event, event
                return event

    def go_on(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        """Waits for the worker to end after its last step."""
        self.process.wait(timeout=120)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


def _closed_by_client(proxy: StallProxy, within_s: float) -> bool:
    """Whether the client closed every held request, waiting up to ``within_s``."""
    deadline = time.monotonic() + within_s
    while proxy.open_stalled() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proxy.open_stalled() == 0


def _when(pick: FirstOf) -> list[tuple[float, str]]:
    """When each request for the held object came, from the first."""
    held = pick.held[0]
    return [
        (round(t - pick.times[0], 2), path.rsplit("/", 4)[-4])
        for t, path in zip(pick.times, pick.seen, strict=True)
        if path == held
    ]


def _check_loser(proxy: StallProxy, pick: FirstOf, channel: str) -> None:
    """The held request was asked again (the hedge), and the loser was stopped as it can be.

    ``channel``: ``aiohttp`` (closed by its cancellation, long before any
    deadline); ``tensorstore`` (a kvstore future: closed at tensorstore's
    stall cut and never sent again); ``zarr`` (tensorstore's chunk writeback
    or array read, which a cancellation does not reach: closed at the stall
    cut and sent once more, the same bytes to the same per-attempt key).
    """
    assert len(pick.held) == 1, pick.seen
    held = pick.held[0]
    assert pick.seen.count(held) == 2, _when(pick)  # the held request and its hedge
    if channel == "aiohttp":
        assert _closed_by_client(proxy, CLOSE_WITHIN_S), (proxy.open_stalled(), proxy.stats)
    else:
        assert _closed_by_client(proxy, 4 * CUT_S), (proxy.open_stalled(), proxy.stats)
        time.sleep(RETRY_WITHIN_S)
        resent = pick.seen.count(held) - 2
        assert resent == 0 if channel == "tensorstore" else resent <= 1, _when(pick)
        assert proxy.open_stalled() == 0  # a resent request is answered, not held
    assert proxy.stats.abandoned == 1


#: (id, kind, phase, methods held, marker, channel): the cases, run at once by the test below.
CASES = [
    ("gcs-chunk-read", "gcs", "restore", {"GET"}, "/arrays/7/c/", "aiohttp"),  # direct reader
    ("gcs-pack-write", "gcs", "save", {"POST"}, "/packs/", "tensorstore"),
    ("gcs-chunk-write", "gcs", "save", {"POST"}, "/arrays/7/c/", "zarr"),  # chunk writeback
    ("s3-chunk-write", "s3", "save", {"PUT"}, "/arrays/7/c/", "aiohttp"),  # direct chunk writes
    ("s3-chunk-read", "s3", "restore", {"GET"}, "/arrays/7/c/", "aiohttp"),  # direct reader
]


def _one_case(
    kind: str, phase: str, methods: set[str], marker: str, channel: str, servers: LocalServers
) -> None:
    url = f"{'s3' if kind == 's3' else 'gs'}://{BUCKET}/{unique('hcancel')}"
    pick = FirstOf(methods, marker)
    floor_s = LONG_S if channel == "aiohttp" else CUT_S
    with StallProxy(_upstream(kind, servers), flavor=kind, stall=pick) as proxy:
        worker = Worker(kind, servers, proxy, url, floor_s)
        try:
            assert worker.next_event() == {"saved": True}
            if phase == "save":
                _check_loser(proxy, pick, channel)
            worker.go_on()
            assert worker.next_event() == {"restored": True, "equal": True}
            if phase == "restore":
                _check_loser(proxy, pick, channel)
            worker.go_on()
            worker.finish()
        finally:
            worker.stop()
    assert worker.process.returncode == 0
    assert len(proxy.stats.stalled) == 1


def test_the_stalled_loser_of_a_hedge_is_stopped_when_the_hedge_wins(
    servers: LocalServers,
) -> None:
    """Every case at once, each with its own proxy, worker and run.

    A case mostly waits: for a stall cut (``CUT_S``), then through the window in
    which a retry would come (``RETRY_WITHIN_S``). One after another they took
    70 s; at once, about as long as the slowest. A failure names its case.
    """
    run_at_once({case[0]: functools.partial(_one_case, *case[1:], servers) for case in CASES})


def test_a_request_cut_while_waiting_to_be_hedged_is_closed(servers: LocalServers) -> None:
    """An attempt's deadline cuts a request before its hedge delay: the request is closed.

    ``within`` cancels ``hedged`` while it waits to hedge; the request it
    started must not run on unawaited (it would hold its connection for
    ever). And when a hedge wins, the loser's connection is closed too.
    """
    key = f"{BUCKET}/{unique('hcut')}"
    with StallProxy(servers.s3.endpoint, flavor="s3", stall=lambda m, p: "stalled" in p) as proxy:

        async def run() -> int:
            async with aiohttp.ClientSession() as session:

                async def get(name: str) -> int:
                    async with session.get(f"{proxy.endpoint}/{key}/{name}") as answer:
                        await answer.read()
                        return answer.status

                with pytest.raises(RequestStalled):
                    await within(0.5, lambda: "get", lambda: hedged(lambda: get("stalled"), 600))
                closed_after_cut = await asyncio.to_thread(_closed_by_client, proxy, CLOSE_WITHIN_S)
                assert closed_after_cut, proxy.stats
                status = await hedged(lambda: get("stalled-2"), 0.2, again=lambda: get("other"))
                closed_after_win = await asyncio.to_thread(_closed_by_client, proxy, CLOSE_WITHIN_S)
                assert closed_after_win, proxy.stats
                return status

        status = asyncio.run(run())
    assert status in (200, 403, 404)  # the hedge's answer, whatever the server said
    assert len(proxy.stats.stalled) == 2 and proxy.stats.abandoned == 2
