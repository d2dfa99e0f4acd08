"""One conformance suite, run unchanged against memory, file, S3 and GCS backends."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import tensorstore as ts

import atomicity
from cloudckpt import storage as backends
from cloudckpt.engine.loop import LoopThread

from .backend_harness import ALL_KINDS, OBJECT_KINDS, StoreUnderTest, make_store


@pytest.fixture(params=ALL_KINDS)
def store(request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


@pytest.fixture(params=OBJECT_KINDS)
def object_store(request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


async def _collect(store: StoreUnderTest, prefix: str) -> dict[str, int]:
    return {info.path: info.size async for info in store.backend.list_prefix(prefix)}


class TestConformance:
    def test_get_missing_is_none(self, store: StoreUnderTest, loop: LoopThread) -> None:
        assert loop.run(store.backend.get(store.path("missing"))) is None

    def test_put_then_get_round_trips(self, store: StoreUnderTest, loop: LoopThread) -> None:
        data = os.urandom(1000)
        loop.run(store.backend.put(store.path("a", "b"), data))
        assert loop.run(store.backend.get(store.path("a", "b"))) == data
        assert store.raw_get(store.path("a", "b")) == data

    def test_get_reads_what_was_written_around_it(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        store.raw_put(store.path("raw"), b"written around the backend")
        assert loop.run(store.backend.get(store.path("raw"))) == b"written around the backend"

    def test_byte_ranges(self, store: StoreUnderTest, loop: LoopThread) -> None:
        data = bytes(range(256)) * 4
        loop.run(store.backend.put(store.path("r"), data))
        assert loop.run(store.backend.get(store.path("r"), (10, 20))) == data[10:20]
        assert loop.run(store.backend.get(store.path("r"), (1000, 1024))) == data[1000:]
        assert loop.run(store.backend.get(store.path("r"), (5, 5))) == b""
        with pytest.raises(ValueError, match="invalid byte range"):
            loop.run(store.backend.get(store.path("r"), (5, 2)))

    def test_put_overwrites(self, store: StoreUnderTest, loop: LoopThread) -> None:
        loop.run(store.backend.put(store.path("o"), b"one"))
        loop.run(store.backend.put(store.path("o"), b"two"))
        assert store.raw_get(store.path("o")) == b"two"

    def test_put_if_absent_creates_once(self, store: StoreUnderTest, loop: LoopThread) -> None:
        key = store.path("c")
        assert loop.run(store.backend.put_if_absent(key, b"first")) is True
        assert loop.run(store.backend.put_if_absent(key, b"second")) is False
        assert store.raw_get(key) == b"first"

    def test_put_if_absent_loses_to_object_written_around_it(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        store.raw_put(store.path("taken"), b"someone else")
        assert loop.run(store.backend.put_if_absent(store.path("taken"), b"mine")) is False
        assert store.raw_get(store.path("taken")) == b"someone else"

    def test_concurrent_creates_exactly_one_wins(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        key = store.path("race")
        payloads = [f"writer-{i}".encode() for i in range(8)]

        async def race() -> list[bool]:
            return list(
                await asyncio.gather(*(store.backend.put_if_absent(key, p) for p in payloads))
            )

        results = loop.run(race())
        assert sum(results) == 1
        assert store.raw_get(key) == payloads[results.index(True)]

    def test_concurrent_creates_from_two_event_loops(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        # Two checkpointers in one process each own a loop; the race must still have one winner.
        key = store.path("race2")
        with LoopThread("other") as other:
            futures = [
                lp.submit(store.backend.put_if_absent(key, f"{i}".encode()))
                for i, lp in enumerate([loop, other, loop, other])
            ]
            results = [f.result(60) for f in futures]
        assert sum(results) == 1

    def test_exists_and_stat(self, store: StoreUnderTest, loop: LoopThread) -> None:
        loop.run(store.backend.put(store.path("s"), b"12345"))
        assert loop.run(store.backend.exists(store.path("s"))) is True
        assert loop.run(store.backend.exists(store.path("nope"))) is False
        info = loop.run(store.backend.stat(store.path("s")))
        assert info.size == 5 and info.path == store.path("s")
        assert info.mtime is not None
        assert loop.run(store.backend.size(store.path("s"))) == 5
        with pytest.raises(FileNotFoundError):
            loop.run(store.backend.stat(store.path("nope")))

    def test_a_directory_is_not_an_object(self, store: StoreUnderTest, loop: LoopThread) -> None:
        loop.run(store.backend.put(store.path("dir", "leaf"), b"x"))
        assert loop.run(store.backend.exists(store.path("dir"))) is False

    def test_list_prefix_is_recursive_and_exact(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        for key, data in {
            "p/a": b"1",
            "p/b/c": b"22",
            "p/b/d/e": b"333",
            "pq/x": b"4",
            "p2": b"5",
        }.items():
            loop.run(store.backend.put(store.path(key), data))
        listed = loop.run(_collect(store, store.path("p")))
        assert listed == {store.path("p/a"): 1, store.path("p/b/c"): 2, store.path("p/b/d/e"): 3}
        assert loop.run(_collect(store, store.path("nothing-here"))) == {}

    def test_delete(self, store: StoreUnderTest, loop: LoopThread) -> None:
        loop.run(store.backend.put(store.path("d"), b"x"))
        loop.run(store.backend.delete(store.path("d")))
        assert store.raw_get(store.path("d")) is None
        loop.run(store.backend.delete(store.path("d")))  # missing: no error

    def test_delete_many_and_prefix(self, store: StoreUnderTest, loop: LoopThread) -> None:
        keys = [f"q/{i}" for i in range(5)] + ["q/sub/x", "qq/keep"]
        for key in keys:
            loop.run(store.backend.put(store.path(key), b"x"))
        loop.run(store.backend.delete_many([store.path("q/0"), store.path("q/1")]))
        assert store.raw_get(store.path("q/0")) is None and store.raw_get(store.path("q/2")) == b"x"
        loop.run(store.backend.delete_prefix(store.path("q")))
        assert loop.run(_collect(store, store.path("q"))) == {}
        assert store.raw_get(store.path("qq/keep")) == b"x"

    def test_large_object(self, store: StoreUnderTest, loop: LoopThread) -> None:
        data = os.urandom(12 << 20)
        loop.run(store.backend.put(store.path("big"), data))
        assert loop.run(store.backend.get(store.path("big"))) == data
        assert (
            loop.run(store.backend.get(store.path("big"), (5 << 20, (5 << 20) + 7)))
            == data[5 << 20 : (5 << 20) + 7]
        )

    def test_kvstore_spec_addresses_the_same_place(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        spec = store.backend.kvstore_spec(store.path("arr"))
        assert (
            spec["driver"]
            == {"memory": "memory", "file": "file", "s3": "s3", "gcs": "gcs"}[store.name]
        )
        array = ts.open(
            {
                "driver": "zarr3",
                "kvstore": spec,
                "metadata": {
                    "shape": [4, 4],
                    "data_type": "int32",
                    "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
                },
                "create": True,
            },
            context=store.backend.tensorstore_context(),
        ).result()
        array.write(np.arange(16, dtype=np.int32).reshape(4, 4)).result()
        listed = loop.run(_collect(store, store.path("arr")))
        assert store.path("arr", "zarr.json") in listed
        loop.run(store.backend.put(store.path("arr", "extra"), b"seen by tensorstore"))
        kv = ts.KvStore.open(spec, context=store.backend.tensorstore_context()).result()
        assert kv.read("extra").result().value == b"seen by tensorstore"

    def test_default_strategy_follows_capability(self, store: StoreUnderTest) -> None:
        expected = (
            atomicity.AtomicRenamePath if store.name == "file" else atomicity.CommitMarkerPath
        )
        assert store.backend.default_temporary_path_class() is expected
        assert store.backend.supports_atomic_rename is (store.name == "file")


class TestObjectStoreErrors:
    def test_missing_bucket_is_named(self, object_store: StoreUnderTest, loop: LoopThread) -> None:
        backend = object_store.backend
        with pytest.raises(FileNotFoundError, match="no-such-bucket-cc"):
            loop.run(backend.get("no-such-bucket-cc/key"))
        with pytest.raises(FileNotFoundError, match="no-such-bucket-cc"):
            loop.run(backend.put("no-such-bucket-cc/key", b"x"))
        with pytest.raises(FileNotFoundError, match="no-such-bucket-cc"):
            loop.run(backend.put_if_absent("no-such-bucket-cc/key", b"x"))

    def test_s3_bad_credentials_give_permission_error_without_secret(
        self,
        request: pytest.FixtureRequest,
        tmp_path,
        loop: LoopThread,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        make_store("s3", request, tmp_path)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
        backend = backends.get_backend("s3", request_timeout_s=30.0)  # a fresh instance
        with pytest.raises(PermissionError) as info:
            loop.run(backend.put("cloudckpt-test/denied", b"x"))
        message = str(info.value)
        assert "cloudckpt-test" in message and "definitely-wrong-secret" not in message
        assert "access key id" in message
        loop.run(backend.aclose())

    def test_explicit_endpoint_overrides_environment(
        self, request: pytest.FixtureRequest, tmp_path
    ) -> None:
        make_store("s3", request, tmp_path)
        backend = backends.get_backend("s3", endpoint_url="http://127.0.0.1:1")
        assert backend.kvstore_spec("b/k")["endpoint"] == "http://127.0.0.1:1"
        env_backend = backends.get_backend("s3")
        assert env_backend.kvstore_spec("b/k")["endpoint"] == os.environ["AWS_ENDPOINT_URL"]


class TestFileRename:
    def test_rename_is_atomic_and_refuses_existing(self, tmp_path, loop: LoopThread) -> None:
        backend = backends.get_backend("file")
        src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
        loop.run(backend.put(src + "/x", b"1"))
        loop.run(backend.rename(src, dst))
        assert (tmp_path / "dst" / "x").read_bytes() == b"1" and not (tmp_path / "src").exists()
        loop.run(backend.put(src + "/y", b"2"))
        with pytest.raises(FileExistsError):
            loop.run(backend.rename(src, dst))
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileExistsError):
            loop.run(backend.rename(src, str(tmp_path / "empty")))


class TestRegistry:
    def test_schemes(self, tmp_path) -> None:
        assert backends.split_url("s3://b/run/1") == ("s3", "b/run/1")
        assert backends.split_url("gs://b/run/") == ("gs", "b/run")
        assert backends.split_url("gcs://b/x") == ("gs", "b/x")
        assert backends.split_url(f"file://{tmp_path}/x") == ("file", f"{tmp_path}/x")
        assert backends.split_url("rel/dir")[1] == os.path.abspath("rel/dir")
        assert backends.split_url(tmp_path / "p") == ("file", str(tmp_path / "p"))
        assert backends.resolve("memory://m/x")[0].scheme == "memory"

    def test_unknown_scheme_names_supported_ones(self) -> None:
        with pytest.raises(ValueError, match=r"unsupported storage scheme 'ftp'.*gs://.*s3://"):
            backends.split_url("ftp://host/x")

    def test_missing_bucket_in_url(self) -> None:
        with pytest.raises(ValueError, match="names no bucket"):
            backends.split_url("s3:///x")
