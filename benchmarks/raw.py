"""The raw channel: plain concurrent PUT and GET of objects of given sizes.

This is the yardstick for cloudckpt's throughput. Each backend moves the same
number of objects of the same sizes as one cloudckpt checkpoint, through a
plain client to the same server, with the same concurrency cloudckpt gives
tensorstore (64 requests for object stores, 32 file operations):

* ``s3``: aiobotocore (the aiohttp-based client under s3fs), ``put_object``
  and ``get_object``, default botocore settings apart from the pool size;
* ``gs``: gcsfs (aiohttp), ``_pipe_file`` and ``_cat_file``;
* ``file``: a thread pool writing each file and fsyncing it (tensorstore's
  file driver fsyncs too), then reading it back.

Payloads are random bytes built before the clock starts. Timing covers only
the transfers; the objects are deleted afterwards, untimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

OBJECT_STORE_CONCURRENCY = 64
FILE_CONCURRENCY = 32


@dataclass(frozen=True)
class RawResult:
    put_s: float
    get_s: float
    objects: int
    nbytes: int


def payloads(sizes: Sequence[int], seed: int = 0) -> list[bytes]:
    """Random payloads of the given sizes (one random buffer, sliced)."""
    blob = np.random.default_rng(seed).bytes(sum(sizes))
    out, offset = [], 0
    for size in sizes:
        out.append(blob[offset : offset + size])
        offset += size
    return out


def light_payloads(sizes: Sequence[int], seed: int = 0) -> list[bytes]:
    """Random payloads of the given sizes that share memory: one per distinct size.

    Each object of a size carries the same random bytes (a prefix of one random
    buffer of the largest size): the stores copy every object on its own, so
    the channel moves the same bytes as with :func:`payloads`, while the
    client holds a few objects' worth instead of the whole tree twice (the
    buffer and its slices), which a 4 GiB tree cannot spare beside its restores.
    """
    if not sizes:
        return []
    blob = np.random.default_rng(seed).bytes(max(sizes))
    by_size: dict[int, bytes] = {}
    return [by_size.setdefault(size, blob[:size]) for size in sizes]


# ------------------------------------------------------------------------------------ file
def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: str) -> int:
    with open(path, "rb") as f:
        return len(f.read())


def file_put_get(directory: str, data: Sequence[bytes]) -> RawResult:
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"obj{i:05d}") for i in range(len(data))]
    with ThreadPoolExecutor(FILE_CONCURRENCY) as pool:
        start = time.perf_counter()
        list(pool.map(_write_file, paths, data))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        got = sum(pool.map(_read_file, paths))
        get_s = time.perf_counter() - start
    shutil.rmtree(directory, ignore_errors=True)
    _check(got, data)
    return RawResult(put_s, get_s, len(data), got)


# -------------------------------------------------------------------------------------- s3
def _s3_client(endpoint: str) -> Any:
    """An aiobotocore S3 client (``async with``) pooling ``OBJECT_STORE_CONCURRENCY`` connections."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(max_pool_connections=OBJECT_STORE_CONCURRENCY)
    return get_session().create_client("s3", endpoint_url=endpoint, config=config)


async def _s3_put_get(
    endpoint: str, bucket: str, prefix: str, data: Sequence[bytes], keep: bool = False
) -> RawResult:
    async with _s3_client(endpoint) as client:
        gate = asyncio.Semaphore(OBJECT_STORE_CONCURRENCY)
        keys = [f"{prefix}/obj{i:05d}" for i in range(len(data))]

        async def put(key: str, body: bytes) -> None:
            async with gate:
                await client.put_object(Bucket=bucket, Key=key, Body=body)

        kept: list[bytes] = []

        async def get(key: str) -> int:
            async with gate:
                response = await client.get_object(Bucket=bucket, Key=key)
                async with response["Body"] as stream:
                    body = await stream.read()
                if keep:
                    kept.append(body)
                return len(body)

        start = time.perf_counter()
        await asyncio.gather(*(put(k, d) for k, d in zip(keys, data, strict=True)))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        got = sum(await asyncio.gather(*(get(k) for k in keys)))
        get_s = time.perf_counter() - start
        kept.clear()
        for i in range(0, len(keys), 1000):
            await client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
            )
    _check(got, data)
    return RawResult(put_s, get_s, len(data), got)


def s3_put_get(
    endpoint: str, bucket: str, prefix: str, data: Sequence[bytes], keep: bool = False
) -> RawResult:
    """``keep``: every body stays alive until all are read, as a restore keeps its arrays."""
    return asyncio.run(_s3_put_get(endpoint, bucket, prefix, data, keep))


# ------------------------------------------------------------------------------------- gcs
@contextlib.asynccontextmanager
async def _gcs_fs(endpoint: str) -> AsyncIterator[Any]:
    """An asynchronous gcsfs file system on ``endpoint``, its session closed afterwards."""
    from gcsfs.core import GCSFileSystem  # not the experimental class: no 60 s HNS probe

    fs = GCSFileSystem(
        asynchronous=True, endpoint_url=endpoint, token="anon", skip_instance_cache=True
    )
    await fs._set_session()
    try:
        yield fs
    finally:
        if fs.session is not None and not fs.session.closed:
            await fs.session.close()


async def _gcs_put_get(
    endpoint: str, bucket: str, prefix: str, data: Sequence[bytes], keep: bool = False
) -> RawResult:
    async with _gcs_fs(endpoint) as fs:
        gate = asyncio.Semaphore(OBJECT_STORE_CONCURRENCY)
        paths = [f"{bucket}/{prefix}/obj{i:05d}" for i in range(len(data))]

        async def put(path: str, body: bytes) -> None:
            async with gate:
                await fs._pipe_file(path, body)

        kept: list[bytes] = []

        async def get(path: str) -> int:
            async with gate:
                body = await fs._cat_file(path)
            if keep:
                kept.append(body)
            return len(body)

        start = time.perf_counter()
        await asyncio.gather(*(put(p, d) for p, d in zip(paths, data, strict=True)))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        got = sum(await asyncio.gather(*(get(p) for p in paths)))
        get_s = time.perf_counter() - start
        kept.clear()
        await fs._rm(paths)
    _check(got, data)
    return RawResult(put_s, get_s, len(data), got)


def gcs_put_get(
    endpoint: str, bucket: str, prefix: str, data: Sequence[bytes], keep: bool = False
) -> RawResult:
    """``keep``: every body stays alive until all are read, as a restore keeps its arrays."""
    return asyncio.run(_gcs_put_get(endpoint, bucket, prefix, data, keep))


def _check(got: int, data: Sequence[bytes]) -> None:
    expected = sum(len(d) for d in data)
    if got != expected:
        raise RuntimeError(f"raw channel read {got} bytes back, wrote {expected}")


# ------------------------------------------------------------------ existing objects, ranged
def ranges(size: int, span: int | None) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``size`` bytes, each at most ``span`` (None: one)."""
    if span is None or size <= span:
        return [(0, size)]
    return [(start, min(start + span, size)) for start in range(0, size, span)]


async def _get_ranges(
    kind: str, endpoint: str, objects: Sequence[tuple[str, int]], span: int | None
) -> float:
    """Seconds to GET ``objects`` ((bucket/key, size)), each in ranges of at most ``span``.

    All ranges at once, at most ``OBJECT_STORE_CONCURRENCY`` in flight; the
    bodies are kept until all are read, as a restore keeps its arrays.
    """
    gate = asyncio.Semaphore(OBJECT_STORE_CONCURRENCY)
    kept: list[bytes] = []
    jobs = [(path, a, b) for path, size in objects for a, b in ranges(size, span)]
    async with contextlib.AsyncExitStack() as stack:
        if kind == "s3":
            client = await stack.enter_async_context(_s3_client(endpoint))

            async def fetch(path: str, a: int, b: int) -> bytes:
                bucket, key = path.split("/", 1)
                response = await client.get_object(
                    Bucket=bucket, Key=key, Range=f"bytes={a}-{b - 1}"
                )
                async with response["Body"] as stream:
                    return bytes(await stream.read())

        else:
            fs = await stack.enter_async_context(_gcs_fs(endpoint))

            async def fetch(path: str, a: int, b: int) -> bytes:
                return bytes(await fs._cat_file(path, start=a, end=b))

        async def one(path: str, a: int, b: int) -> int:
            async with gate:
                body = await fetch(path, a, b)
            kept.append(body)
            return len(body)

        start = time.perf_counter()
        got = sum(await asyncio.gather(*(one(*job) for job in jobs)))
        seconds = time.perf_counter() - start
    kept.clear()
    expected = sum(size for _, size in objects)
    if got != expected:
        raise RuntimeError(f"ranged GETs read {got} bytes of objects holding {expected}")
    return seconds


def get_ranges(
    kind: str, endpoint: str, objects: Sequence[tuple[str, int]], span: int | None
) -> float:
    """``_get_ranges`` on a loop of its own (``kind``: ``s3`` or ``gcs``)."""
    return asyncio.run(_get_ranges(kind, endpoint, objects, span))
