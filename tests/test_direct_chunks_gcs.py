"""GCS restores read chunks directly too: streamed ranged GETs into the destination buffers.

``GCSBackend.read_into`` is tested against a real fake-gcs-server: bytes land
where they are asked to, a short object gives fewer bytes, a missing object
None, a missing bucket an error. Restores on GCS then go through the direct
chunk reader (cloudckpt/handlers/pytree/chunks.py): every crc32c checked, a
whole chunk object of up to ``RUN_BYTES`` read with one GET (counted at a
proxy in front of the server; tests/test_spans.py has larger ones), and an object whose inner chunks are not in the order cloudckpt
writes them (another writer's, valid) read correctly by its index.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

import crc32c
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.handlers.pytree import chunks
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.storage.gcs import GCSBackend
from cloudckpt.testing.faultproxy import FaultProxy
from cloudckpt.testing.servers import LocalServers

from .backend_harness import check_read_into
from .helpers import BUCKET, unique
from .test_direct_chunks import (
    SAVED,
    VALUES,
    _chunk_objects,
    _mesh,
    _restore,
    _rewrite,
    _save,
    _url,
)

INNER = 4 << 10  # 4 KiB inner chunks: each saved shard object holds several
#: Besides VALUES (whose inner chunks are tiles, copied into place from a temporary),
#: an array whose inner chunks are row bands: read straight into the destination.
ROWS = np.random.default_rng(3).standard_normal((4096, 8)).astype(np.float32)


def _save_all(url: str) -> cc.Checkpointer:
    sharding = NamedSharding(_mesh(SAVED), P("data", "model"))
    handler = cc.StandardCheckpointHandler(inner_chunk_bytes=INNER, pack_below_bytes=1024)
    ckptr = cc.Checkpointer(handler)
    tree = {k: jax.device_put(v, sharding) for k, v in {**VALUES, "rows": ROWS}.items()}
    ckptr.save(url, args=cc.args.StandardSave(tree))
    return ckptr


def _restore_all(ckptr: cc.Checkpointer, url: str, sharding: Any) -> None:
    """Restores everything onto ``sharding`` and checks every value."""
    values = {**VALUES, "rows": ROWS}
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in values.items()
    }
    out = ckptr.restore(url, args=cc.args.StandardRestore(target))
    for k, v in values.items():
        np.testing.assert_array_equal(np.asarray(out[k]), v, err_msg=k)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_read_into_places_bytes_from_an_offset(servers: LocalServers) -> None:
    backend = GCSBackend()
    path = f"{BUCKET}/{unique('readinto')}/obj"

    async def go() -> None:
        try:
            await check_read_into(backend, path)
        finally:
            await backend.aclose()

    _run(go())


def test_read_into_a_missing_bucket_is_an_error(servers: LocalServers) -> None:
    backend = GCSBackend()

    async def go() -> None:
        try:
            with pytest.raises(FileNotFoundError, match="bucket"):
                await backend.read_into(
                    f"no-such-bucket-{unique('b')}/obj", 0, [memoryview(bytearray(8))]
                )
        finally:
            await backend.aclose()

    _run(go())


def test_a_whole_chunk_object_is_one_get(servers: LocalServers, tmp_path: Any) -> None:
    url = _url("gs", tmp_path)
    with _save_all(url):
        chunk_objects = _chunk_objects(url)
    # The same checkpoint read through a proxy that logs every request.
    with FaultProxy(servers.gcs.endpoint, fault_rate=0.0, flavor="gcs") as proxy:
        # Counts of requests: none hedged or cut and resent, however loaded the machine.
        options = {
            "endpoint_url": proxy.endpoint,
            "deadlines": Deadlines(hedge=False, cut_min_s=60),
        }
        with cc.Checkpointer(cc.StandardCheckpointHandler(), storage_options=options) as ckptr:
            proxy.stats.log.clear()
            _restore_all(ckptr, url, NamedSharding(_mesh(SAVED), P("data", "model")))
    media = [
        unquote(path.split("?")[0])
        for method, path in proxy.stats.log
        if method == "GET" and "alt=media" in path
    ]
    per_object = {
        obj: sum(1 for p in media if p.endswith("/o/" + obj.split("/", 1)[1]))
        for obj in chunk_objects
    }
    assert per_object == dict.fromkeys(chunk_objects, 1)


@pytest.mark.parametrize("where", ["first", "middle", "crc", "index"])
def test_a_flipped_byte_is_refused_and_names_the_object(
    where: str, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url("gs", tmp_path)
    with _save(url, INNER) as ckptr:
        victim = _chunk_objects(url)[3]

        def flip(data: bytearray) -> bytes:
            n = len(data)
            at = {"first": 0, "middle": n // 3, "crc": INNER + 2, "index": n - 9}[where]
            data[at] ^= 0x40
            return bytes(data)

        _rewrite(url, victim, flip)
        for sharding in (
            NamedSharding(_mesh(SAVED), P("data", "model")),  # whole objects
            NamedSharding(_mesh((2, 4)), P("data", "model")),  # parts of objects
        ):
            with pytest.raises(cc.CorruptCheckpointError, match="checksum mismatch") as info:
                _restore(ckptr, url, sharding)
            assert victim.split("/", 1)[1] in str(info.value)


def test_a_cut_chunk_object_is_refused(servers: LocalServers, tmp_path: Any) -> None:
    url = _url("gs", tmp_path)
    with _save(url, INNER) as ckptr:
        victim = _chunk_objects(url)[1]
        _rewrite(url, victim, lambda data: bytes(data[:-100]))
        with pytest.raises(cc.CorruptCheckpointError, match="truncated") as info:
            _restore(ckptr, url, NamedSharding(_mesh(SAVED), P("data", "model")))
        assert victim.split("/", 1)[1] in str(info.value)


def _reverse_inner_chunks(data: bytearray) -> bytes:
    """The same object with its inner chunks stored in reverse order, index to match."""
    piece = INNER + 4
    n = (len(data) - 4) // (piece + 16)
    chunks = [bytes(data[i * piece : (i + 1) * piece]) for i in range(n)]
    body = b"".join(reversed(chunks))
    table = b"".join(
        ((n - 1 - i) * piece).to_bytes(8, "little") + piece.to_bytes(8, "little") for i in range(n)
    )
    return body + table + crc32c.crc32c(table).to_bytes(4, "little")


@pytest.mark.parametrize("spans", [False, True], ids=["one_read", "spans"])
@pytest.mark.parametrize("backend", ["file", "gs"])
def test_inner_chunks_in_another_order_are_read_by_the_index(
    backend: str, spans: bool, servers: LocalServers, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid object not laid out as cloudckpt writes it (another zarr writer's) restores.

    Also when a whole object is read in spans of five inner chunks (tests/test_spans.py):
    the index, in the last span, is checked once all have landed.
    """
    if spans:
        monkeypatch.setattr(chunks, "RUN_BYTES", 5 * (INNER + 4))
    url = _url(backend, tmp_path)
    with _save_all(url) as ckptr:
        for victim in _chunk_objects(url):
            if backend == "file":
                with open(victim, "rb") as f:
                    data = bytearray(f.read())
                with open(victim, "wb") as f:
                    f.write(_reverse_inner_chunks(data))
            else:
                _rewrite(url, victim, _reverse_inner_chunks)
        for sharding in (
            NamedSharding(_mesh(SAVED), P("data", "model")),
            NamedSharding(_mesh((2, 4)), P("data", "model")),
        ):
            _restore_all(ckptr, url, sharding)


def test_failed_ranged_reads_are_retried(servers: LocalServers, tmp_path: Any) -> None:
    """503s, dropped connections and lost answers on the direct reads: retried, values right."""
    url = _url("gs", tmp_path)
    with _save_all(url):
        pass
    with FaultProxy(
        servers.gcs.endpoint, fault_rate=0.2, modes=("503", "drop", "lost_response"), flavor="gcs"
    ) as proxy:
        options = {"endpoint_url": proxy.endpoint}
        with cc.Checkpointer(cc.StandardCheckpointHandler(), storage_options=options) as ckptr:
            for sharding in (
                NamedSharding(_mesh(SAVED), P("data", "model")),
                NamedSharding(_mesh((2, 4)), P("data", "model")),
            ):
                _restore_all(ckptr, url, sharding)
        assert proxy.stats.total_faults > 0
