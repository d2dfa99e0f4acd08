"""The byte-counting proxy behind ``make bench``'s bytes-per-process rows (issue 14).

Each benchmark worker reaches the servers through its own
:class:`~cloudckpt.testing.faultproxy.ByteCountingProxy`, so the S3 direct
writes and the direct chunk reads, which tensorstore's counters never see,
are counted too. These tests pin down what it counts (request and answer
bodies per target, exactly) and which targets the worker counts as data.
"""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.mp_bench_worker import _is_data
from cloudckpt.testing.faultproxy import ByteCountingProxy
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique
from .test_hedged_writes import _backend
from .test_stragglers import _upstream


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_every_body_byte_is_counted_once_per_target(kind: str, servers: LocalServers) -> None:
    from cloudckpt.storage import Deadlines, RetryPolicy

    prefix = f"{BUCKET}/{unique('count')}"
    data = bytes(range(256)) * 4096  # 1 MiB
    with ByteCountingProxy(_upstream(kind, servers), kind) as proxy:
        backend = _backend(kind, proxy.endpoint, Deadlines(hedge=False), RetryPolicy())

        async def run() -> bytes | None:
            try:
                await backend.put(f"{prefix}/arrays/0/c/0", data)
                await backend.put(f"{prefix}/pytree.json", b"{}")
                return await backend.get(f"{prefix}/arrays/0/c/0")
            finally:
                await backend.aclose()

        got = asyncio.run(run())
        sent, received = proxy.totals(_is_data)
        everything = proxy.totals(lambda where: True)
    assert got == data
    if kind == "s3":  # the body is the object (gcsfs wraps small uploads in a multipart body)
        assert sent == len(data)
    else:
        assert len(data) <= everything[0] < len(data) + 4096
    assert received == len(data)  # the GET of the chunk, nothing else that is data
    assert everything[0] >= sent + 2  # pytree.json went through too, not counted as data


@pytest.mark.parametrize(
    ("where", "data"),
    [
        ("/b/run/3/state/@a1/arrays/7/c/0/1", True),
        ("/b/run/3/state/@a1/packs/0-2", True),
        ("/upload/storage/v1/b/b/o?uploadType=media&name=run/3/state/@a1/arrays/7/c/0", True),
        ("/download/storage/v1/b/b/o/run/3/state/@a1/packs/1?alt=media", True),
        ("/b/run/3/state/@a1/arrays/7/zarr.json", False),
        ("/b/run/3/state/pytree.json", False),
        ("/b/run/3/_CHECKPOINT_METADATA", False),
        ("/b?list-type=2&prefix=run/3/state/@a1/arrays/", False),
        ("/storage/v1/b/b/o?prefix=run/3/state/@a1/packs/&delimiter=/", False),
    ],
)
def test_the_worker_counts_chunks_and_packs_only(where: str, data: bool) -> None:
    assert _is_data(where) is data
