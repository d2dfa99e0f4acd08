"""The clouds' conflict, throttling and paging answers, injected by a proxy in front of the servers.

The emulators never answer S3 ``409 ConditionalRequestConflict`` (AWS: a
conditional write raced another; retry it), throttle (S3 ``503 SlowDown``,
GCS ``429``/``503``, possibly with ``Retry-After``), or cut listings into
small pages. cloudckpt.testing.cloudproxy.CloudProxy does, and these tests hold the
backends to each cloud's documented advice.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from botocore.exceptions import ClientError

from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage.gcs import GCSBackend
from cloudckpt.storage.retry import error_code_of, is_transient, retry_after_of
from cloudckpt.storage.s3 import S3Backend
from cloudckpt.testing.cloudproxy import CloudProxy
from cloudckpt.testing.conformance import raw_fsspec
from cloudckpt.testing.servers import LocalServers

from .backend_harness import FAST_RETRY, gcsfs_client, s3fs_client
from .helpers import BUCKET, unique


def _backend(kind: str, endpoint: str) -> S3Backend | GCSBackend:
    if kind == "s3":
        return S3Backend(endpoint_url=endpoint, retry=FAST_RETRY)
    return GCSBackend(endpoint_url=endpoint, retry=FAST_RETRY)


def _upstream(kind: str, servers: LocalServers) -> str:
    return servers.s3.endpoint if kind == "s3" else servers.gcs.endpoint


def test_conflicts_are_retried_and_other_409s_are_not() -> None:
    def s3(code: str, status: int, headers: dict[str, str] | None = None) -> ClientError:
        meta = {"HTTPStatusCode": status, "HTTPHeaders": headers or {}}
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": meta}, "PutObject")

    conflict = s3("ConditionalRequestConflict", 409)
    wrapped = OSError(5, "translated by s3fs")
    wrapped.__cause__ = conflict
    assert is_transient(wrapped) and error_code_of(wrapped) == "ConditionalRequestConflict"
    assert not is_transient(s3("BucketNotEmpty", 409))
    assert retry_after_of(s3("SlowDown", 503, {"retry-after": "3"})) == 3.0
    assert retry_after_of(s3("SlowDown", 503)) is None


def test_racing_creates_through_409_conflicts_have_one_winner_each(
    servers: LocalServers, loop: LoopThread
) -> None:
    raw_get, _ = raw_fsspec(s3fs_client())
    root = f"{BUCKET}/{unique('conflict')}"
    keys = [f"{root}/marker-{i}" for i in range(12)]
    racers = 6
    with CloudProxy(servers.s3.endpoint, flavor="s3", conflict_rate=0.4, seed=3) as proxy:
        backends = [_backend("s3", proxy.endpoint) for _ in range(racers)]

        async def race() -> list[list[bool]]:
            out = []
            for key in keys:
                out.append(
                    list(
                        await asyncio.gather(
                            *(
                                b.put_if_absent(key, f"writer-{i}".encode())
                                for i, b in enumerate(backends)
                            )
                        )
                    )
                )
            for b in backends:
                await b.aclose()
            return out

        results = loop.run(race(), timeout=300)
    winners = [r.index(True) for r in results]
    assert all(sum(r) == 1 for r in results), results
    for key, winner in zip(keys, winners, strict=True):
        assert raw_get(key) == f"writer-{winner}".encode()
    conflicts = proxy.stats.injected["409"]
    retries = sum(b.stats.retries["put_if_absent"] for b in backends)
    assert conflicts > 0 and retries >= conflicts
    print(
        f"\n[s3] {len(keys)} keys x {racers} racers: 409s injected={conflicts} "
        f"put_if_absent retries={retries} winners per key={[sum(r) for r in results]}"
    )


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_throttling_waits_as_long_as_retry_after_says(
    kind: str, servers: LocalServers, loop: LoopThread
) -> None:
    root = f"{BUCKET}/{unique('throttle')}"
    payloads = {f"{root}/o-{i}": os.urandom(100) for i in range(6)}
    with CloudProxy(
        _upstream(kind, servers), flavor=kind, throttle_rate=0.4, retry_after_s=1, seed=5
    ) as proxy:
        backend = _backend(kind, proxy.endpoint)

        async def run() -> dict[str, bytes | None]:
            for key, data in payloads.items():  # one at a time: the log pairs each retry
                await backend.put(key, data)
            read = {key: await backend.get(key) for key in payloads}
            await backend.aclose()
            return read

        read = loop.run(run(), timeout=300)
    assert read == payloads
    injected = sum(proxy.stats.injected.values())
    assert injected > 0
    # FAST_RETRY backs off at most 0.2 s; every retry after a throttle came >= 1 s later.
    log = proxy.stats.log
    gaps = [
        log[i + 1][0] - log[i][0]
        for i in range(len(log) - 1)
        if log[i][3] in (429, 503) and log[i + 1][2] == log[i][2]
    ]
    assert len(gaps) == injected and min(gaps) >= 0.95, gaps
    assert backend.stats.total_retries() == injected
    print(f"\n[{kind}] throttled={dict(proxy.stats.injected)} waits={[round(g, 2) for g in gaps]}")


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_listing_and_deleting_follow_every_page(
    kind: str, servers: LocalServers, loop: LoopThread
) -> None:
    raw_get, raw_put = raw_fsspec(s3fs_client() if kind == "s3" else gcsfs_client())
    root = f"{BUCKET}/{unique('pages')}"
    keys = {f"{root}/d{i % 3}/o-{i:02d}" for i in range(23)}
    for key in keys:
        raw_put(key, b"x")
    with CloudProxy(_upstream(kind, servers), flavor=kind, page_size=7) as proxy:
        backend = _backend(kind, proxy.endpoint)

        async def run() -> tuple[set[str], set[str]]:
            listed = {i.path async for i in backend.list_prefix(root)}
            await backend.delete_prefix(root)
            left = {i.path async for i in backend.list_prefix(root)}
            await backend.aclose()
            return listed, left

        listed, left = loop.run(run(), timeout=120)
    assert listed == keys and left == set()
    assert all(raw_get(k) is None for k in keys)
    assert proxy.stats.largest_page == 7 and proxy.stats.continued_pages >= 6


def test_a_store_that_refuses_create_only_puts_is_named_and_never_written_unsafely(
    servers: LocalServers, loop: LoopThread
) -> None:
    raw_get, _ = raw_fsspec(s3fs_client())
    key = f"{BUCKET}/{unique('no-precond')}/_COMMITTED"
    with CloudProxy(servers.s3.endpoint, flavor="s3", refuse_preconditions=True) as proxy:
        backend = _backend("s3", proxy.endpoint)
        with pytest.raises(NotImplementedError, match="does not support create-only puts"):
            loop.run(backend.put_if_absent(key, b"marker"))
        loop.run(backend.aclose())
    assert raw_get(key) is None  # no fallback to an unconditional put
    assert backend.stats.total_retries() == 0
    assert [entry[1] for entry in proxy.stats.log] == ["PUT"]
