"""Typed PRNG keys (``jax.random.key``): saved as key data, restored as keys, on any mesh."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.cli import main
from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format import jsonio as _jsonio
from cloudckpt.testing.servers import LocalServers, free_port

from .backend_harness import StoreUnderTest, make_store
from .multiproc import Worker, finish, popen, tail

IMPLS = {"threefry2x32": (2,), "rbg": (4,), "unsafe_rbg": (4,)}


def mesh(shape: tuple[int, ...], names: tuple[str, ...], reverse: bool = False) -> Mesh:
    devices = jax.devices()[: math.prod(shape)]
    return Mesh(np.array(devices[::-1] if reverse else devices).reshape(shape), names)


def key_tree(m: Mesh) -> dict[str, Any]:
    """Single keys and sharded batches of every implementation, plus a legacy raw key."""
    tree: dict[str, Any] = {}
    for seed, impl in enumerate(IMPLS):
        batch = jax.random.split(jax.random.key(seed, impl=impl), 8)
        grid = jax.random.split(jax.random.key(seed + 10, impl=impl), (16, 64))
        tree[impl] = {
            "one": jax.random.key(seed + 20, impl=impl),
            "batch": jax.device_put(batch, NamedSharding(m, P("data"))),
            # Shards of 1-2 KiB: a zarr array of its own (above pack_below_bytes).
            "grid": jax.device_put(grid, NamedSharding(m, P("data", "model"))),
        }
    tree["legacy"] = jax.random.PRNGKey(99)  # raw uint32 key data, as before typed keys
    return tree


def data(keys: jax.Array) -> np.ndarray:
    return np.asarray(jax.random.key_data(keys))


def assert_same_keys(got: Any, want: jax.Array) -> None:
    assert jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key), got.dtype
    assert got.dtype == want.dtype and got.shape == want.shape
    assert jax.random.key_impl(got) == jax.random.key_impl(want)
    np.testing.assert_array_equal(data(got), data(want))
    # The keys work as keys: the same draws as the originals.
    np.testing.assert_array_equal(
        np.asarray(jax.random.uniform(got.reshape(-1)[0], (3,))),
        np.asarray(jax.random.uniform(want.reshape(-1)[0], (3,))),
    )


@pytest.fixture(scope="module")
def ckptr():
    with cc.Checkpointer(cc.StandardCheckpointHandler(pack_below_bytes=512)) as c:
        yield c


@pytest.fixture(params=["file", "s3", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


def test_keys_round_trip_without_target_and_onto_another_mesh(
    store: StoreUnderTest, ckptr: cc.Checkpointer
) -> None:
    tree = key_tree(mesh((4, 2), ("data", "model")))
    ckptr.save(store.url("1"), args=cc.args.StandardSave(tree))

    # pytree.json records the key data and the implementation; old readers see uint32 arrays.
    document = _jsonio.loads(store.raw_get(store.path("1", "pytree.json")), where="test")
    leaves = {leaf["path"]: leaf for leaf in document["leaves"]}
    for impl, key_shape in IMPLS.items():
        grid = leaves[f"['{impl}']['grid']"]
        assert grid["prng_impl"] == impl and grid["dtype"] == "uint32"
        assert grid["shape"] == [16, 64, *key_shape] and grid["storage"]["type"] == "zarr"
        assert document["shardings"][grid["sharding"]]["spec"] == ["data", "model", None]
        assert leaves[f"['{impl}']['one']"]["shape"] == list(key_shape)
    assert "prng_impl" not in leaves["['legacy']"]

    # Without a target: typed keys of the saved implementation; raw keys stay uint32.
    plain = ckptr.restore(store.url("1"))
    for impl in IMPLS:
        for name, keys in tree[impl].items():
            assert_same_keys(plain[impl][name], keys)
    assert plain["legacy"].dtype == np.uint32
    np.testing.assert_array_equal(plain["legacy"], np.asarray(tree["legacy"]))

    # Into an abstract target on another mesh (other devices, axes and specs).
    other = mesh((2, 4), ("x", "y"), reverse=True)
    specs = {"one": P(), "batch": P("y"), "grid": P("x", "y")}
    target = {
        impl: {
            name: jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=NamedSharding(other, specs[name]))
            for name, k in tree[impl].items()
        }
        for impl in IMPLS
    }
    target["legacy"] = jax.ShapeDtypeStruct((2,), np.uint32, sharding=NamedSharding(other, P()))
    out = ckptr.restore(store.url("1"), args=cc.args.StandardRestore(target))
    for impl in IMPLS:
        for name, keys in tree[impl].items():
            assert_same_keys(out[impl][name], keys)
            assert out[impl][name].sharding == target[impl][name].sharding
            # Each device holds its own shard of the keys (and of their data).
            assert len(out[impl][name].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(out["legacy"]), np.asarray(tree["legacy"]))


def test_keys_restore_into_key_arrays_and_single_devices(
    store: StoreUnderTest, ckptr: cc.Checkpointer
) -> None:
    m = mesh((4, 2), ("data", "model"))
    tree = key_tree(m)
    ckptr.save(store.url("2"), args=cc.args.StandardSave(tree))
    # A target of real key arrays (e.g. a freshly initialised model) and one on one device.
    fresh = key_tree(mesh((8, 1), ("data", "model"), reverse=True))
    del fresh["legacy"]
    fresh["rbg"]["grid"] = jax.ShapeDtypeStruct(
        (16, 64), tree["rbg"]["grid"].dtype, sharding=SingleDeviceSharding(jax.devices()[5])
    )
    out = ckptr.restore(store.url("2"), args=cc.args.StandardRestore(fresh))
    for impl in IMPLS:
        for name, keys in tree[impl].items():
            assert_same_keys(out[impl][name], keys)
    assert out["rbg"]["grid"].devices() == {jax.devices()[5]}
    assert out["threefry2x32"]["batch"].sharding == fresh["threefry2x32"]["batch"].sharding


def test_metadata_and_inspect_show_keys(
    store: StoreUnderTest, ckptr: cc.Checkpointer, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = key_tree(mesh((4, 2), ("data", "model")))
    ckptr.save(store.url("3"), args=cc.args.StandardSave(tree))
    meta = ckptr.metadata(store.url("3")).item_metadata
    grid = meta["unsafe_rbg"]["grid"]
    assert grid.shape == (16, 64) and grid.dtype == tree["unsafe_rbg"]["grid"].dtype
    assert str(grid.dtype) == "key<urbg>" and grid.nbytes == 16 * 64 * 4 * 4
    assert grid.sharding["spec"] == ["data", "model"]
    assert str(meta["threefry2x32"]["one"].dtype) == "key<fry>"
    assert meta["threefry2x32"]["one"].shape == ()
    assert meta["legacy"].dtype == np.uint32 and meta["legacy"].shape == (2,)
    # The metadata is a valid abstract target as it stands.
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
        meta,
        is_leaf=lambda x: isinstance(x, cc.ArrayMetadata),
    )
    out = ckptr.restore(store.url("3"), args=cc.args.StandardRestore(abstract))
    assert_same_keys(out["rbg"]["batch"], tree["rbg"]["batch"])

    capsys.readouterr()
    assert main(["inspect", store.url("3")]) == 0
    out_text = capsys.readouterr().out
    row = next(line for line in out_text.splitlines() if "['rbg']['grid']" in line)
    assert row.split()[1:4] == ["key<rbg>", "(16,", "64)"]
    assert "P(data, model)" in row
    assert main(["inspect", "--json", store.url("3")]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)["items"][0]["leaves"]}
    assert rows["['threefry2x32']['batch']"]["dtype"] == "key<fry>"
    assert rows["['threefry2x32']['batch']"]["shape"] == [8]
    assert rows["['threefry2x32']['batch']"]["nbytes"] == 8 * 2 * 4
    assert rows["['legacy']"]["dtype"] == "uint32"
    # verify reads every object of it, key data included, and finds all checksums good.
    assert main(["verify", store.url("3")]) == 0


def test_key_mismatches_are_named(tmp_path: Path, ckptr: cc.Checkpointer) -> None:
    url = str(tmp_path / "k")
    fry = jax.random.key(0)
    ckptr.save(url, args=cc.args.StandardSave({"k": fry, "raw": jax.random.PRNGKey(1)}))
    rbg = jax.ShapeDtypeStruct((), jax.random.key(0, impl="rbg").dtype)
    cases = [
        ({"k": rbg, "raw": jax.random.PRNGKey(0)}, r"\['k'\] \(saved PRNG keys key<fry>, target"),
        (
            {"k": jax.ShapeDtypeStruct((2,), np.uint32), "raw": jax.random.PRNGKey(0)},
            r"\['k'\] \(saved PRNG keys key<fry>, target uint32",
        ),
        (
            {"k": jax.ShapeDtypeStruct((3,), fry.dtype), "raw": jax.random.PRNGKey(0)},
            r"shape mismatches: \['k'\]: target \(3,\) vs saved \(\)",
        ),
        ({"k": fry, "raw": fry}, r"\['raw'\] \(saved uint32 data, target PRNG keys key<fry>"),
    ]
    for target, message in cases:
        with pytest.raises(ValueError, match=message):
            ckptr.restore(url, args=cc.args.StandardRestore(target))


def test_unknown_or_inconsistent_implementation_is_corruption(
    tmp_path: Path, ckptr: cc.Checkpointer
) -> None:
    url = tmp_path / "k"
    ckptr.save(str(url), args=cc.args.StandardSave({"k": jax.random.key(0)}))
    path = url / "pytree.json"
    document = _jsonio.loads(path.read_bytes(), where="test")
    for field, value, message in (
        ("prng_impl", "no_such_rng", "implementation 'no_such_rng', which this jax does not know"),
        (
            "dtype",
            "int32",
            r"stored as uint32 with trailing dims \[2\], the entry says int32 \[2\]",
        ),
        # A shape its stored bytes do not back is refused before the key check.
        ("shape", [3], r"pack entries overlap or leave part of the array uncovered"),
    ):
        changed = json.loads(json.dumps(document))
        changed["leaves"][0][field] = value
        path.write_bytes(_jsonio.dumps(changed))
        with pytest.raises(CorruptCheckpointError, match=message):
            ckptr.restore(str(url))
        with pytest.raises(CorruptCheckpointError, match=message):
            ckptr.metadata(str(url))


def _keys_worker(i: int, port: int, url: str) -> Worker:
    spec = {"process_id": i, "num_processes": 2, "devices": 4, "port": port, "url": url}
    proc, errors = popen("tests.mp_keys_worker", json.dumps(spec))
    return Worker(i, proc, errors=errors)


def test_sharded_keys_from_two_processes(
    servers: LocalServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """2 processes x 4 devices save key batches; each restores its shards onto another mesh."""
    store = make_store("s3", request, tmp_path)
    port = free_port()
    workers = [_keys_worker(i, port, store.url("mp")) for i in range(2)]
    results = [w.result() for w in finish(workers)]
    for worker, result in zip(workers, results, strict=True):
        assert worker.proc.returncode == 0 and result is not None, tail(worker)
    # Each process checked its own half (4 of the 8 distinct shards) of the 16x4 keys of
    # each implementation, counted in uint32 words of key data (2, 4 and 4 per key).
    half = sum(16 * 4 * n for n in (2, 4, 4)) // 2
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["checked_words"] == half for r in results)

    # And this single process (8 devices) reads the whole of what the two wrote.
    from .mp_keys_worker import IMPLS as MP_IMPLS
    from .mp_keys_worker import expected_key_data

    with cc.CheckpointManager(store.url("mp")) as mngr:
        plain = mngr.restore(1).state
    for impl in MP_IMPLS:
        assert str(jax.random.key_impl(plain[impl])) == impl
        np.testing.assert_array_equal(data(plain[impl]), expected_key_data(impl))
