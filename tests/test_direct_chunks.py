"""Restores of cloudckpt's own zarr arrays read chunks directly (handlers/pytree/chunks.py).

On the file system inner chunks are read by the kernel straight into the
destination buffers, on GCS by streamed ranged GETs (the round trips run on
both; tests/test_direct_chunks_gcs.py has GCS's own). Every
crc32c is checked: values must round-trip onto
any mesh, and a flipped byte, a forged shard index or a cut object must raise
CorruptCheckpointError naming the object.
"""

from __future__ import annotations

import asyncio
import glob
import os
from typing import Any

import crc32c
import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.storage.path import StoragePath
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique


def _mesh(shape: tuple[int, int]) -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))


SAVED = (4, 2)
VALUES = {
    "f32": np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32),
    "bf16": np.random.default_rng(2).standard_normal((256, 512)).astype(ml_dtypes.bfloat16),
}


def _save(url: str, inner_chunk_bytes: int) -> cc.Checkpointer:
    sharding = NamedSharding(_mesh(SAVED), P("data", "model"))
    handler = cc.StandardCheckpointHandler(
        inner_chunk_bytes=inner_chunk_bytes, pack_below_bytes=1024
    )
    ckptr = cc.Checkpointer(handler)
    tree = {k: jax.device_put(v, sharding) for k, v in VALUES.items()}
    ckptr.save(url, args=cc.args.StandardSave(tree))
    return ckptr


def _restore(ckptr: cc.Checkpointer, url: str, sharding: Any) -> dict[str, Any]:
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in VALUES.items()
    }
    return ckptr.restore(url, args=cc.args.StandardRestore(target))


def _url(backend: str, tmp_path: Any) -> str:
    return str(tmp_path / "ckpt") if backend == "file" else f"gs://{BUCKET}/{unique('direct')}"


async def _objects(url: str) -> list[str]:
    root = StoragePath.from_url(url)
    try:
        return sorted([o.path async for o in root.backend.list_prefix(root.path + "/")])
    finally:
        await root.backend.aclose()  # its client lives on this asyncio.run's loop


def _chunk_objects(url: str) -> list[str]:
    return [p for p in asyncio.run(_objects(url)) if "/arrays/" in p and "/c/" in p]


def _rewrite(url: str, path: str, change: Any) -> None:
    backend = StoragePath.from_url(url).backend

    async def go() -> None:
        try:
            data = await backend.get(path)
            assert data is not None
            await backend.put(path, change(bytearray(data)))
        finally:
            await backend.aclose()  # its client lives on this asyncio.run's loop

    asyncio.run(go())


@pytest.mark.parametrize("backend", ["file", "gs"])
@pytest.mark.parametrize("inner_chunk_bytes", [4 << 10, 1 << 30], ids=["sharded", "whole"])
def test_values_round_trip_onto_any_mesh(
    backend: str, inner_chunk_bytes: int, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url(backend, tmp_path)
    with _save(url, inner_chunk_bytes) as ckptr:
        assert len(_chunk_objects(url)) == 2 * 8  # two arrays, one chunk per saved shard
        shardings = {
            "same": NamedSharding(_mesh(SAVED), P("data", "model")),
            "2x4": NamedSharding(_mesh((2, 4)), P("data", "model")),
            "transposed": NamedSharding(_mesh(SAVED), P("model", "data")),
            "replicated": NamedSharding(_mesh(SAVED), P()),
        }
        for name, sharding in shardings.items():
            out = _restore(ckptr, url, sharding)
            for k, v in VALUES.items():
                assert out[k].dtype == v.dtype, (name, k)
                np.testing.assert_array_equal(np.asarray(out[k]), v, err_msg=f"{name} {k}")


@pytest.mark.parametrize("backend", ["file"])
@pytest.mark.parametrize("where", ["first", "middle", "crc", "index"])
def test_a_flipped_byte_is_refused_and_names_the_object(
    backend: str, where: str, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url(backend, tmp_path)
    with _save(url, 4 << 10) as ckptr:
        victim = _chunk_objects(url)[3]

        def flip(data: bytearray) -> bytes:
            n = len(data)
            at = {"first": 0, "middle": n // 3, "crc": 4 * 1024 + 2, "index": n - 9}[where]
            data[at] ^= 0x40
            return bytes(data)

        _rewrite(url, victim, flip)
        # The message is the direct reader's own (tensorstore's would say "corrupt data in").
        with pytest.raises(cc.CorruptCheckpointError, match="checksum mismatch") as info:
            _restore(ckptr, url, NamedSharding(_mesh(SAVED), P("data", "model")))
        assert "/".join(victim.split("/")[-4:]) in str(info.value)


def test_a_forged_shard_index_with_a_valid_crc_is_refused(
    servers: LocalServers, tmp_path: Any
) -> None:
    """An index whose own crc32c matches but points past the data addresses nothing."""
    url = _url("file", tmp_path)
    with _save(url, 4 << 10) as ckptr:
        victim = _chunk_objects(url)[0]

        def forge(data: bytearray) -> bytes:
            table_end = len(data) - 4
            # The first index entry's offset moves past the end of the data.
            index_start = table_end - 16 * _inner_count(data)
            data[index_start : index_start + 8] = (len(data) + 1000).to_bytes(8, "little")
            crc = crc32c.crc32c(bytes(data[index_start:table_end]))
            data[table_end:] = crc.to_bytes(4, "little")
            return bytes(data)

        _rewrite(url, victim, forge)
        with pytest.raises(cc.CorruptCheckpointError, match="corrupt shard index"):
            _restore(ckptr, url, NamedSharding(_mesh(SAVED), P("data", "model")))


def _inner_count(data: bytearray) -> int:
    # Each inner chunk is 4 KiB + 4 bytes of crc32c, each index entry 16 bytes, + 4 bytes crc.
    return (len(data) - 4) // (4 * 1024 + 4 + 16)


def test_a_cut_chunk_object_is_refused(servers: LocalServers, tmp_path: Any) -> None:
    url = _url("file", tmp_path)
    with _save(url, 4 << 10) as ckptr:
        victim = _chunk_objects(url)[1]
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) - 100)
        with pytest.raises(cc.CorruptCheckpointError) as info:
            _restore(ckptr, url, NamedSharding(_mesh(SAVED), P("data", "model")))
        assert "/".join(victim.split("/")[-4:]) in str(info.value)


def test_chunk_files_are_the_ones_listed(tmp_path: Any) -> None:
    """The chunk objects are plain files under the item (what the direct reads open)."""
    url = _url("file", tmp_path)
    with _save(url, 4 << 10):
        assert sorted(glob.glob(f"{url}/**/arrays/*/c/*/*", recursive=True)) == _chunk_objects(url)
