"""A read held back by its sink (the restore placing bytes slower than they arrive).

A restore onto another mesh reads inner chunks into sinks
(``cloudckpt.handlers.pytree.scatter.Scatter``) whose placing threads have a
bounded backlog: the reader waits in the sink's ``room`` until they catch up.
That wait is the restore's own, not the store's. Counted as the store's, it
made reads look slow and they were hedged: 16 hedged reads in three 1 GiB
GCS restore_phases runs, each a second GET of the same bytes into new
memory, on the very CPU whose shortage had held the first (issue 18). The
read's hedge delay, its attempt deadline and the answer time it records all
leave the held time out.

Against the real servers (SeaweedFS, fake-gcs-server): the held time here is
several times both the hedge delay and the attempt deadline, so without the
exclusion the read is hedged and cut.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import pytest

from cloudckpt.storage import Deadlines, RetryPolicy
from cloudckpt.storage.base import BACKEND_REQUESTS
from cloudckpt.storage.deadline import RequestStalled, within
from cloudckpt.storage.held import HeldClock
from cloudckpt.storage.s3get import DIRECT_READS
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique
from .test_hedged_writes import _backend
from .test_stragglers import _upstream

NBYTES = 4 * 1024 * 1024
#: The reader waits this long in ``room`` before each of the first ``HOLDS`` pieces.
HOLD_S = 1.0
HOLDS = 4
#: The read's static bounds: hedged after HEDGE_S, cut after CUT_S. Both are well below the
#: held time (4 s) and above the time a loaded CI host takes to start answering: at 0.2 s
#: and 0.5 s, SeaweedFS once took 0.23 s to start, the read was hedged before any hold.
HEDGE_S = 1.0
CUT_S = 2.0


class HeldSink:
    """A sink whose reader must wait ``HOLD_S`` for room, ``HOLDS`` times (a slow placement)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.got = bytearray(nbytes)
        self.rooms = 0
        self._held = HeldClock()

    def write(self, pos: int, data: memoryview) -> None:
        self.got[pos : pos + len(data)] = data

    def write_later(self, pos: int, data: memoryview, release: Any = None) -> None:
        self.write(pos, data)
        if release is not None:
            release()

    def crowded(self) -> bool:
        return self.rooms < HOLDS

    async def room(self) -> None:
        if self.rooms >= HOLDS:
            return
        self.rooms += 1
        with self._held.waiting():
            await asyncio.sleep(HOLD_S)

    @property
    def held_s(self) -> float:
        return self._held.seconds


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_read_held_by_its_sink_is_neither_hedged_nor_cut(
    kind: str, servers: LocalServers, caplog: pytest.LogCaptureFixture
) -> None:
    path = f"{BUCKET}/{unique('held')}/chunk"
    payload = os.urandom(NBYTES)
    # With no answers known yet, the static bounds rule: hedged after HEDGE_S, cut after
    # CUT_S; the sink holds the read for HOLDS * HOLD_S, twice the cut.
    deadlines = Deadlines(
        floor_s=CUT_S, min_rate_bps=1e12, hedge_floor_s=HEDGE_S, hedge_rate_bps=1e12
    )
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2)
    writer = _backend(kind, _upstream(kind, servers), Deadlines(), retry)
    backend = _backend(kind, _upstream(kind, servers), deadlines, retry)
    sink = HeldSink(NBYTES)

    async def run() -> tuple[int | None, float]:
        try:
            await writer.put(path, payload)
            start = time.monotonic()
            got = await backend.read_into(path, 0, [sink])
            return got, time.monotonic() - start
        finally:
            await writer.aclose()
            await backend.aclose()

    with caplog.at_level(logging.DEBUG, logger="cloudckpt.storage.deadline"):
        got, elapsed = asyncio.run(run())
    assert got == NBYTES and bytes(sink.got) == payload
    assert sink.rooms == HOLDS and sink.held_s >= HOLDS * HOLD_S * 0.9
    assert elapsed >= sink.held_s
    assert not [r for r in caplog.records if "hedging" in r.getMessage()]
    assert backend.stats.total_retries() == 0  # never cut, so never retried
    # The answer time recorded is the store's: the held seconds are left out.
    seen = backend.latencies(DIRECT_READS if kind == "s3" else BACKEND_REQUESTS)
    recorded = seen.typical_s(NBYTES, 1)
    assert recorded is not None and recorded < HOLD_S, (recorded, elapsed)


def test_the_deadline_moves_back_while_held_and_still_cuts_the_stall_after() -> None:
    """Held for 0.4 s against a 0.2 s deadline, then stalled: cut once the hold stops, not in it."""
    held = [0.0]

    async def held_then_stalled() -> None:
        start = time.monotonic()
        while time.monotonic() - start < 0.4:
            await asyncio.sleep(0.01)
            held[0] = time.monotonic() - start
        await asyncio.sleep(60)

    async def run() -> float:
        start = time.monotonic()
        with pytest.raises(RequestStalled, match="waited to place bytes"):
            await within(0.2, lambda: "read gs://b/x", held_then_stalled, lambda: held[0])
        return time.monotonic() - start

    elapsed = asyncio.run(run())
    assert held[0] >= 0.4 and 0.4 <= elapsed < 10, elapsed


def test_a_deadline_without_a_hold_is_unchanged() -> None:
    async def stalled() -> None:
        await asyncio.sleep(60)

    async def run() -> float:
        start = time.monotonic()
        with pytest.raises(RequestStalled, match=r"no answer within 0\.2s$"):
            await within(0.2, lambda: "read gs://b/x", stalled, lambda: 0.0)
        return time.monotonic() - start

    assert asyncio.run(run()) < 10
