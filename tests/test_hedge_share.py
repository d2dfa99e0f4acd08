"""Hedges answer stragglers, not a channel that is slow for everyone.

A 1 GiB GCS restore_phases run logged 21 reads hedged in the same millisecond
(every read of four arrays, 0.85 s in): the whole process had been slow, not
one request. A second GET of each doubled the load on the 2 cores that had
slowed them. ``Deadlines.hedge_share`` caps the hedges in flight per kind of
request at a share of that kind's requests in flight (at least one), so a
lone straggler is still hedged at once, and a crowd waits for its deadline.
"""

from __future__ import annotations

import asyncio

import pytest

from cloudckpt.storage import Deadlines
from cloudckpt.storage.deadline import Latencies, hedged, timed

SLOW_S = 0.3
HEDGE_AFTER_S = 0.05


async def _request(seen: Latencies, share: float, i: int, sent: list[int], peak: list[int]) -> int:
    async def slow() -> int:
        await asyncio.sleep(SLOW_S)
        return i

    async def again() -> int:
        sent.append(i)
        peak[0] = max(peak[0], seen.hedging)
        return await timed(seen, 1, slow)

    return await hedged(
        lambda: timed(seen, 1, slow),
        HEDGE_AFTER_S,
        again=again,
        slots=seen,
        share=share,
    )


@pytest.mark.parametrize("count", [1, 40])
def test_a_crowd_of_slow_requests_gets_a_share_of_hedges_and_a_lone_one_gets_its_hedge(
    count: int,
) -> None:
    share = Deadlines().hedge_share
    seen = Latencies("read")
    sent: list[int] = []
    peak = [0]

    async def run() -> list[int]:
        return await asyncio.gather(*(_request(seen, share, i, sent, peak) for i in range(count)))

    assert asyncio.run(run()) == list(range(count))
    allowed = max(1, int(share * (count + peak[0])))
    assert 1 <= peak[0] <= allowed and 1 <= len(sent) <= 2 * allowed, (peak, sent)
    assert seen.hedging == 0 and seen.in_flight == 0  # every slot and request given back
    if count == 1:
        assert sent == [0]


def test_a_slot_is_given_back_when_the_hedged_wait_is_cancelled() -> None:
    seen = Latencies("read")

    async def stalled() -> None:
        await asyncio.sleep(60)

    async def run() -> None:
        task = asyncio.ensure_future(
            hedged(
                lambda: timed(seen, 1, stalled),
                0.01,
                slots=seen,
                share=0.05,
            )
        )
        await asyncio.sleep(0.2)
        assert seen.hedging == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert seen.hedging == 0 and seen.in_flight == 0


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5])
def test_a_bad_hedge_share_is_refused_naming_it(share: float) -> None:
    with pytest.raises(ValueError, match="hedge_share"):
        Deadlines(hedge_share=share)
