"""Restores onto another mesh read cut inner chunks straight into their destinations.

When a restore's regions cut a saved inner chunk (or a whole unsharded chunk
object) between several destination arrays, or into a strided stretch of
one, the direct chunk reader hands the backend a scatter
(cloudckpt/handlers/pytree/scatter.py) instead of reading the chunk into a
temporary: the bytes are placed as they arrive, and their crc32c is
computed on the way (arrays of any rank but 0). Each geometry below is chosen so that one of those paths
carries the data, on the file system (preadv, a bounce buffer for sinks)
and on GCS (streamed ranged GETs, fake-gcs-server): values must be
bit-exact, and a flipped byte in a cut inner chunk must still be refused.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.handlers.pytree.scatter import Scatter
from cloudckpt.storage.file import FileBackend
from cloudckpt.testing.servers import LocalServers

from .test_direct_chunks import _chunk_objects, _rewrite, _url

rng = np.random.default_rng(18)
#: Saved on a 4x2 mesh; restored onto 2x4 their inner chunks are cut by columns.
MATRICES = {
    "f32": rng.standard_normal((512, 256)).astype(np.float32),
    "bf16": rng.standard_normal((256, 512)).astype(ml_dtypes.bfloat16),
}
#: Rank 3: inner chunks cut between destinations are scattered a plane at a time.
CUBE = rng.standard_normal((16, 32, 64)).astype(np.float32)
#: Rank 1 on 4 shards, restored onto 6 regions of 1,024: chunks cut mid-way.
VECTOR = rng.standard_normal(6144).astype(np.float32)
#: Inner chunk sizes: 4 KiB (several per object), or one per object (unsharded chunks).
SHARDED, WHOLE = 4 << 10, 1 << 30


def _mesh(shape: tuple[int, ...], names: tuple[str, ...] = ("data", "model")) -> Mesh:
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _save(url: str, inner: int, vector_inner: int = 768) -> cc.Checkpointer:
    saved = _mesh((4, 2))
    handler = cc.StandardCheckpointHandler(inner_chunk_bytes=inner, pack_below_bytes=512)
    ckptr = cc.Checkpointer(handler)
    tree = {
        k: jax.device_put(v, NamedSharding(saved, P("data", "model"))) for k, v in MATRICES.items()
    }
    tree["cube"] = jax.device_put(CUBE, NamedSharding(saved, P("data", "model")))
    ckptr.save(url, args=cc.args.StandardSave(tree))
    # The vector in a step of its own, with 768-byte inner chunks (192 elements: regions
    # of 1,024 elements cut every fifth or sixth of them).
    vec_handler = cc.StandardCheckpointHandler(
        inner_chunk_bytes=inner if inner == WHOLE else vector_inner, pack_below_bytes=512
    )
    with cc.Checkpointer(vec_handler) as vec:
        vec.save(
            url + "-vec",
            args=cc.args.StandardSave(
                {"vec": jax.device_put(VECTOR, NamedSharding(saved, P("data")))}
            ),
        )
    return ckptr


def _targets() -> dict[str, dict[str, Any]]:
    """Target shardings per name: same mesh (contiguous), 2x4 and transposed (cut chunks)."""
    return {
        "same": {"mesh": _mesh((4, 2)), "spec": P("data", "model")},
        "2x4": {"mesh": _mesh((2, 4)), "spec": P("data", "model")},
        "transposed": {"mesh": _mesh((4, 2)), "spec": P("model", "data")},
        "columns": {"mesh": _mesh((8, 1)), "spec": P("model", "data")},
    }


def _restore(ckptr: cc.Checkpointer, url: str, mesh: Mesh, spec: P) -> dict[str, Any]:
    values = {**MATRICES, "cube": CUBE}
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec))
        for k, v in values.items()
    }
    return ckptr.restore(url, args=cc.args.StandardRestore(target))


def _restore_vector(url: str, devices: int = 6) -> np.ndarray:
    sharding = NamedSharding(_mesh((devices,), ("x",)), P("x"))
    target = {"vec": jax.ShapeDtypeStruct(VECTOR.shape, VECTOR.dtype, sharding=sharding)}
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        out = ckptr.restore(url + "-vec", args=cc.args.StandardRestore(target))
    return np.asarray(out["vec"])


@pytest.mark.parametrize("backend", ["file", "gs"])
@pytest.mark.parametrize("inner", [SHARDED, WHOLE], ids=["sharded", "whole"])
def test_cut_chunks_restore_bit_exactly_onto_other_meshes(
    backend: str, inner: int, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url(backend, tmp_path)
    with _save(url, inner) as ckptr:
        for name, target in _targets().items():
            out = _restore(ckptr, url, target["mesh"], target["spec"])
            for k, v in {**MATRICES, "cube": CUBE}.items():
                assert out[k].dtype == v.dtype, (name, k)
                got = np.asarray(out[k])
                # Bit-exact: the bytes, not only the values (NaN payloads, signed zeros).
                assert got.tobytes() == v.tobytes(), f"{name} {k}"
                for shard in out[k].addressable_shards:
                    assert np.asarray(shard.data).tobytes() == v[shard.index].tobytes(), (name, k)
    for devices in (6, 8, 3):
        assert _restore_vector(url, devices).tobytes() == VECTOR.tobytes(), devices


def _flip(at: Any) -> Any:
    def change(data: bytearray) -> bytes:
        data[at(len(data))] ^= 0x10
        return bytes(data)

    return change


@pytest.mark.parametrize("backend", ["file", "gs"])
@pytest.mark.parametrize(
    "leaf,target,where",
    [
        ("f32", "same", "data"),  # inner chunks read straight into one contiguous stretch
        ("f32", "2x4", "data"),  # inner chunks cut by columns: scattered
        ("f32", "2x4", "crc"),  # the stored crc32c of a scattered inner chunk
        ("bf16", "columns", "data"),  # cut into 8 destinations
        ("cube", "2x4", "data"),  # rank 3, cut: scattered a plane at a time
    ],
)
def test_a_flipped_byte_in_a_cut_inner_chunk_is_refused(
    backend: str, leaf: str, target: str, where: str, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url(backend, tmp_path)
    with _save(url, SHARDED) as ckptr:
        leaf_id = sorted([*MATRICES, "cube"]).index(leaf)  # leaves are saved in key order
        objects = [p for p in _chunk_objects(url) if f"/arrays/{leaf_id}/" in p]
        victim = objects[len(objects) // 2]
        # Inside the second inner chunk's data, or in its crc32c (4 KiB inner chunks).
        at = {"data": lambda n: SHARDED + 4 + 1000, "crc": lambda n: 2 * SHARDED + 4 + 1}[where]
        _rewrite(url, victim, _flip(at))
        t = _targets()[target]
        with pytest.raises(cc.CorruptCheckpointError, match="checksum mismatch") as info:
            _restore(ckptr, url, t["mesh"], t["spec"])
        assert victim.split("/")[-1] in str(info.value)
        assert f"arrays/{leaf_id}/" in str(info.value)


@pytest.mark.parametrize("backend", ["file", "gs"])
@pytest.mark.parametrize("inner", [SHARDED, WHOLE], ids=["sharded", "whole"])
def test_a_flipped_byte_in_a_cut_vector_chunk_is_refused(
    backend: str, inner: int, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url(backend, tmp_path)
    with _save(url, inner):
        victim = _chunk_objects(url + "-vec")[1]
        _rewrite(url + "-vec", victim, _flip(lambda n: n // 2))
        with pytest.raises(cc.CorruptCheckpointError, match="checksum mismatch"):
            _restore_vector(url)


def test_a_scatter_places_pieces_of_any_size_and_starts_over_at_zero() -> None:
    """Bytes arrive in pieces that cut rows and elements anywhere; a write at 0 starts over."""
    import crc32c

    chunk = rng.standard_normal((24, 10)).astype(np.float32)
    left, right = np.zeros((24, 4), np.float32), np.zeros((30, 6), np.float32)
    parts = [(left, ((0, 24), (0, 4))), (right[3:27], ((0, 24), (4, 10)))]
    data = memoryview(chunk.tobytes())
    for cuts in ([1, 3, 39, 40, 41, 500, 959], [7], list(range(1, 960, 13))):
        left[:], right[:] = 0, 0
        sink = Scatter((24, 10), np.dtype(np.float32), parts)
        sink.write(0, data[:100])  # a first attempt, cut short
        bounds = [0, *cuts, len(data)]
        for a, b in itertools.pairwise(bounds):
            sink.write(a, data[a:b])
        assert sink.written == len(data)
        assert sink.crc == crc32c.crc32c(data)
        np.testing.assert_array_equal(left, chunk[:, :4])
        np.testing.assert_array_equal(right[3:27], chunk[:, 4:])
        assert not right[:3].any() and not right[27:].any()  # nothing outside its stretch
    with pytest.raises(ValueError, match="out of order"):
        sink.write(8, data[8:16])


def test_file_read_into_feeds_a_sink_larger_than_its_bounce_buffer(tmp_path: Any) -> None:
    """A 9 MiB inner chunk through the file system's bounce buffer (1 MiB at a time)."""
    chunk = rng.standard_normal((1152, 2048)).astype(np.float32)
    path = tmp_path / "obj"
    path.write_bytes(b"x" * 10 + chunk.tobytes() + b"tail")
    top = np.zeros((1152, 1000), np.float32)
    bottom = np.zeros((1152, 1048), np.float32)
    sink = Scatter(
        chunk.shape,
        chunk.dtype,
        [(top, ((0, 1152), (0, 1000))), (bottom, ((0, 1152), (1000, 2048)))],
    )
    head, tail = bytearray(10), bytearray(4)

    async def go() -> int | None:
        return await FileBackend().read_into(
            str(path), 0, [memoryview(head), sink, memoryview(tail)]
        )

    assert asyncio.run(go()) == 10 + chunk.nbytes + 4
    assert bytes(head) == b"x" * 10 and bytes(tail) == b"tail"
    np.testing.assert_array_equal(top, chunk[:, :1000])
    np.testing.assert_array_equal(bottom, chunk[:, 1000:])


def test_a_piece_is_released_once_after_it_is_placed_or_dropped(placement: str) -> None:
    """``release`` comes after the piece's bytes are in place, once, and for dropped ones too."""
    chunk = rng.standard_normal((64, 8)).astype(np.float32)
    data = memoryview(chunk.tobytes())
    out = np.zeros((64, 8), np.float32)
    released: list[tuple[int, int]] = []  # (piece start, bytes the scatter had written then)

    async def go() -> None:
        sink = Scatter((64, 8), np.dtype(np.float32), [(out, ((0, 64), (0, 8)))])

        def release(at: int) -> Any:
            return lambda: released.append((at, sink.written))

        for a in range(0, len(data), 256):
            sink.write_later(a, data[a : a + 256], release(a))
        await sink.settled()
        np.testing.assert_array_equal(out, chunk)
        assert [at for at, _ in released] == list(range(0, len(data), 256))
        assert all(written == at + 256 for at, written in released)  # placed, then released
        released.clear()
        sink.write_later(8, data[8:16], release(8))  # out of order: fails, dropped
        sink.write_later(16, data[16:24], release(16))  # after a failure: dropped
        with pytest.raises(ValueError, match="out of order"):
            await sink.settled()
        assert sorted(at for at, _ in released) == [8, 16]

    asyncio.run(go())


def test_pieces_handed_over_are_placed_in_order_and_failures_kept(placement: str) -> None:
    """``write_later`` (a streamed body's pieces, placed by the scatter thread)."""
    import crc32c

    chunk = rng.standard_normal((64, 8)).astype(np.float32)
    data = memoryview(chunk.tobytes())
    out = np.zeros((64, 8), np.float32)

    async def go() -> None:
        sink = Scatter((64, 8), np.dtype(np.float32), [(out, ((0, 64), (0, 8)))])
        for a in range(0, 1000, 100):  # a first attempt, cut short
            sink.write_later(a, data[a : a + 100])
        sink.write(0, data[:999])  # a retry: waits for those, then starts over
        sink.write_later(999, data[999:])
        await sink.settled()
        assert sink.failed is None and sink.written == len(data)
        assert sink.crc == crc32c.crc32c(data)
        np.testing.assert_array_equal(out, chunk)
        sink.write_later(8, data[8:16])  # out of order: kept, raised by settled()
        with pytest.raises(ValueError, match="out of order"):
            await sink.settled()
        assert isinstance(sink.failed, ValueError)

    asyncio.run(go())


def test_placing_threads_only_on_hosts_of_more_than_two_cores() -> None:
    from cloudckpt.handlers.pytree import scatter

    assert [scatter.threads_for(n) for n in (1, 2, 3, 4, 8, 96)] == [0, 0, 3, 4, 8, 8]
    here = scatter.threads_for(len(os.sched_getaffinity(0)))
    assert here == scatter.THREADS  # the policy is what this process uses


def test_placed_at_once_without_placing_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """``THREADS`` 0: ``write_later`` has placed (and released) the piece when it returns."""
    from cloudckpt.handlers.pytree import scatter

    monkeypatch.setattr(scatter, "THREADS", 0)
    chunk = rng.standard_normal((16, 8)).astype(np.float32)
    out = np.zeros((16, 8), np.float32)
    sink = Scatter((16, 8), np.dtype(np.float32), [(out, ((0, 16), (0, 8)))])
    released: list[int] = []
    data = memoryview(chunk.tobytes())
    sink.write_later(0, data[:256], lambda: released.append(sink.written))
    assert released == [256] and sink.pending is None and not sink.crowded()
    np.testing.assert_array_equal(out[:8], chunk[:8])
    sink.write_later(300, data[300:], lambda: released.append(-1))  # out of order: kept
    assert released == [256, -1] and isinstance(sink.failed, ValueError)
    with pytest.raises(ValueError, match="out of order"):
        asyncio.run(sink.settled())
