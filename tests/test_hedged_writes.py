"""Stalled writes at long floors: hedged data writes and adaptive deadlines, through a proxy.

The static bounds (``Deadlines.floor_s``, ``hedge_floor_s``) are set to 60 s
here and retries to one attempt where a stalled request would otherwise
hold the save for the whole floor: each test completes only because the
bound adapted to the answer times the store showed (a hedge, or a cut and a
retry). Nothing asserts on wall-clock time; the tests assert on completion,
on the values, on what is in the bucket and on what the proxy saw: the held
request, and a second write of the same object that answered it.

The proxy (:class:`cloudckpt.testing.stallproxy.StallProxy`) stands for a
wedged connection or a dead storage node on the real clouds; the emulators
never stall.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

import pytest

from cloudckpt.storage import Deadlines, RetryPolicy
from cloudckpt.storage.deadline import Latencies
from cloudckpt.testing.servers import LocalServers
from cloudckpt.testing.stallproxy import StallProxy

from .helpers import BUCKET, unique
from .test_stragglers import _listed, _run_worker, _upstream

LONG_S = 60.0
WRITES = {"PUT", "POST"}


class FirstWriteOf:
    """Holds the first write picked (by ``marker`` in its path, or else the ``nth``).

    Records every write it sees. GCS uploads made by gcsfs name their object
    in the body, not the path, so documents are picked by position.
    """

    def __init__(self, marker: str = "", nth: int | None = None) -> None:
        self.marker = marker
        self.nth = nth
        self.writes: list[str] = []
        self.held: list[str] = []

    def __call__(self, method: str, path: str) -> bool:
        if method not in WRITES:
            return False
        path = unquote(path)
        self.writes.append(path)
        picked = len(self.writes) - 1 == self.nth if self.nth is not None else self.marker in path
        if picked and not self.held:
            self.held.append(path)
            return True
        return False

    def matching(self) -> list[str]:
        return [p for p in self.writes if self.marker in p]


@pytest.mark.parametrize(
    ("kind", "marker"),
    [
        ("s3", "/arrays/7/c/"),
        ("gcs", "/arrays/7/c/"),
        ("gcs", "/packs/"),
        ("s3", "/arrays/9/zarr.json"),
    ],
    ids=["s3-chunk", "gcs-chunk", "gcs-pack", "s3-array-metadata"],
)
def test_a_stalled_data_write_is_answered_by_its_hedge_at_long_floors(
    kind: str, marker: str, servers: LocalServers
) -> None:
    """One attempt, a 60 s floor and a 60 s static hedge delay: only an adaptive hedge saves it."""
    url = f"{'s3' if kind == 's3' else 'gs'}://{BUCKET}/{unique('hedgew')}"
    pick = FirstWriteOf(marker)
    with StallProxy(_upstream(kind, servers), flavor=kind, stall=pick) as proxy:
        rc, result = _run_worker(
            kind, servers, proxy, url, attempts=1, floor_s=LONG_S, hedge_floor_s=LONG_S
        )
    assert rc == 0, result
    assert result["equal"] is True
    assert len(pick.held) == 1 and len(proxy.stats.stalled) == 1, proxy.stats.stalled
    # The same object was written again (the hedge), and that write was answered.
    assert len(pick.matching()) >= 2, pick.matching()
    listed = _listed(url)
    assert "_COMMITTED" in listed
    assert any(marker.lstrip("/") in name for name in listed), sorted(listed)


def _backend(kind: str, endpoint: str, deadlines: Deadlines, retry: RetryPolicy):  # type: ignore[no-untyped-def]
    from cloudckpt.storage.gcs import GCSBackend
    from cloudckpt.storage.s3 import S3Backend

    if kind == "s3":
        return S3Backend(endpoint_url=endpoint, retry=retry, deadlines=deadlines)
    return GCSBackend(endpoint_url=endpoint, retry=retry, deadlines=deadlines)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
@pytest.mark.parametrize("create_only", [False, True], ids=["put", "put_if_absent"])
def test_a_stalled_document_write_is_cut_once_answer_times_are_known(
    kind: str, create_only: bool, servers: LocalServers
) -> None:
    """A 60 s floor: after a few answered writes the deadline is theirs, and the retry lands.

    The held request is forwarded first (its write takes effect, its answer
    never comes): a create-only retry then finds the object and, by its create
    token, knows it is its own, so ``put_if_absent`` still answers True.
    """
    prefix = f"{BUCKET}/{unique('cut')}"
    payload = b'{"step": 14}'
    stalled_key = f"{prefix}/doc-stalled.json"
    deadlines = Deadlines(floor_s=LONG_S, hedge_floor_s=LONG_S)
    before = deadlines.min_samples + 1  # answered writes, to judge the held one by
    pick = FirstWriteOf(nth=before)
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_backoff_s=0.2)
    with StallProxy(_upstream(kind, servers), flavor=kind, stall=pick, forward_first=True) as proxy:
        backend = _backend(kind, proxy.endpoint, deadlines, retry)

        async def run() -> tuple[object, bytes | None, object]:
            try:
                write = backend.put_if_absent if create_only else backend.put
                for i in range(before):
                    await write(f"{prefix}/doc-{i}.json", payload)
                answered = await write(stalled_key, payload)
                again = await backend.put_if_absent(stalled_key, b"other") if create_only else None
                return answered, await backend.get(stalled_key), again
            finally:
                await backend.aclose()

        answered, stored, again = asyncio.run(run())
    assert len(proxy.stats.stalled) == 1
    assert stored == payload
    assert backend.stats.total_retries() == 1  # the held attempt was cut and retried once
    if create_only:
        assert answered is True  # the landed write was recognised as this call's own
        assert again is False  # and the object stays create-only
    # The held write, its retry, and (create-only) the refused second create.
    assert len(pick.writes) == before + 2 + (1 if create_only else 0), pick.writes


# ----------------------------------------------------------------------------- the policy
def test_the_hedge_delay_follows_the_answers_of_its_kind() -> None:
    """A request is judged by the answers that came while it ran, else by the latest ones."""
    mib = 1 << 20
    d = Deadlines(floor_s=20, hedge_floor_s=5, hedge_factor=2.5, hedge_min_s=0.5, min_samples=3)
    seen = Latencies("w")
    assert d.hedge_delay_s(mib, seen, since=100.0) == d.hedge_after_s(mib)  # nothing known
    for _ in range(4):
        seen.started()
    # A wave in flight and no answer yet: wait for theirs rather than the static guess.
    assert d.hedge_delay_s(mib, seen, since=100.0) == d.request_s(mib)
    for _ in range(3):
        seen.observe(mib, 0.4, start=100.0)
        seen.ended()
    assert d.hedge_delay_s(mib, seen, since=100.0) == pytest.approx(1.0)  # 2.5 x 0.4
    assert d.hedge_delay_s(4 * mib, seen, since=100.0) == pytest.approx(4.0)  # scaled by size
    assert d.hedge_delay_s(1 << 10, seen, since=100.0) == pytest.approx(1.0)  # never scaled down
    # Slower answers came in later: a request running then is judged by them alone ...
    for _ in range(3):
        seen.observe(mib, 2.0, start=101.0)  # answered at t=103
    assert d.hedge_delay_s(mib, seen, since=102.0) == pytest.approx(5.0)  # 2.5 x 2.0
    # ... and one that started after every answer by the latest answers of its kind.
    assert d.hedge_delay_s(mib, seen, since=104.0) == pytest.approx(2.5 * 1.2)
    fast, slow = Latencies("fast"), Latencies("slow")
    for _ in range(3):
        fast.observe(mib, 0.01)
        slow.observe(mib, 100.0)
    assert d.hedge_delay_s(mib, fast, since=0.0) == 0.5  # never under hedge_min_s
    assert d.hedge_delay_s(mib, slow, since=0.0) == d.request_s(mib)  # never past the cut


def test_the_attempt_deadline_adapts_with_the_floor_as_its_cap() -> None:
    d = Deadlines(floor_s=20, min_rate_bps=1 << 20, cut_factor=10, cut_min_s=2, min_samples=2)
    seen = Latencies("put")
    assert d.attempt_s(0, seen) == 20.0  # first requests: the floor
    seen.observe(100, 0.05)
    assert d.attempt_s(0, seen) == 20.0
    seen.observe(100, 0.05)
    assert d.attempt_s(0, seen) == 2.0  # 10 x 0.05 s, raised to cut_min_s
    seen.observe(100, 1.0)
    seen.observe(100, 1.0)
    seen.observe(100, 1.0)
    assert d.attempt_s(0, seen) == 10.0  # 10 x the median
    assert d.attempt_s(1 << 30, seen) == d.request_s(1 << 30)  # capped by the static bound


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hedge_factor": 0.5},
        {"cut_factor": 0},
        {"min_samples": 0},
        {"hedge_min_s": -1},
        {"cut_min_s": 0},
    ],
)
def test_bad_adaptive_settings_are_refused_naming_them(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Deadlines(**kwargs)


def test_each_attempt_after_a_cut_gets_a_longer_deadline() -> None:
    d = Deadlines(floor_s=20, min_rate_bps=1 << 20, cut_factor=10, cut_min_s=0.5, min_samples=2)
    seen = Latencies("list")
    for _ in range(3):
        seen.observe(0, 0.01)
    assert d.attempt_s(0, seen) == 0.5
    assert d.attempt_s(0, seen, cuts=1) == 2.0  # x cut_growth (4) per earlier cut
    assert d.attempt_s(0, seen, cuts=2) == 8.0
    assert d.attempt_s(0, seen, cuts=3) == 20.0  # the static bound stays the cap
    assert d.attempt_s(0, seen, cuts=10_000) == 20.0
    assert Deadlines(cut_growth=1).attempt_s(0, seen, cuts=5) == Deadlines().attempt_s(0, seen)
    with pytest.raises(ValueError, match="cut_growth"):
        Deadlines(cut_growth=0.5)


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_listing_slower_than_every_adaptive_cut_is_answered_on_a_later_attempt(
    kind: str, servers: LocalServers
) -> None:
    """Found by ``make bench`` (listing, 5 x 10,000 objects on fake-gcs-server).

    Small writes teach the backend that requests answer in milliseconds, so an
    attempt is cut at ``cut_min_s``; a delimiter listing of a large prefix takes
    longer every time (the proxy holds each one 0.8 s here, as a server scanning
    many objects would). Cut at the same deadline on every attempt, the listing
    failed after the whole retry budget; each attempt after a cut now waits
    ``cut_growth`` times longer, and the second one is answered.
    """
    from cloudckpt.testing.faultproxy import FaultProxy

    prefix = f"{BUCKET}/{unique('slowlist')}"
    held_s = 0.8

    def delay(method: str, path_qs: str, headers: object, body: bytes) -> float:
        return held_s if method == "GET" and "delimiter" in path_qs else 0.0

    deadlines = Deadlines(cut_min_s=0.3, min_samples=3, hedge=False)
    retry = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
    proxy = FaultProxy(_upstream(kind, servers), fault_rate=0.0, flavor=kind, delay=delay)
    with proxy:
        backend = _backend(kind, proxy.endpoint, deadlines, retry)

        async def run() -> list[str]:
            try:
                for i in range(6):  # answered in milliseconds: the deadlines adapt to them
                    await backend.put(f"{prefix}/{i}/x", b"x")
                return await backend.list_children(prefix)
            finally:
                await backend.aclose()

        names = asyncio.run(run())
    assert names == [str(i) for i in range(6)]
    assert backend.stats.total_retries() == 1  # cut once at 0.3 s, answered within 1.2 s
    listings = [p for m, p in proxy.stats.log if m == "GET" and "delimiter" in p]
    assert len(listings) == 2, listings
