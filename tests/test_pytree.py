"""Sharded pytrees through tensorstore, against every backend."""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread
from cloudckpt.handlers.pytree import layout
from cloudckpt.testing.faultproxy import FaultProxy
from cloudckpt.testing.servers import LocalServers

from .backend_harness import ALL_KINDS, StoreUnderTest, make_store
from .helpers import BUCKET, unique

Pair = collections.namedtuple("Pair", "first second")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    kernel: jax.Array
    bias: jax.Array


def mesh(shape: tuple[int, ...] = (4, 2), names: tuple[str, ...] = ("data", "model")) -> Mesh:
    n = math.prod(shape)
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def put(x: np.ndarray, m: Mesh, *spec: str | None) -> jax.Array:
    return jax.device_put(x, NamedSharding(m, P(*spec)))


def train_state(m: Mesh) -> dict:
    rng = np.random.default_rng(0)
    return {
        "params": {
            "dense": Layer(
                kernel=put(
                    rng.standard_normal((512, 256), np.float32), m, "data", "model"
                ),  # fully sharded
                bias=put(
                    rng.standard_normal((256,), np.float32), m, "model"
                ),  # partially replicated
            ),
            "embed": put(rng.standard_normal((1024, 512)).astype(jnp.bfloat16), m, None, "model"),
            "norm": put(np.ones((1024, 1024), np.float32), m),  # replicated, 4 MiB
        },
        "opt": Pair(
            first=put(rng.integers(0, 9, (64, 8), np.int32), m, "data"),
            second=[jnp.zeros(()), None],
        ),
        "step": 1234,
        "lr": 3e-4,
        "name": "exp1",
        "host": np.arange(12, dtype=np.uint16).reshape(3, 4),
        "flag": np.bool_(True),
    }


def assert_tree_equal(a, b) -> None:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, f"{ta} != {tb}"
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, str) or isinstance(y, str):
            assert x == y
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            assert np.asarray(x).dtype == np.asarray(y).dtype


def saved_tree_as_host(tree):
    """What a target-less restore returns: numpy leaves, custom nodes as dicts."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) else x,
        {
            **tree,
            "params": {
                **tree["params"],
                "dense": {
                    "kernel": tree["params"]["dense"].kernel,
                    "bias": tree["params"]["dense"].bias,
                },
            },
            "opt": {"first": tree["opt"].first, "second": tree["opt"].second},
        },
    )


@pytest.fixture(params=ALL_KINDS)
def store(request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


@pytest.fixture(scope="module")
def ckptr():
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as c:
        yield c


def listing(store: StoreUnderTest, loop: LoopThread, *parts: str) -> dict[str, int]:
    prefix = store.path(*parts)

    async def collect() -> dict[str, int]:
        return {i.path[len(prefix) + 1 :]: i.size async for i in store.backend.list_prefix(prefix)}

    return loop.run(collect())


class TestRoundTrip:
    def test_save_restore_without_target(
        self, store: StoreUnderTest, ckptr: cc.Checkpointer
    ) -> None:
        tree = train_state(mesh())
        ckptr.save(store.url("1"), args=cc.args.StandardSave(tree))
        restored = ckptr.restore(store.url("1"))
        assert_tree_equal(restored, saved_tree_as_host(tree))
        assert isinstance(restored["step"], int) and isinstance(restored["lr"], float)
        assert isinstance(restored["flag"], np.bool_)
        assert isinstance(restored["params"]["embed"], np.ndarray)

    def test_restore_into_target_shardings(
        self, store: StoreUnderTest, ckptr: cc.Checkpointer
    ) -> None:
        m = mesh()
        tree = train_state(m)
        ckptr.save(store.url("2"), args=cc.args.StandardSave(tree))
        target = jax.tree_util.tree_map(
            lambda x: (
                jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                if isinstance(x, jax.Array)
                else x
            ),
            tree,
        )
        restored = ckptr.restore(store.url("2"), args=cc.args.StandardRestore(target))
        assert_tree_equal(restored, tree)
        assert isinstance(restored["params"]["dense"], Layer) and isinstance(restored["opt"], Pair)
        assert (
            restored["params"]["dense"].kernel.sharding == tree["params"]["dense"].kernel.sharding
        )

    def test_replicated_data_is_written_once(
        self, store: StoreUnderTest, ckptr: cc.Checkpointer, loop: LoopThread
    ) -> None:
        m = mesh()
        ckptr.save(
            store.url("3"),
            args=cc.args.StandardSave({"r": put(np.ones((1024, 1024), np.float32), m)}),
        )
        objects = listing(store, loop, "3")
        chunks = {k: v for k, v in objects.items() if "arrays/0/c/" in k}
        assert len(chunks) == 1 and sum(chunks.values()) < 4 * 2**20 + 4096


class TestResharding:
    @pytest.mark.parametrize("kind", ["file", "s3", "gcs"])
    def test_8_devices_to_4_and_2_and_numpy(
        self, kind: str, request: pytest.FixtureRequest, tmp_path, ckptr
    ) -> None:
        store = make_store(kind, request, tmp_path)
        big = np.arange(256 * 512, dtype=np.float32).reshape(256, 512)
        small = np.arange(64, dtype=np.int32).reshape(8, 8)
        m8 = mesh((4, 2))
        ckptr.save(
            store.url("r"),
            args=cc.args.StandardSave(
                {"big": put(big, m8, "data", "model"), "small": put(small, m8, "data")}
            ),
        )
        for shape, names, spec in (
            ((4,), ("x",), ("x", None)),
            ((2,), ("x",), (None, "x")),
            ((2, 2), ("a", "b"), ("b", "a")),
        ):
            m = mesh(shape, names)
            target = {
                "big": jax.ShapeDtypeStruct(
                    big.shape, big.dtype, sharding=NamedSharding(m, P(*spec))
                ),
                "small": jax.ShapeDtypeStruct(
                    small.shape, small.dtype, sharding=NamedSharding(m, P(*spec))
                ),
            }
            out = ckptr.restore(store.url("r"), args=cc.args.StandardRestore(target))
            assert out["big"].sharding == target["big"].sharding and len(
                out["big"].devices()
            ) == math.prod(shape)
            np.testing.assert_array_equal(np.asarray(out["big"]), big)
            np.testing.assert_array_equal(np.asarray(out["small"]), small)
        host = ckptr.restore(
            store.url("r"), args=cc.args.StandardRestore({"big": np.zeros_like(big)})
        )
        assert isinstance(host["big"], np.ndarray)
        np.testing.assert_array_equal(host["big"], big)


class TestPartialRestore:
    def test_reads_nothing_else(self, servers: LocalServers, ckptr: cc.Checkpointer) -> None:
        with FaultProxy(servers.s3.endpoint, fault_rate=0.0) as proxy:
            url = f"s3://{BUCKET}/{unique('partial')}"
            options = {"endpoint_url": proxy.endpoint}
            with cc.Checkpointer(cc.StandardCheckpointHandler(), storage_options=options) as c:
                m = mesh()
                tree = {  # 8 MiB arrays in 2 MiB shards: zarr arrays, not packed
                    "wanted": put(
                        np.arange(2048 * 1024, dtype=np.float32).reshape(2048, 1024), m, "data"
                    ),
                    "other": put(np.ones((2048, 1024), np.float32), m, "data"),
                    "tiny_wanted": np.arange(5.0),
                    "tiny_other": np.arange(7.0),
                }
                c.save(url, args=cc.args.StandardSave(tree))
                proxy.stats.log.clear()
                out = c.restore(
                    url,
                    args=cc.args.StandardRestore(
                        {
                            "wanted": jax.ShapeDtypeStruct(
                                (2048, 1024), np.float32, sharding=NamedSharding(m, P("data"))
                            ),
                            "tiny_wanted": np.zeros(5),
                        }
                    ),
                )
        np.testing.assert_array_equal(np.asarray(out["wanted"]), np.asarray(tree["wanted"]))
        np.testing.assert_array_equal(out["tiny_wanted"], tree["tiny_wanted"])
        assert set(out) == {"wanted", "tiny_wanted"}
        gets = [path for method, path in proxy.stats.log if method == "GET"]
        assert any("/arrays/0/" in p for p in gets), gets
        assert not any("/arrays/1/" in p for p in gets), gets  # 'other' was never read
        pack_gets = [p for p in gets if "/packs/" in p]
        assert len(pack_gets) == 1  # one ranged read of the small leaf, not the pack


class TestStrict:
    def test_mismatches_are_listed(self, ckptr: cc.Checkpointer, tmp_path) -> None:
        url = str(tmp_path / "s")
        ckptr.save(
            url,
            args=cc.args.StandardSave(
                {"a": np.zeros((4, 4), np.float32), "b": np.zeros(3, np.int32), "c": "x"}
            ),
        )
        bad = {
            "a": jax.ShapeDtypeStruct((4, 5), np.float32),
            "b": jax.ShapeDtypeStruct((3,), np.int64),
            "z": jax.ShapeDtypeStruct((1,), np.float32),
        }
        with pytest.raises(ValueError) as info:
            ckptr.restore(url, args=cc.args.StandardRestore(bad))
        message = str(info.value)
        assert "1 leaves missing from the checkpoint: ['z']" in message
        assert "1 shape mismatches: ['a']: target (4, 5) vs saved (4, 4)" in message
        assert "1 dtype mismatches: ['b']: target int64 vs saved int32" in message
        assert str(tmp_path / "s") in message

    def test_many_mismatches_are_counted(self, ckptr: cc.Checkpointer, tmp_path) -> None:
        url = str(tmp_path / "m")
        ckptr.save(url, args=cc.args.StandardSave({"a": 1.0}))
        with pytest.raises(ValueError, match=r"12 leaves missing .* and 7 more"):
            ckptr.restore(
                url, args=cc.args.StandardRestore({f"k{i}": np.zeros(1) for i in range(12)})
            )

    def test_non_strict_casts_and_skips_with_warning(
        self, ckptr: cc.Checkpointer, tmp_path
    ) -> None:
        url = str(tmp_path / "n")
        ckptr.save(url, args=cc.args.StandardSave({"a": np.arange(4, dtype=np.float32)}))
        target = {"a": jax.ShapeDtypeStruct((4,), np.float16), "new": np.full(2, 7.0)}
        with pytest.warns(
            UserWarning, match="1 target leaves not in the checkpoint.*1 leaves cast"
        ):
            out = ckptr.restore(url, args=cc.args.StandardRestore(target, strict=False))
        assert out["a"].dtype == np.float16 and out["a"].tolist() == [0, 1, 2, 3]
        np.testing.assert_array_equal(out["new"], np.full(2, 7.0))
        with pytest.raises(ValueError, match="shape mismatches"):
            ckptr.restore(url, args=cc.args.StandardRestore({"a": np.zeros(5)}, strict=False))


class TestCorruption:
    @pytest.mark.parametrize("kind", ["file", "s3", "gcs"])
    def test_flipped_bytes_are_detected_and_named(
        self, kind: str, request, tmp_path, ckptr
    ) -> None:
        store = make_store(kind, request, tmp_path)
        loop_ = request.getfixturevalue("loop")
        tree = {
            "big": put(np.arange(1 << 21, dtype=np.float32).reshape(2048, 1024), mesh(), "data"),
            "small": np.arange(10.0),
        }
        for step in ("chunk", "pack", "meta", "missing"):
            ckptr.save(store.url(step), args=cc.args.StandardSave(tree))
            objects = listing(store, loop_, step)
            victim = {
                "chunk": next(k for k in objects if "arrays/0/c/" in k),
                "pack": next(k for k in objects if "packs/" in k),
                "meta": "pytree.json",
                "missing": next(k for k in objects if "arrays/0/c/" in k),
            }[step]
            if step == "missing":
                loop_.run(store.backend.delete(store.path(step, victim)))
            else:
                data = bytearray(store.raw_get(store.path(step, victim)))
                data[len(data) // 2] ^= 0x10
                store.raw_put(store.path(step, victim), bytes(data))
            with pytest.raises(cc.CorruptCheckpointError) as info:
                ckptr.restore(store.url(step))
            where = victim.rsplit("/c/", 1)[0] if "arrays/" in victim else victim
            assert where in str(info.value), (step, str(info.value))


class TestLeafTypes:
    def test_every_dtype_and_degenerate_shapes(self, ckptr: cc.Checkpointer, tmp_path) -> None:
        names = [
            "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
            "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
            "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e4m3b11fnuz",
            "float8_e3m4", "float8_e4m3", "float8_e8m0fnu", "float4_e2m1fn", "int4", "uint4",
        ]  # fmt: skip
        rng = np.random.default_rng(1)
        tree = {}
        m = mesh()
        for name in names:
            dtype = jnp.dtype(name)
            raw = rng.integers(0, 4, (64, 32)).astype(np.float32)
            tree[name] = raw.astype(dtype)  # a host value, packed
            big = np.tile(raw, (16, 16)).astype(
                dtype
            )  # 1024x512: large enough for its own zarr array
            # 64-bit types stay host values: JAX truncates them unless x64 is enabled.
            tree[name + "_big"] = (
                big if dtype.itemsize == 8 or name == "complex128" else put(big, m, "data", "model")
            )
        tree["zero_d"] = jnp.asarray(3.5, jnp.float32)
        tree["zero_size"] = jnp.zeros((0, 5), jnp.int32)
        tree["np_zero_size"] = np.zeros((3, 0), np.float64)
        c = cc.Checkpointer(cc.StandardCheckpointHandler(pack_below_bytes=64 * 1024))
        with c:
            c.save(str(tmp_path / "d"), args=cc.args.StandardSave(tree))
            out = c.restore(str(tmp_path / "d"))
            meta = c.metadata(str(tmp_path / "d")).item_metadata
        for key, value in tree.items():
            assert out[key].dtype == value.dtype, key
            assert out[key].shape == value.shape, key
            assert np.asarray(out[key]).tobytes() == np.asarray(value).tobytes(), key
        assert meta["bfloat16_big"].dtype == jnp.dtype("bfloat16") and meta["zero_size"].shape == (
            0,
            5,
        )

    def test_zero_dimensional_leaves_restore_whatever_the_pack_threshold(self, tmp_path) -> None:
        """Scalars are packed even when the threshold would give them zarr arrays of their own.

        With ``pack_below_bytes=1`` an 8-byte scalar used to get zarr storage, which the
        reader refuses (zarr storage is for arrays with axes): a checkpoint that never restored.
        """
        tree = {
            "step": np.int64(7),
            "lr": jnp.asarray(0.5, jnp.float32),
            "flag": np.bool_(True),
            "w": np.arange(64, dtype=np.float32),
        }
        with cc.Checkpointer(cc.StandardCheckpointHandler(pack_below_bytes=1)) as c:
            c.save(str(tmp_path / "s"), args=cc.args.StandardSave(tree))
            out = c.restore(str(tmp_path / "s"))
        for key, value in tree.items():
            assert np.asarray(out[key]).tobytes() == np.asarray(value).tobytes(), key
            assert np.asarray(out[key]).dtype == np.asarray(value).dtype, key
        assert (tmp_path / "s").is_dir() and any((tmp_path / "s").rglob("arrays/*"))

    def test_unsupported_leaf_is_named_before_any_io(
        self, ckptr: cc.Checkpointer, tmp_path
    ) -> None:
        with pytest.raises(ValueError, match=r"leaf \['a'\]\['obj'\]: cannot save a object"):
            ckptr.save(str(tmp_path / "u"), args=cc.args.StandardSave({"a": {"obj": object()}}))
        assert not (tmp_path / "u").exists() and not list(tmp_path.iterdir())


class TestManyLeaves:
    def test_ten_thousand_small_leaves_make_few_objects(
        self, store: StoreUnderTest, ckptr, loop: LoopThread
    ) -> None:
        # Keep the object-store runs short; the packing rule is the same.
        n = 2000 if store.name in ("s3", "gcs") else 10_000
        tree = {f"layer_{i:05d}": np.full((64,), i, np.float32) for i in range(n)}
        ckptr.save(store.url("many"), args=cc.args.StandardSave(tree))
        objects = listing(store, loop, "many")
        assert len(objects) <= 10, sorted(objects)
        out = ckptr.restore(store.url("many"))
        assert len(out) == n and out[f"layer_{n - 1:05d}"][0] == n - 1


class TestMetadata:
    def test_metadata_reads_no_array_data(self, servers: LocalServers, ckptr) -> None:
        with FaultProxy(servers.s3.endpoint, fault_rate=0.0) as proxy:
            url = f"s3://{BUCKET}/{unique('meta')}"
            with cc.Checkpointer(
                cc.StandardCheckpointHandler(), storage_options={"endpoint_url": proxy.endpoint}
            ) as c:
                tree = train_state(mesh())
                c.save(url, args=cc.args.StandardSave(tree))
                proxy.stats.log.clear()
                meta = c.metadata(url).item_metadata
        gets = [p for m, p in proxy.stats.log if m == "GET"]
        assert not any("/arrays/" in p or "/packs/" in p for p in gets), gets
        kernel = meta["params"]["dense"]["kernel"]
        assert isinstance(kernel, cc.ArrayMetadata)
        assert kernel.shape == (512, 256) and kernel.dtype == np.float32
        assert kernel.sharding == {
            "type": "NamedSharding",
            "mesh": {"data": 4, "model": 2},
            "spec": ["data", "model"],
        }
        assert meta["name"] == "exp1" and meta["step"].kind == "py"


class TestLayout:
    @pytest.mark.parametrize(
        ("shape", "spec", "mesh_shape"),
        [
            ((512, 256), ("data", "model"), (4, 2)),
            ((10, 6), ("data", None), (2, 1)),
            ((8, 9), (None, None), (4, 2)),
            ((1000,), ("data",), (8,)),
        ],
    )
    def test_no_chunk_spans_two_shards(self, shape, spec, mesh_shape) -> None:
        names = ("data", "model")[: len(mesh_shape)]
        m = mesh(mesh_shape, names)
        sharding = NamedSharding(m, P(*spec[: len(shape)]))
        shards = layout.global_shards(shape, 4, sharding)
        for limit in (1 << 30, 4096, 64):
            chunk = layout.chunk_grid(shape, shards, 4, limit)
            assert math.prod(chunk) * 4 <= max(limit, 4)
            for shard in shards:
                for d, ((start, stop), c) in enumerate(zip(shard.index, chunk, strict=True)):
                    assert start % c == 0 and (stop % c == 0 or stop == shape[d])
        writers = {s.index: s.writer for s in shards}
        assert len(writers) == len(shards)


def test_prime_dimensions_do_not_explode_the_object_count() -> None:
    # 500 MiB replicated, 32003 rows (prime): split the other dimension, not rows into 1s.
    shards = layout.global_shards((32003, 4096), 4, None)
    assert layout.chunk_grid((32003, 4096), shards, 4, 256 << 20) == [32003, 2048]
    # A shard of 6553 (prime) rows: inner chunks stay near the 8 MiB target.
    assert layout.split_to_fit([6553, 512], 4, 8 << 20) == [6553, 256]
