"""S3 restores read chunks directly: ranged GETs streamed into the destination buffers.

``S3Backend.read_into`` (cloudckpt/storage/s3get.py: SigV4 over
UNSIGNED-PAYLOAD on the direct-write channel's sessions) is tested against the
real SeaweedFS of the test session: bytes land where they are asked to, a
short object gives fewer bytes, a missing object None, a missing bucket or a
wrong secret an error with no credential in it. Restores on S3 then go
through the direct chunk reader (cloudckpt/handlers/pytree/chunks.py), seen
at a recording proxy in front of the server, bit-exact, every crc32c checked.
"""

from __future__ import annotations

import asyncio
import logging
import traceback

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.storage.s3 import S3Backend
from cloudckpt.testing.faultproxy import FaultProxy
from cloudckpt.testing.servers import LocalServers

from .backend_harness import FAST_RETRY, check_read_into, s3fs_client
from .helpers import BUCKET, unique
from .test_direct_chunks import SAVED, VALUES, _chunk_objects, _mesh, _restore, _rewrite

INNER = 4 << 10  # 4 KiB inner chunks: each saved shard object holds several


def _s3(endpoint: str) -> S3Backend:
    return S3Backend(endpoint_url=endpoint, retry=FAST_RETRY)


def test_read_into_places_bytes_from_an_offset(servers: LocalServers) -> None:
    backend = _s3(servers.s3.endpoint)
    path = f"{BUCKET}/{unique('readinto')}/odd ?#[key]=@+/x%41"

    async def go() -> None:
        try:
            await check_read_into(backend, path)
        finally:
            await backend.aclose()

    asyncio.run(go())


def test_read_into_errors_name_the_object_and_no_credential(
    servers: LocalServers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = servers.s3.credentials.secret_key
    access = servers.s3.credentials.access_key
    path = f"{BUCKET}/{unique('denied')}/obj"
    s3fs_client().pipe_file(path, b"y" * 1000)
    caplog.set_level(logging.DEBUG)  # from here on: cloudckpt's requests only
    errors: list[BaseException] = []

    async def attempt(backend: S3Backend, path: str) -> None:
        try:
            await backend.read_into(path, 0, [memoryview(bytearray(100))])
        except Exception as exc:
            errors.append(exc)
        finally:
            await backend.aclose()

    # A missing bucket: FileNotFoundError naming it.
    asyncio.run(attempt(_s3(servers.s3.endpoint), "no-such-bucket-here/a/b"))
    # A wrong secret: the store refuses the signature (403), PermissionError naming the object.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-" + secret)
    asyncio.run(attempt(_s3(servers.s3.endpoint), path))
    missing, denied = errors
    assert isinstance(missing, FileNotFoundError) and "no-such-bucket-here" in str(missing)
    assert isinstance(denied, PermissionError), repr(denied)
    assert path in str(denied) and "credentials: env" in str(denied)
    texts = ["".join(traceback.format_exception(exc)) + repr(exc) for exc in errors] + [caplog.text]
    for text in texts:
        assert secret not in text
        assert access not in text
        assert "Signature=" not in text and "Credential=" not in text


# ------------------------------------------------------------------- saves and restores
class GetRecorder(FaultProxy):
    """Passes everything through and records each GET: path, payload hash header, Range."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, fault_rate=0.0)
        self.gets: list[tuple[str, str, str]] = []

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        if request.method == "GET":
            self.gets.append(
                (
                    request.path,
                    request.headers.get("x-amz-content-sha256", ""),
                    request.headers.get("Range", ""),
                )
            )
        return await super()._handle(request)


ROWS = np.random.default_rng(3).standard_normal((4096, 8)).astype(np.float32)


def _values() -> dict[str, np.ndarray]:
    # f32 and bf16 tiles (sharded and, with one inner chunk per object, unsharded), rows.
    return {**VALUES, "rows": ROWS}


@pytest.mark.parametrize("inner_chunk_bytes", [INNER, 1 << 30], ids=["sharded", "whole"])
def test_s3_restores_go_through_direct_gets_bit_exactly(
    inner_chunk_bytes: int, servers: LocalServers
) -> None:
    url = f"s3://{BUCKET}/{unique('s3direct')}"
    values = _values()
    saved = NamedSharding(_mesh(SAVED), P("data", "model"))
    handler = cc.StandardCheckpointHandler(
        inner_chunk_bytes=inner_chunk_bytes, pack_below_bytes=1024
    )
    with cc.Checkpointer(handler) as ckptr:
        tree = {k: jax.device_put(v, saved) for k, v in values.items()}
        ckptr.save(url, args=cc.args.StandardSave(tree))
    chunk_keys = {p.split("/", 1)[1] for p in _chunk_objects(url)}
    assert len(chunk_keys) >= 8
    with GetRecorder(servers.s3.endpoint) as proxy:
        options = {"endpoint_url": proxy.endpoint}
        with cc.Checkpointer(cc.StandardCheckpointHandler(), storage_options=options) as ckptr:
            for mesh in (SAVED, (2, 4)):  # the same mesh, and resharded
                proxy.gets.clear()
                sharding = NamedSharding(_mesh(mesh), P("data", "model"))
                target = {
                    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                    for k, v in values.items()
                }
                out = ckptr.restore(url, args=cc.args.StandardRestore(target))
                for k, v in values.items():
                    got = np.asarray(out[k])
                    assert got.dtype == v.dtype and got.tobytes() == v.tobytes(), (mesh, k)
                chunk_gets = [g for g in proxy.gets if g[0].split("/", 2)[2] in chunk_keys]
                # Every chunk object was read, each only by ranged direct GETs.
                assert {g[0].split("/", 2)[2] for g in chunk_gets} == chunk_keys, mesh
                assert all(sha == "UNSIGNED-PAYLOAD" and rng for _, sha, rng in chunk_gets), (
                    chunk_gets
                )


@pytest.mark.parametrize("where", ["first", "middle", "index"])
def test_a_flipped_byte_is_refused_and_names_the_object(where: str, servers: LocalServers) -> None:
    url = f"s3://{BUCKET}/{unique('s3flip')}"
    saved = NamedSharding(_mesh(SAVED), P("data", "model"))
    handler = cc.StandardCheckpointHandler(inner_chunk_bytes=INNER, pack_below_bytes=1024)
    with cc.Checkpointer(handler) as ckptr:
        tree = {k: jax.device_put(v, saved) for k, v in VALUES.items()}
        ckptr.save(url, args=cc.args.StandardSave(tree))
        victim = _chunk_objects(url)[3]

        def flip(data: bytearray) -> bytes:
            n = len(data)
            data[{"first": 0, "middle": n // 3, "index": n - 9}[where]] ^= 0x40
            return bytes(data)

        _rewrite(url, victim, flip)
        for mesh in (SAVED, (2, 4)):  # whole objects, parts of objects
            with pytest.raises(cc.CorruptCheckpointError, match="checksum mismatch") as info:
                _restore(ckptr, url, NamedSharding(_mesh(mesh), P("data", "model")))
            assert victim.split("/", 1)[1] in str(info.value)


def test_direct_reads_need_a_known_region_as_direct_writes_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With neither an endpoint nor a region (AWS, default region assumed) reads stay on tensorstore.

    The signature names the region; tensorstore finds a bucket's region itself.
    """
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert not S3Backend().supports_read_into
    assert S3Backend(region="eu-west-3").supports_read_into
    assert S3Backend(endpoint_url="http://127.0.0.1:1", read_only=True).supports_read_into
