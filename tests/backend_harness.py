"""Per-backend test fixtures: the backend under test, a fresh root, and raw access.

The raw hooks (cloudckpt.testing.conformance) read and write around the
backend under test (plain files, a fresh s3fs/gcsfs client, tensorstore's
memory store) so that tests check what really landed in storage rather than
trusting the backend to report on itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from cloudckpt import storage as backends
from cloudckpt.storage.retry import RetryPolicy
from cloudckpt.testing.conformance import StoreUnderTest, raw_file, raw_fsspec, raw_memory

from .helpers import BUCKET, unique

FAST_RETRY = RetryPolicy(max_attempts=8, initial_backoff_s=0.01, max_backoff_s=0.2, max_total_s=30)


def s3fs_client() -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        key=os.environ["AWS_ACCESS_KEY_ID"],
        secret=os.environ["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"region_name": os.environ["AWS_REGION"]},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def gcsfs_client() -> Any:
    # The core class: gcsfs.GCSFileSystem may be the experimental one, whose
    # hierarchical-namespace probe waits out a 60 s gRPC timeout against an emulator.
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(
        endpoint_url=os.environ["STORAGE_EMULATOR_HOST"],
        token="anon",
        skip_instance_cache=True,
    )


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> StoreUnderTest:
    """Builds the store under test; object stores pull in the ``servers`` fixture.

    The backend is the test's own; its clients on the test's ``loop`` are
    closed when the test ends.
    """
    if kind == "memory":
        backend = backends.get_backend("memory")
        get, put = raw_memory(backend)
        return StoreUnderTest(kind, backend, unique("mem"), get, put)
    if kind == "file":
        backend = backends.get_backend("file")
        get, put = raw_file()
        return StoreUnderTest(kind, backend, str(tmp_path / unique("root")), get, put)
    request.getfixturevalue("servers")
    if kind == "s3":
        backend = backends.get_backend("s3", retry=FAST_RETRY)
        get, put = raw_fsspec(s3fs_client())
    elif kind == "gcs":
        backend = backends.get_backend("gs", retry=FAST_RETRY)
        get, put = raw_fsspec(gcsfs_client())
    else:
        raise ValueError(kind)
    loop = request.getfixturevalue("loop")
    request.addfinalizer(lambda: loop.run(backend.aclose()))
    return StoreUnderTest(kind, backend, f"{BUCKET}/{unique('root')}", get, put)


ALL_KINDS = ["memory", "file", "s3", "gcs"]
OBJECT_KINDS = ["s3", "gcs"]


async def check_read_into(backend: Any, path: str) -> None:
    """``read_into``'s contract on a backend that has it; ``path`` must not exist yet."""
    data = np.random.default_rng(0).bytes(300_000)
    await backend.put(path, data)
    a, empty, b = bytearray(10), bytearray(0), bytearray(200_000)
    got = await backend.read_into(path, 1000, [memoryview(a), memoryview(empty), memoryview(b)])
    assert got == 200_010
    assert bytes(a) == data[1000:1010]
    assert bytes(b) == data[1010:201_010]
    # Past the end: fewer bytes, and what there is lands in place.
    tail = bytearray(1000)
    assert await backend.read_into(path, 299_500, [memoryview(tail)]) == 500
    assert bytes(tail[:500]) == data[299_500:]
    assert await backend.read_into(path, 300_000, [memoryview(bytearray(8))]) == 0
    assert await backend.read_into(path, 400_000, [memoryview(bytearray(8))]) == 0
    # Zero length: 0 for an object that exists, None for one that does not.
    assert await backend.read_into(path, 5, [memoryview(bytearray(0))]) == 0
    assert await backend.read_into(path + "-absent", 0, [memoryview(bytearray(0))]) is None
    assert await backend.read_into(path + "-absent", 0, [memoryview(bytearray(8))]) is None
    await _check_large_read_into(backend, path + "-large")


@contextlib.contextmanager
def direct_receives() -> Iterator[list[int]]:
    """The body lengths ``cloudckpt.storage._receive`` takes while inside (the rest: aiohttp's)."""
    from cloudckpt.storage import _receive

    taken: list[int] = []
    real = _receive.receive_into

    async def counting(response: Any, buffers: Any, skip: int) -> int:
        taken.append(response.content_length)
        return await real(response, buffers, skip)

    _receive.receive_into = counting  # type: ignore[assignment]
    try:
        yield taken
    finally:
        _receive.receive_into = real  # type: ignore[assignment]


async def _check_large_read_into(backend: Any, path: str) -> None:
    """Bodies of 1 MiB and more, which the socket receives straight into the buffers."""
    data = np.random.default_rng(1).bytes(3 << 20)
    await backend.put(path, data)
    with direct_receives() as taken:
        # Chunk data and 4-byte crc32c, alternating, as the chunk reader asks for them.
        sizes = [1 << 20, 4, (1 << 20) + 3, 4]
        views = [memoryview(np.full(n, 0xAA, np.uint8)) for n in sizes]
        assert await backend.read_into(path, 4321, views) == sum(sizes)
        assert b"".join(bytes(v) for v in views) == data[4321 : 4321 + sum(sizes)]
        tail = np.full(2 << 20, 0xAA, np.uint8)  # past the end: the bytes there are
        assert await backend.read_into(path, (2 << 20) - 7, [memoryview(tail)]) == (1 << 20) + 7
        assert tail[: (1 << 20) + 7].tobytes() == data[(2 << 20) - 7 :]
        assert set(tail[(1 << 20) + 7 :].tolist()) == {0xAA}
    assert taken == [sum(sizes), (1 << 20) + 7]  # both through the direct receiver
