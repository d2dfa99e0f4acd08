"""Many cut inner chunks scattered at once, by several placing threads, with a bounded backlog.

A restore onto another mesh hands streamed GCS bodies' pieces to a few
placing threads (cloudckpt/handlers/pytree/scatter.py): each scatter's pieces
in order, different scatters in parallel, and a reader waits for room once
``QUEUED_BYTES`` wait to be placed; on hosts of two cores or fewer each piece
is placed at once instead. These tests restore trees of many leaves
(dozens of chunk objects read at once) onto other meshes, on the file system
and on GCS (fake-gcs-server), placed at once, with the default backlog and with a backlog
so small that every reader waits for room: the values must be bit-exact, a
flipped byte in one of the many cut chunks must be refused naming its
object, and a read that fails must leave no other scatter placing bytes
after it has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.handlers.pytree import scatter
from cloudckpt.handlers.pytree.chunks import all_or_cancel
from cloudckpt.handlers.pytree.scatter import Scatter
from cloudckpt.storage.path import StoragePath
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique
from .test_direct_chunks import _chunk_objects, _rewrite, _url

rng = np.random.default_rng(1818)
#: Seven 256 KiB matrices and a cube saved on a 4x2 mesh: 64 chunk objects, cut elsewhere.
LEAVES = {f"w{i}": rng.standard_normal((256, 256)).astype(np.float32) for i in range(7)}
#: Rank 3: its inner chunks are scattered too, a plane (the last two axes) at a time.
LEAVES["cube"] = rng.standard_normal((32, 16, 128)).astype(np.float32)
#: 16 KiB inner chunks (a few per object, several streamed pieces each).
INNER = 16 << 10


def _mesh(shape: tuple[int, int]) -> Mesh:
    return Mesh(np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape), ("data", "model"))


def _save(url: str) -> cc.Checkpointer:
    saved = NamedSharding(_mesh((4, 2)), P("data", "model"))
    ckptr = cc.Checkpointer(
        cc.StandardCheckpointHandler(inner_chunk_bytes=INNER, pack_below_bytes=512)
    )
    ckptr.save(
        url, args=cc.args.StandardSave({k: jax.device_put(v, saved) for k, v in LEAVES.items()})
    )
    return ckptr


def _restore(ckptr: cc.Checkpointer, url: str, mesh: Mesh, specs: tuple[P, P]) -> dict[str, Any]:
    """Restores every leaf onto ``mesh``: matrices as ``specs[0]``, the cube as ``specs[1]``."""
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[v.ndim == 3]))
        for k, v in LEAVES.items()
    }
    return ckptr.restore(url, args=cc.args.StandardRestore(target))


#: Target meshes and specs (matrices, cube): each cuts the saved inner chunks.
TARGETS = {
    "2x4": ((2, 4), (P("data", "model"), P("data", "model"))),
    "transposed": ((4, 2), (P("model", "data"), P("model", "data"))),
    "columns": ((8, 1), (P("model", "data"), P("model", "data"))),
    "last-axis": ((4, 2), (P("model", "data"), P(None, "model", "data"))),
}


@pytest.fixture(
    params=["inline", "default", "tiny"], ids=["placed-inline", "backlog-default", "backlog-tiny"]
)
def backlog(request: Any, monkeypatch: pytest.MonkeyPatch) -> int:
    """Placed at once (no threads, no backlog), or by two placing threads with the default
    backlog or one of 8 KiB (every hand-over waits for room)."""
    monkeypatch.setattr(scatter, "THREADS", 0 if request.param == "inline" else 2)
    if request.param == "tiny":
        monkeypatch.setattr(scatter, "QUEUED_BYTES", 8 << 10)
    return scatter.QUEUED_BYTES


@pytest.mark.parametrize("backend", ["file", "gs"])
def test_many_objects_scattered_at_once_restore_bit_exactly(
    backend: str, backlog: int, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url(backend, tmp_path)
    with _save(url) as ckptr:
        assert len(_chunk_objects(url)) == len(LEAVES) * 8
        for name, (shape, spec) in TARGETS.items():
            out = _restore(ckptr, url, _mesh(shape), spec)
            for k, v in LEAVES.items():
                assert np.asarray(out[k]).tobytes() == v.tobytes(), (name, k)
                for shard in out[k].addressable_shards:
                    assert np.asarray(shard.data).tobytes() == v[shard.index].tobytes(), (name, k)


@pytest.mark.parametrize("backend", ["file", "gs"])
def test_a_flipped_byte_in_one_of_many_scattered_chunks_is_refused(
    backend: str, backlog: int, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url(backend, tmp_path)
    with _save(url) as ckptr:
        objects = _chunk_objects(url)
        victim = objects[len(objects) * 2 // 3]

        def flip(data: bytearray) -> bytes:
            data[INNER + 4 + 777] ^= 0x01  # inside the second inner chunk's data
            return bytes(data)

        _rewrite(url, victim, flip)
        for shape, spec in TARGETS.values():
            with pytest.raises(cc.CorruptCheckpointError, match="checksum mismatch") as info:
                _restore(ckptr, url, _mesh(shape), spec)
            assert victim.split("/arrays/")[-1] in str(info.value)


def test_a_failed_scatter_leaves_no_other_scatter_placing_bytes(
    servers: LocalServers, monkeypatch: pytest.MonkeyPatch, placement: str
) -> None:
    """One object's scatter fails (a read-only destination) while 15 others stream in.

    The reads run as a restore runs them (``all_or_cancel``: the first failure
    cancels the rest); after the failure is raised and each scatter has
    settled, no destination changes any more and nothing waits to be placed.
    A tiny backlog keeps readers waiting for room when they are cancelled.
    """
    monkeypatch.setattr(scatter, "QUEUED_BYTES", 64 << 10)
    rows, cols = 512, 1024  # 2 MiB per object, each scattered into two column halves
    prefix = f"gs://{BUCKET}/{unique('scatter-fail')}"
    root = StoragePath.from_url(prefix)
    backend = root.backend
    chunks = [rng.standard_normal((rows, cols)).astype(np.float32) for _ in range(16)]
    halves = [
        (np.zeros((rows, cols // 2), np.float32), np.zeros((rows, cols // 2), np.float32))
        for _ in chunks
    ]
    halves[5][1].flags.writeable = False  # placing into it fails on a placing thread
    sinks = [
        Scatter(
            (rows, cols),
            np.dtype(np.float32),
            [(left, ((0, rows), (0, cols // 2))), (right, ((0, rows), (cols // 2, cols)))],
        )
        for left, right in halves
    ]

    async def one(i: int) -> None:
        got = await backend.read_into(f"{root.path}/{i}", 0, [sinks[i]])
        assert got == chunks[i].nbytes
        await sinks[i].settled()  # raises what went wrong placing

    async def go() -> list[bytes]:
        for i, chunk in enumerate(chunks):
            await backend.put(f"{root.path}/{i}", chunk.tobytes())
        with pytest.raises(ValueError, match="read-only"):
            await all_or_cancel([one(i) for i in range(len(chunks))])
        for sink in sinks:
            with contextlib.suppress(Exception):
                await sink.settled()
            assert sink.pending is None  # nothing handed over waits to be placed
        before = [left.tobytes() + right.tobytes() for left, right in halves]
        await asyncio.sleep(0.3)  # any stray read or placing thread would land bytes now
        return before

    before = asyncio.run(go())
    assert [left.tobytes() + right.tobytes() for left, right in halves] == before
    assert isinstance(sinks[5].failed, ValueError)
    # The scatters that were not cut short hold their chunks exactly.
    for sink, chunk, (left, right) in zip(sinks, chunks, halves, strict=True):
        if sink.written == sink.nbytes and sink.failed is None:
            assert left.tobytes() == np.ascontiguousarray(chunk[:, : cols // 2]).tobytes()
            assert right.tobytes() == np.ascontiguousarray(chunk[:, cols // 2 :]).tobytes()


@pytest.mark.parametrize("shape", [(6, 5, 8), (3, 4, 5, 6)], ids=["rank3", "rank4"])
def test_a_scatter_of_any_rank_places_pieces_into_strided_boxes(shape: tuple[int, ...]) -> None:
    """An inner chunk of rank 3 or 4, cut along every axis into destinations inside bigger
    arrays (strided views), fed in pieces that cut rows and elements anywhere."""
    import crc32c

    chunk = rng.standard_normal(shape).astype(np.float32)
    data = memoryview(chunk.tobytes())
    # Every axis cut in two at a point of its own: 2**rank boxes.
    cuts = [[(0, n // 2 + 1), (n // 2 + 1, n)] for n in shape]
    boxes = list(itertools.product(*cuts))
    homes = [np.zeros(tuple(b - a + 2 for a, b in box), np.float32) for box in boxes]
    inside = [tuple(slice(1, 1 + b - a) for a, b in box) for box in boxes]
    views = [home[at] for home, at in zip(homes, inside, strict=True)]
    for pieces in ([len(data)], [1, 3, 37, 500], list(range(7, len(data), 61))):
        for home in homes:
            home[...] = 0
        sink = Scatter(shape, np.dtype(np.float32), list(zip(views, boxes, strict=True)))
        sink.write(0, data[:100])  # a first attempt, cut short: starts over below
        bounds = sorted({0, *(p for p in pieces if p < len(data)), len(data)})
        for a, b in itertools.pairwise(bounds):
            sink.write(a, data[a:b])
        assert sink.written == len(data) and sink.crc == crc32c.crc32c(data)
        for home, view, box in zip(homes, views, boxes, strict=True):
            assert view.tobytes() == chunk[tuple(slice(a, b) for a, b in box)].tobytes(), box
            outside = np.ones(home.shape, bool)
            outside[tuple(slice(1, 1 + b - a) for a, b in box)] = False
            assert not home[outside].any(), box  # nothing lands outside its box
