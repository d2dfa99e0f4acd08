"""Retries through a fault-injecting proxy placed in front of the real servers."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.storage.gcs import GCSBackend
from cloudckpt.storage.retry import RetryPolicy, RetryStats, http_status_of, is_transient
from cloudckpt.storage.s3 import S3Backend
from cloudckpt.testing.conformance import raw_fsspec
from cloudckpt.testing.faultproxy import FaultProxy
from cloudckpt.testing.servers import LocalServers

from .backend_harness import FAST_RETRY, gcsfs_client, s3fs_client
from .helpers import BUCKET, unique


def _backend(
    kind: str, endpoint: str, retry: RetryPolicy, deadlines: Deadlines | None = None
) -> S3Backend | GCSBackend:
    """A backend through ``endpoint``; ``deadlines`` None: the backend's own default."""
    if kind == "s3":
        return S3Backend(endpoint_url=endpoint, retry=retry, deadlines=deadlines)
    return GCSBackend(endpoint_url=endpoint, retry=retry, deadlines=deadlines)


def _upstream(kind: str, servers: LocalServers) -> str:
    return servers.s3.endpoint if kind == "s3" else servers.gcs.endpoint


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_faulty_channel_loses_nothing(kind: str, servers: LocalServers, loop: LoopThread) -> None:
    raw_get, _ = raw_fsspec(s3fs_client() if kind == "s3" else gcsfs_client())
    root = f"{BUCKET}/{unique('faults')}"
    payloads = {f"{root}/obj-{i:03d}": os.urandom(1024 * (1 + (i * 37) % 200)) for i in range(60)}
    with FaultProxy(_upstream(kind, servers), fault_rate=0.3, seed=7, flavor=kind) as proxy:
        # Unhedged, so that each status fault is answered by a retry of ours: a hedge
        # meeting a 503 beside its first request's 503 is one retry for two faults (seen
        # once in a full `make test`, where load had pushed a request past its hedge delay).
        backend = _backend(kind, proxy.endpoint, FAST_RETRY, Deadlines(hedge=False))

        async def exercise() -> tuple[list[bool], dict[str, bytes | None], set[str]]:
            keys = list(payloads)
            creates = keys[::2]
            await asyncio.gather(*(backend.put(k, payloads[k]) for k in keys[1::2]))
            created = list(
                await asyncio.gather(*(backend.put_if_absent(k, payloads[k]) for k in creates))
            )
            read = dict(
                zip(keys, await asyncio.gather(*(backend.get(k) for k in keys)), strict=True)
            )
            listed = {info.path async for info in backend.list_prefix(root)}
            await backend.aclose()
            return created, read, listed

        created, read, listed = loop.run(exercise(), timeout=300)

    # Every create succeeded once, even when its response was lost and the retry met its own object.
    assert created == [True] * len(created)
    assert read == payloads
    assert listed == set(payloads)
    assert all(raw_get(k) == v for k, v in payloads.items())
    assert proxy.stats.total_faults > 10
    assert set(proxy.stats.faults) == {"503", "429", "drop", "lost_response"}
    # Status faults can only be retried here; aiohttp may transparently resend a
    # request once on a dropped keep-alive connection, so drops are not all ours.
    assert backend.stats.total_retries() >= proxy.stats.faults["503"] + proxy.stats.faults["429"]
    verified = sum(map(len, payloads.values()))
    print(
        f"\n[{kind}] requests={proxy.stats.requests} faulted={proxy.stats.total_faults} "
        f"({dict(proxy.stats.faults)}) retries={backend.stats.total_retries()} "
        f"calls={backend.stats.total_calls()} bytes_verified={verified}"
    )


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_dead_channel_gives_up_within_budget(
    kind: str, servers: LocalServers, loop: LoopThread
) -> None:
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05, max_total_s=20)
    with FaultProxy(_upstream(kind, servers), fault_rate=1.0, modes=("503",), flavor=kind) as proxy:
        backend = _backend(kind, proxy.endpoint, policy)
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=r"put .*failed 4 times") as info:
            loop.run(backend.put(f"{BUCKET}/dead/x", b"x"))
        loop.run(backend.aclose())
    assert time.monotonic() - start < 15
    assert "RetryPolicy.max_attempts" in str(info.value)
    assert backend.stats.calls["put"] == 4 and backend.stats.gave_up["put"] == 1


def test_time_budget_bounds_retries(servers: LocalServers, loop: LoopThread) -> None:
    policy = RetryPolicy(
        max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.1, max_total_s=1.0
    )
    with FaultProxy(servers.s3.endpoint, fault_rate=1.0, modes=("429",)) as proxy:
        backend = _backend("s3", proxy.endpoint, policy)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="retry budget"):
            loop.run(backend.get(f"{BUCKET}/x"))
        loop.run(backend.aclose())
    assert time.monotonic() - start < 5


def test_permanent_errors_are_not_retried(servers: LocalServers, loop: LoopThread) -> None:
    backend = S3Backend(retry=FAST_RETRY)
    with pytest.raises(FileNotFoundError):
        loop.run(backend.put("no-such-bucket-retry/x", b"x"))
    assert backend.stats.total_retries() == 0
    loop.run(backend.aclose())


def test_classification() -> None:
    from botocore.exceptions import ClientError
    from gcsfs.retry import HttpError

    throttled = ClientError(
        {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"
    )
    assert http_status_of(throttled) == 503 and is_transient(throttled)
    wrapped = OSError("translated")
    wrapped.__cause__ = throttled
    assert is_transient(wrapped)
    assert is_transient(HttpError({"code": 429, "message": "rate"}))
    assert not is_transient(HttpError({"code": 400, "message": "bad"}))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError()) and not is_transient(ValueError())


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="initial_backoff_s"):
        RetryPolicy(initial_backoff_s=2, max_backoff_s=1)
    assert RetryStats().total_calls() == 0
