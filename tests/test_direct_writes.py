"""Saves on S3 write chunk objects and packs straight from host memory (handlers/pytree/encode.py).

Each chunk object is encoded by cloudckpt (the bytes tensorstore's zarr3
driver writes, proved byte for byte below) and sent by the S3 backend's
``put_buffers``: SigV4 over UNSIGNED-PAYLOAD with an ``x-amz-checksum-crc32c``
that SeaweedFS, like S3, verifies. Saves go to the real SeaweedFS of the test
session, through a recording or faulty proxy where the test needs to see or
break requests; restores go through both readers (cloudckpt's direct chunk
reader, on a file copy of the bucket's objects, and tensorstore's zarr3
driver on the bucket).
"""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.format import layout
from cloudckpt.format.pytree import ZarrStorage, read_pytree
from cloudckpt.handlers.pytree import encode
from cloudckpt.storage import s3put
from cloudckpt.storage.path import StoragePath
from cloudckpt.storage.retry import RetryPolicy
from cloudckpt.storage.s3 import S3Backend
from cloudckpt.testing.faultproxy import FaultProxy
from cloudckpt.testing.servers import LocalServers

from .backend_harness import FAST_RETRY, s3fs_client
from .helpers import BUCKET, unique

RNG = np.random.default_rng(14)


def _values(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return RNG.random(shape) > 0.5
    if dtype in ("int8", "uint16", "int32"):
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    if dtype == "bfloat16":
        return RNG.standard_normal(shape).astype(ml_dtypes.bfloat16)
    if dtype == "complex64":
        return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ the encoding itself
LAYOUTS = {
    # (array shape, chunk, inner chunk, the region written)
    "unsharded": ((16, 12), [8, 12], [8, 12], ((0, 16), (0, 12))),
    "sharded-rows": ((16, 12), [8, 12], [2, 12], ((8, 16), (0, 12))),
    "sharded-tiles": ((16, 12), [8, 6], [4, 3], ((0, 16), (0, 12))),
    "3d-region-of-many": ((8, 6, 4), [4, 3, 4], [2, 3, 2], ((4, 8), (0, 6), (0, 4))),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bool", "int8", "uint16", "complex64"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_chunk_objects_are_the_bytes_tensorstore_writes(
    dtype: str, name: str, tmp_path: Path
) -> None:
    shape, chunk, inner, region = LAYOUTS[name]
    values = _values(dtype, shape)
    stored = layout.storage_dtype(values.dtype)
    meta = layout.zarr_metadata(shape, stored, chunk, inner)
    assert encode.covers_whole_chunks(region, meta)
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(tmp_path) + "/"},
        "metadata": meta,
        "create": True,
        "store_data_equal_to_fill_value": True,
    }
    array = ts.open(spec).result()
    data = values[layout.index_slices(region)]
    array[layout.index_slices(region)].write(data.view(stored)).result()
    storage = ZarrStorage(
        "",
        meta,
        stored,
        tuple(chunk),
        tuple(inner),
        tuple(n // c for n, c in zip(shape, chunk, strict=True)),
    )
    positions = list(encode.chunk_positions(region, tuple(chunk)))
    assert len(positions) >= 1
    for position in positions:
        ours = encode.encode_chunk(data.view(stored), region, position, tuple(chunk), tuple(inner))
        theirs = (tmp_path / storage.chunk_key(position).lstrip("/")).read_bytes()
        assert b"".join(bytes(b) for b in ours.buffers) == theirs, position
        assert ours.nbytes == storage.object_bytes
        assert ours.crc32c == s3put.crc32c_of([memoryview(theirs)])
    # Pieces lying contiguously in the host copy are referenced, the others copied once.
    first = encode.encode_chunk(data.view(stored), region, positions[0], tuple(chunk), tuple(inner))
    contiguous = name in ("unsharded", "sharded-rows")
    assert first.staged == (0 if contiguous else np.prod(chunk) * stored.itemsize)


def test_an_all_zero_chunk_is_written_as_tensorstore_writes_it(tmp_path: Path) -> None:
    """Chunks equal to the fill value are stored too (``store_data_equal_to_fill_value``)."""
    meta = layout.zarr_metadata((8, 4), np.dtype("float32"), [8, 4], [2, 4])
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(tmp_path) + "/"},
        "metadata": meta,
        "create": True,
        "store_data_equal_to_fill_value": True,
    }
    zeros = np.zeros((8, 4), np.float32)
    ts.open(spec).result()[...].write(zeros).result()
    ours = encode.encode_chunk(zeros, ((0, 8), (0, 4)), (0, 0), (8, 4), (2, 4))
    assert b"".join(bytes(b) for b in ours.buffers) == (tmp_path / "c" / "0" / "0").read_bytes()


def test_regions_not_of_whole_chunks_stay_on_tensorstore() -> None:
    meta = layout.zarr_metadata((16, 12), np.dtype("float32"), [8, 12], [4, 12])
    assert encode.covers_whole_chunks(((8, 16), (0, 12)), meta)
    assert not encode.covers_whole_chunks(((4, 16), (0, 12)), meta)  # starts mid-chunk
    assert not encode.covers_whole_chunks(((8, 12), (0, 12)), meta)  # ends mid-chunk
    other = {**meta, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}
    assert not encode.covers_whole_chunks(((0, 16), (0, 12)), other)  # not our codecs
    scalar = layout.zarr_metadata((), np.dtype("float32"), [], [])
    assert not encode.covers_whole_chunks((), scalar)


# --------------------------------------------------------------------- the S3 channel
def _s3(endpoint: str, retry: RetryPolicy = FAST_RETRY) -> S3Backend:
    return S3Backend(endpoint_url=endpoint, retry=retry)


def test_put_buffers_writes_exactly_the_joined_buffers_to_an_exact_key(
    servers: LocalServers,
) -> None:
    backend = _s3(servers.s3.endpoint)
    key = f"{BUCKET}/{unique('put')}/odd ?#[key]=@+/x%41"
    first = np.arange(300_000, dtype=np.float32).view(np.uint8)
    parts = [memoryview(first), memoryview(b""), memoryview(b"tail")]

    async def go() -> None:
        try:
            await backend.put_buffers(key, parts)
        finally:
            await backend.aclose()

    asyncio.run(go())
    assert s3fs_client().cat_file(key) == first.tobytes() + b"tail"


def test_the_store_refuses_a_body_that_does_not_match_its_crc32c(servers: LocalServers) -> None:
    """SeaweedFS verifies ``x-amz-checksum-crc32c`` (as S3 does): 400 BadDigest, nothing stored.

    ``s3put.put`` reports it as a ``ConnectionError``: the buffers cannot change
    while they are sent, so the bytes were damaged on the way and another
    attempt may succeed.
    """
    key = f"{unique('digest')}/obj"
    body = memoryview(os.urandom(100_000))
    crc = s3put.crc32c_of([body])
    good, wrong = s3put.checksum_header(crc), s3put.checksum_header(crc ^ 1)
    creds = servers.s3.credentials
    from botocore.credentials import Credentials

    signer = Credentials(creds.access_key, creds.secret_key)
    url = s3put.object_url(servers.s3.endpoint, BUCKET, key, virtual_host=False)

    async def go() -> None:
        async with s3put.new_session() as session:
            headers = s3put.sign(url, {"x-amz-checksum-crc32c": wrong}, signer, "us-east-1")
            with pytest.raises(ConnectionError, match="BadDigest"):
                await s3put.put(session, url, [body], headers, f"s3://{BUCKET}/{key}")
            headers = s3put.sign(url, {"x-amz-checksum-crc32c": good}, signer, "us-east-1")
            await s3put.put(session, url, [body], headers, f"s3://{BUCKET}/{key}")

    client = s3fs_client()
    asyncio.run(go())
    assert client.cat_file(f"{BUCKET}/{key}") == bytes(body)


def test_put_buffers_errors_name_the_object_and_no_credential(
    servers: LocalServers, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = servers.s3.credentials.secret_key
    access = servers.s3.credentials.access_key
    caplog.set_level(logging.DEBUG)
    errors: list[BaseException] = []

    async def attempt(backend: S3Backend, path: str) -> None:
        try:
            await backend.put_buffers(path, [memoryview(b"x" * 1000)])
        except Exception as exc:
            errors.append(exc)
        finally:
            await backend.aclose()

    # A missing bucket: FileNotFoundError naming it.
    asyncio.run(attempt(_s3(servers.s3.endpoint), "no-such-bucket-here/a/b"))
    # A wrong secret: the store refuses the signature (403), PermissionError naming the object.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-" + secret)
    asyncio.run(attempt(_s3(servers.s3.endpoint), f"{BUCKET}/{unique('denied')}/obj"))
    missing, denied = errors
    assert isinstance(missing, FileNotFoundError) and "no-such-bucket-here" in str(missing)
    assert isinstance(denied, PermissionError), repr(denied)
    assert f"s3://{BUCKET}/" in str(denied) and "/obj" in str(denied)
    texts = ["".join(traceback.format_exception(exc)) + repr(exc) for exc in errors] + [caplog.text]
    for text in texts:
        assert secret not in text
        assert access not in text
        assert "Signature=" not in text and "Credential=" not in text


# ------------------------------------------------------------------- saves and restores
class RecordingProxy(FaultProxy):
    """Passes everything through and records each PUT: path and the headers that matter here.

    ``failing`` (a substring of paths): while set, such PUTs are dropped
    (connection closed, nothing forwarded), as a dead storage node would.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, fault_rate=0.0)
        self.puts: list[tuple[str, str, bool]] = []
        self.failing: str | None = None

    def _choose_fault(self, method: str, path: str) -> str | None:
        super()._choose_fault(method, path)
        if method == "PUT" and self.failing is not None and self.failing in path:
            return "drop"
        return None

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        if request.method == "PUT":
            self.puts.append(
                (
                    request.path,
                    request.headers.get("x-amz-content-sha256", ""),
                    "x-amz-checksum-crc32c" in request.headers,
                )
            )
        return await super()._handle(request)


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def _tree() -> dict[str, Any]:
    m = _mesh()

    def put(x: np.ndarray, *spec: str | None) -> jax.Array:
        return jax.device_put(x, NamedSharding(m, P(*spec)))

    return {
        "f32": put(_values("float32", (256, 128)), "data", "model"),
        "bf16": put(_values("bfloat16", (128, 256)), None, "model"),
        "mask": put(_values("bool", (256, 64)), "data"),
        "i8": put(_values("int8", (64, 512)), "data", "model"),
        "u16": _values("uint16", (96, 80)),  # a host array: one region, the primary's
        "small": np.arange(7, dtype=np.float32),  # packed
        "scale": 0.5,  # packed
    }


def _handler() -> cc.StandardCheckpointHandler:
    # Arrays of several chunk objects, each split into inner chunks (sharded zarr).
    return cc.StandardCheckpointHandler(
        pack_below_bytes=1024, inner_chunk_bytes=2048, max_object_bytes=16 << 10
    )


def _target(tree: dict[str, Any]) -> dict[str, Any]:
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
        if isinstance(v, jax.Array)
        else v
        for k, v in tree.items()
    }


def _same(tree: dict[str, Any], restored: dict[str, Any]) -> None:
    assert set(restored) == set(tree)
    for k, v in tree.items():
        got = np.asarray(restored[k])
        want = np.asarray(v)
        assert got.dtype == want.dtype, k
        assert got.tobytes() == want.tobytes(), k  # bit-exact, NaNs and signs included


def _download(prefix: str, into: Path) -> None:
    """Every object under ``prefix`` (bucket/key) as a file under ``into``, by its key."""
    client = s3fs_client()
    for path in client.find(prefix):
        target = into / path[len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.cat_file(path))


def test_a_direct_save_restores_bit_exactly_through_both_readers(
    servers: LocalServers, tmp_path: Path
) -> None:
    tree = _tree()
    prefix = f"{BUCKET}/{unique('direct')}"
    with RecordingProxy(servers.s3.endpoint) as proxy:
        options = {"endpoint_url": proxy.endpoint}
        with cc.Checkpointer(_handler(), storage_options=options) as ckptr:
            ckptr.save(f"s3://{prefix}", args=cc.args.StandardSave(tree))
            restored = ckptr.restore(f"s3://{prefix}", args=cc.args.StandardRestore(_target(tree)))
    _same(tree, restored)

    # Chunk objects and packs went out as direct PUTs (UNSIGNED-PAYLOAD, crc32c);
    # zarr.json, documents and markers kept their clients.
    data_puts = [
        p for p in proxy.puts if ("/arrays/" in p[0] and "/c/" in p[0]) or "/packs/" in p[0]
    ]
    assert len([p for p in data_puts if "/c/" in p[0]]) > 8
    assert any("/packs/" in p[0] for p in data_puts)
    assert all(sha == "UNSIGNED-PAYLOAD" and crc for _, sha, crc in data_puts), data_puts
    others = [p for p in proxy.puts if p not in data_puts]
    assert any(p[0].endswith("/zarr.json") for p in others)
    assert all(sha != "UNSIGNED-PAYLOAD" for _, sha, _ in others)

    # tensorstore's zarr3 driver reads every array from the bucket.
    async def documents() -> tuple[Any, StoragePath]:
        root = StoragePath.from_url(f"s3://{prefix}")
        names = [i.path async for i in root.backend.list_prefix(root.path)]
        (doc,) = [n for n in names if n.endswith("/pytree.json")]
        item = StoragePath(root.backend, doc.rsplit("/", 1)[0])
        try:
            return await read_pytree(item), item
        finally:
            await root.backend.aclose()

    document, item = asyncio.run(documents())
    checked = 0
    for leaf in document.leaves:
        if not isinstance(leaf.storage, ZarrStorage):
            continue
        spec = {"driver": "zarr3", "kvstore": (item / leaf.storage.key).kvstore_spec()}
        stored = ts.open(spec, context=item.backend.tensorstore_context()).result().read().result()
        name = leaf.path.strip("[]'\"")
        want = np.asarray(tree[name])
        assert stored.tobytes() == want.tobytes() and stored.shape == want.shape, name
        checked += 1
    assert checked == 5

    # cloudckpt's direct chunk reader reads the same objects (a file copy of them).
    copy = tmp_path / "copy"
    _download(prefix, copy)
    with cc.Checkpointer(_handler()) as ckptr:
        again = ckptr.restore(str(copy), args=cc.args.StandardRestore(_target(tree)))
    _same(tree, again)


def test_a_failed_direct_write_leaves_no_step_and_the_last_good_one_intact(
    servers: LocalServers,
) -> None:
    tree = _tree()
    root = f"s3://{BUCKET}/{unique('failing')}"
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05, max_total_s=20)
    with RecordingProxy(servers.s3.endpoint) as proxy:
        options = {"endpoint_url": proxy.endpoint, "retry": retry}
        with cc.CheckpointManager(root, _handler(), storage_options=options) as manager:
            manager.save(1, args=cc.args.StandardSave(tree))
            manager.wait_until_finished()
            proxy.failing = "/arrays/0/c/"  # every chunk PUT of the first array is dropped
            changed = {**tree, "u16": np.zeros((96, 80), np.uint16)}
            with pytest.raises(ConnectionError) as info:
                manager.save(2, args=cc.args.StandardSave(changed))
                manager.wait_until_finished()
            proxy.failing = None
            assert manager.all_steps() == [1]
            assert manager.latest_step() == 1
            restored = manager.restore(1, args=cc.args.StandardRestore(_target(tree)))
    # The error names the object whose writes failed.
    assert "/arrays/0/c/" in "".join(traceback.format_exception(info.value))
    dropped = [p for p, _, _ in proxy.puts if "/arrays/0/c/" in p]
    assert len(dropped) >= 2  # the write was retried before the save gave up
    _same(tree, restored)
    client = s3fs_client()
    listed = client.find(root.removeprefix("s3://"))
    assert any(p.endswith("/1/_COMMITTED") for p in listed)
    assert not any(p.endswith("/2/_COMMITTED") for p in listed), listed
