"""The same S3 objects through each client cloudckpt could use: which channel is fastest?

Issue 14 asks for the S3 save path within 1.1x of the best of tensorstore,
s3fs and aiohttp for the same objects. Each tool here PUTs and then GETs the
given payloads (the sizes of one cloudckpt checkpoint) with 64 requests in
flight, against the same server, and reports the two times:

* ``aiobotocore``: :func:`benchmarks.raw.s3_put_get`, the raw channel
  (botocore defaults: over plain HTTP it signs the SHA-256 of every payload
  and adds a CRC32 checksum, both computed in Python's thread);
* ``s3fs``: ``_pipe_file`` / ``_cat_file`` (aiobotocore underneath);
* ``tensorstore``: the ``s3`` kvstore with cloudckpt's own context, plain
  key/value writes of the payloads (no zarr); tensorstore signs the SHA-256 of
  every payload, computed on its own threads;
* ``aiohttp``: requests signed with botocore's SigV4 signer over
  ``UNSIGNED-PAYLOAD``, each PUT carrying ``x-amz-checksum-crc32c`` (computed
  with google-crc32c) so the bytes are still checked by the server, the
  fastest integrity-preserving channel available from Python.

Timing covers only the transfers; objects are deleted afterwards, untimed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable, Sequence

from benchmarks.raw import OBJECT_STORE_CONCURRENCY, RawResult, _check, s3_put_get

ToolRun = Callable[[str, str, str, Sequence[bytes]], RawResult]


def _keys(prefix: str, count: int) -> list[str]:
    return [f"{prefix}/obj{i:05d}" for i in range(count)]


# ----------------------------------------------------------------------------------- s3fs
async def _s3fs(endpoint: str, bucket: str, prefix: str, data: Sequence[bytes]) -> RawResult:
    import s3fs

    fs = s3fs.S3FileSystem(
        asynchronous=True,
        skip_instance_cache=True,
        use_listings_cache=False,
        endpoint_url=endpoint,
        config_kwargs={"max_pool_connections": OBJECT_STORE_CONCURRENCY},
    )
    await fs.set_session()
    try:
        gate = asyncio.Semaphore(OBJECT_STORE_CONCURRENCY)
        paths = [f"{bucket}/{k}" for k in _keys(prefix, len(data))]

        async def put(path: str, body: bytes) -> None:
            async with gate:
                await fs._pipe_file(path, body)

        async def get(path: str) -> int:
            async with gate:
                return len(await fs._cat_file(path))

        start = time.perf_counter()
        await asyncio.gather(*(put(p, d) for p, d in zip(paths, data, strict=True)))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        got = sum(await asyncio.gather(*(get(p) for p in paths)))
        get_s = time.perf_counter() - start
        for i in range(0, len(paths), 1000):
            await fs._call_s3(
                "delete_objects",
                Bucket=bucket,
                Delete={"Objects": [{"Key": p.split("/", 1)[1]} for p in paths[i : i + 1000]]},
            )
    finally:
        await fs._s3.close()
    _check(got, data)
    return RawResult(put_s, get_s, len(data), got)


def s3fs_put_get(endpoint: str, bucket: str, prefix: str, data: Sequence[bytes]) -> RawResult:
    return asyncio.run(_s3fs(endpoint, bucket, prefix, data))


# ---------------------------------------------------------------------------- tensorstore
def tensorstore_put_get(
    endpoint: str, bucket: str, prefix: str, data: Sequence[bytes]
) -> RawResult:
    import cloudckpt as cc

    backend, path = cc.backends.resolve(f"s3://{bucket}/{prefix}")
    spec = backend.kvstore_spec(path)
    spec["endpoint"] = endpoint
    context = backend.tensorstore_context()

    async def run() -> RawResult:
        import tensorstore as ts

        kv = await ts.KvStore.open(spec, context=context)
        names = [f"obj{i:05d}" for i in range(len(data))]
        start = time.perf_counter()
        await asyncio.gather(*(kv.write(n, d) for n, d in zip(names, data, strict=True)))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        results = await asyncio.gather(*(kv.read(n) for n in names))
        get_s = time.perf_counter() - start
        got = sum(len(r.value) for r in results)
        await backend.delete_prefix(path)
        await backend.aclose()
        _check(got, data)
        return RawResult(put_s, get_s, len(data), got)

    return asyncio.run(run())


# -------------------------------------------------------------------------------- aiohttp
def _crc32c_b64(body: bytes) -> str:
    import google_crc32c

    return base64.b64encode(google_crc32c.value(body).to_bytes(4, "big")).decode()


def _signer() -> tuple[Callable[[str, str, dict[str, str]], dict[str, str]], str]:
    """A SigV4 signer (botocore's) for UNSIGNED-PAYLOAD requests, and the region."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    region = os.environ.get("AWS_REGION", "us-east-1")
    auth = SigV4Auth(
        Credentials(
            os.environ["AWS_ACCESS_KEY_ID"],
            os.environ["AWS_SECRET_ACCESS_KEY"],
            os.environ.get("AWS_SESSION_TOKEN"),
        ),
        "s3",
        region,
    )

    def sign(method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        # With X-Amz-Content-SHA256 already set, the signer takes it as the
        # payload hash instead of hashing the body.
        request = AWSRequest(
            method=method, url=url, headers={**headers, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
        )
        auth.add_auth(request)
        return dict(request.headers.items())

    return sign, region


async def _aiohttp(endpoint: str, bucket: str, prefix: str, data: Sequence[bytes]) -> RawResult:
    import aiohttp

    sign, _ = _signer()
    base = endpoint.rstrip("/")
    keys = _keys(prefix, len(data))
    connector = aiohttp.TCPConnector(limit=OBJECT_STORE_CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def put(key: str, body: bytes) -> None:
            url = f"{base}/{bucket}/{key}"
            crc = await asyncio.to_thread(_crc32c_b64, body)
            headers = sign("PUT", url, {"x-amz-checksum-crc32c": crc})
            async with session.put(url, data=body, headers=headers) as response:
                if response.status != 200:
                    raise OSError(f"PUT {key}: {response.status} {await response.text()}")

        async def get(key: str) -> int:
            url = f"{base}/{bucket}/{key}"
            async with session.get(url, headers=sign("GET", url, {})) as response:
                if response.status != 200:
                    raise OSError(f"GET {key}: {response.status}")
                return len(await response.read())

        async def delete(key: str) -> None:
            url = f"{base}/{bucket}/{key}"
            async with session.delete(url, headers=sign("DELETE", url, {})):
                pass

        start = time.perf_counter()
        await asyncio.gather(*(put(k, d) for k, d in zip(keys, data, strict=True)))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        got = sum(await asyncio.gather(*(get(k) for k in keys)))
        get_s = time.perf_counter() - start
        await asyncio.gather(*(delete(k) for k in keys))
    _check(got, data)
    return RawResult(put_s, get_s, len(data), got)


def aiohttp_put_get(endpoint: str, bucket: str, prefix: str, data: Sequence[bytes]) -> RawResult:
    return asyncio.run(_aiohttp(endpoint, bucket, prefix, data))


#: Every tool, by the name the benchmark rows use.
TOOLS: dict[str, ToolRun] = {
    "aiobotocore": s3_put_get,
    "s3fs": s3fs_put_get,
    "tensorstore": tensorstore_put_get,
    "aiohttp": aiohttp_put_get,
}
