"""Restored regions land in host buffers that CPU devices adopt, once per region (issue 18).

A restore reads each region a process needs into one aligned host buffer;
on CPU devices XLA adopts that buffer as device memory, so every replica of
the region on this process shares it instead of holding a copy (a restore's
memory stays near the bytes restored). These tests pin that down through
jax's public API on the test suite's CPU devices, check that sharing never lets one computation change
another array's values (a donated restored array is copied, not written in
place), and that a packed entry cut short is refused before any value is
returned. A restore pauses the cyclic collector (its many new objects would set
off full collections) and leaves it as it found it.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def _tree(m: Mesh) -> dict[str, Any]:
    rng = np.random.default_rng(18)
    return {
        # 4 MiB, replicated on all 8 devices: stored as a zarr array.
        "replicated": jax.device_put(
            rng.standard_normal((1024, 1024), np.float32), NamedSharding(m, P())
        ),
        # 8 MiB in 2 column shards, each held by 4 devices: zarr.
        "columns": jax.device_put(
            rng.standard_normal((1024, 2048), np.float32), NamedSharding(m, P(None, "model"))
        ),
        # 64 KiB, replicated: packed with the other small leaves.
        "small": jax.device_put(rng.standard_normal((128, 128), np.float32), NamedSharding(m, P())),
        # Fully sharded: each region on one device.
        "sharded": jax.device_put(
            rng.standard_normal((2048, 1024), np.float32), NamedSharding(m, P("data", "model"))
        ),
    }


def _target(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in tree.items()}


@pytest.fixture
def ckptr() -> Any:
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as c:
        yield c


def test_replicas_of_a_restored_region_share_one_host_buffer(ckptr: Any, tmp_path) -> None:
    tree = _tree(_mesh())
    url = str(tmp_path / "ckpt")
    ckptr.save(url, args=cc.args.StandardSave(tree))
    out = ckptr.restore(url, args=cc.args.StandardRestore(_target(tree)))
    for name, array in out.items():
        np.testing.assert_array_equal(np.asarray(array), np.asarray(tree[name]))
        pointers: dict[Any, set[int]] = defaultdict(set)
        for shard in array.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index)
            pointers[key].add(shard.data.unsafe_buffer_pointer())
        replicas = math.prod(array.sharding.mesh.devices.shape) // len(pointers)
        assert all(len(p) == 1 for p in pointers.values()), (name, replicas, dict(pointers))
        # Distinct regions are distinct buffers.
        assert len({next(iter(p)) for p in pointers.values()}) == len(pointers), name


def test_donating_a_restored_array_does_not_write_into_the_shared_buffer(
    ckptr: Any, tmp_path
) -> None:
    tree = _tree(_mesh())
    url = str(tmp_path / "ckpt")
    ckptr.save(url, args=cc.args.StandardSave(tree))
    out = ckptr.restore(url, args=cc.args.StandardRestore(_target(tree)))
    expected = np.asarray(tree["replicated"]) + 1
    keep = out["columns"]
    bumped = jax.jit(lambda x: x + 1, donate_argnums=0)(out["replicated"])
    # Every replica was incremented once: in-place writes into one shared buffer by 8
    # devices would have added up to 8.
    for shard in bumped.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), expected)
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(tree["columns"]))
    again = ckptr.restore(url, args=cc.args.StandardRestore(_target(tree)))
    np.testing.assert_array_equal(np.asarray(again["replicated"]), np.asarray(tree["replicated"]))


def test_a_pack_object_cut_short_is_refused_and_named(ckptr: Any, tmp_path) -> None:
    tree = _tree(_mesh())
    url = str(tmp_path / "ckpt")
    ckptr.save(url, args=cc.args.StandardSave(tree))
    (attempt,) = (n for n in os.listdir(url) if n.startswith("@"))  # format 2: @<attempt>/packs
    packs = os.path.join(url, attempt, "packs")
    victim = sorted(os.listdir(packs))[-1]  # one of the pack objects (whole leaves get their own)
    path = os.path.join(packs, victim)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(cc.CorruptCheckpointError) as info:
        ckptr.restore(url, args=cc.args.StandardRestore(_target(tree)))
    assert f"{attempt}/packs/{victim}" in str(info.value)


def test_a_restore_runs_with_the_collector_paused_and_leaves_it_as_it_was(
    ckptr: Any, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No full collections over a restore's many new objects; the collector is left as it was."""
    import gc

    from cloudckpt.handlers.pytree.read import Reader

    seen: list[bool] = []
    regions = Reader.regions

    async def watched(self: Any, leaf: int, indices: Any) -> Any:
        seen.append(gc.isenabled())
        return await regions(self, leaf, indices)

    monkeypatch.setattr(Reader, "regions", watched)
    m = _mesh()
    tree = _tree(m)
    url = str(tmp_path / "gc")
    ckptr.save(url, args=cc.args.StandardSave(tree))
    target = _target(tree)
    assert gc.isenabled()
    out = ckptr.restore(url, args=cc.args.StandardRestore(target))
    assert seen and not any(seen), seen
    assert gc.isenabled()
    np.testing.assert_array_equal(np.asarray(out["replicated"]), np.asarray(tree["replicated"]))
    gc.disable()  # a program that turned the collector off keeps it off
    try:
        seen.clear()
        ckptr.restore(url, args=cc.args.StandardRestore(target))
        assert seen and not any(seen)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_pauses_of_the_collector_nest_across_threads() -> None:
    import gc
    import threading

    from cloudckpt.handlers.pytree.host import collector_paused

    entered, leave = threading.Barrier(3), threading.Event()
    states: list[bool] = []

    def restore() -> None:
        with collector_paused():
            entered.wait()
            leave.wait()
            states.append(gc.isenabled())

    threads = [threading.Thread(target=restore) for _ in range(2)]
    for t in threads:
        t.start()
    entered.wait()
    assert not gc.isenabled()  # both inside
    with collector_paused():
        leave.set()
        for t in threads:
            t.join()
        assert states == [False, False] and not gc.isenabled()  # one pause is still open
    assert gc.isenabled()


def test_direct_reads_allocate_their_buffers_off_the_event_loop(
    ckptr: Any, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mapping a region's new buffer waits for the memory-map lock the prefaults hold: a
    worker thread waits for it, never the loop that runs (and on object stores receives) reads."""
    import asyncio

    from cloudckpt.handlers.pytree import read

    calls: list[tuple[tuple[int, ...], bool]] = []
    real = read.empty_aligned

    def spy(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        try:
            asyncio.get_running_loop()
            calls.append((tuple(shape), True))
        except RuntimeError:
            calls.append((tuple(shape), False))
        return real(shape, dtype)

    state = _tree(_mesh())
    ckptr.save(tmp_path / "x", args=cc.args.StandardSave(state))
    monkeypatch.setattr(read, "empty_aligned", spy)
    restored = ckptr.restore(tmp_path / "x", args=cc.args.StandardRestore(_target(state)))
    # Packed leaves' regions ("small", "sharded": shards of 1 MiB or less) are cut from
    # their packs on the loop; the zarr leaves' regions ("replicated" and both "columns"
    # shards, 1024x1024 each, read straight into their buffers) get theirs on a worker.
    zarr = [loop for shape, loop in calls if shape == (1024, 1024)]
    assert len(zarr) >= 3 and not any(zarr), calls
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))
