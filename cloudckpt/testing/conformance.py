"""The storage-backend conformance suite: subclass it to test a backend (as zarr's ``StoreTests``).

Every backend cloudckpt ships passes it unchanged (memory, file, S3 against
SeaweedFS and moto, GCS against fake-gcs-server); a third-party backend
registered with :func:`cloudckpt.storage.register_backend` should too::

    import pytest
    from cloudckpt.testing.conformance import BackendTests, StoreUnderTest

    class TestMyBackend(BackendTests):
        kvstore_driver = "my_driver"

        @pytest.fixture
        def store(self, tmp_path) -> StoreUnderTest:
            backend = MyBackend(endpoint_url=...)
            return StoreUnderTest("mine", backend, root=f"bucket/{uuid.uuid4().hex}",
                                  raw_get=..., raw_put=...)

The ``raw_get``/``raw_put`` hooks read and write *around* the backend under
test (plain files, a separate client, the store's own API), so the suite
checks what really landed in storage instead of trusting the backend to
report on itself. :func:`raw_file`, :func:`raw_memory` and :func:`raw_fsspec`
build them for the usual cases.

Needs pytest (the ``test`` extra). Each test runs the backend on an event
loop of its own thread (``loop``), as a checkpointer does, and closes the
backend's clients on it afterwards.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import tensorstore as ts

import atomicity
from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage import Backend

RawGet = Callable[[str], "bytes | None"]
RawPut = Callable[[str, bytes], None]


@dataclass
class StoreUnderTest:
    """A backend, a fresh empty directory in it, and access that bypasses it.

    Attributes:
        name: A short label for reports (``"s3"``, ``"file"``).
        backend: The backend under test.
        root: Backend-local path of a fresh, empty directory.
        raw_get: Reads an object without the backend; None when missing.
        raw_put: Writes an object without the backend.
    """

    name: str
    backend: Backend
    root: str
    raw_get: RawGet
    raw_put: RawPut

    def url(self, *parts: str) -> str:
        """The URL of ``root/parts...``."""
        return self.backend.url("/".join((self.root, *parts)))

    def path(self, *parts: str) -> str:
        """The backend-local path of ``root/parts...``."""
        return "/".join((self.root, *parts))


def raw_file() -> tuple[RawGet, RawPut]:
    """Raw hooks for a file-system backend: plain ``open``."""

    def get(path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    return get, put


def raw_memory(backend: Backend) -> tuple[RawGet, RawPut]:
    """Raw hooks for the memory backend: tensorstore's memory store in its context."""
    kv = ts.KvStore.open({"driver": "memory"}, context=backend.tensorstore_context()).result()

    def get(path: str) -> bytes | None:
        result = kv.read(path).result()
        return None if result.state == "missing" else bytes(result.value)

    def put(path: str, data: bytes) -> None:
        kv.write(path, data).result()

    return get, put


def raw_fsspec(fs: Any) -> tuple[RawGet, RawPut]:
    """Raw hooks through a separate, synchronous fsspec filesystem (s3fs, gcsfs, ...)."""

    def get(path: str) -> bytes | None:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    def put(path: str, data: bytes) -> None:
        fs.pipe_file(path, data)

    return get, put


async def _collect(store: StoreUnderTest, prefix: str) -> dict[str, int]:
    return {info.path: info.size async for info in store.backend.list_prefix(prefix)}


class BackendTests:
    """Tests every backend must pass; a subclass supplies ``store`` and ``kvstore_driver``.

    * ``store``: a pytest fixture returning a :class:`StoreUnderTest` whose
      ``root`` is fresh and empty for each test (the tests write under it and
      leave what they wrote).
    * ``kvstore_driver``: the tensorstore driver ``kvstore_spec`` names.
    * ``atomic_rename``: True only for a backend that renames directories
      atomically; the suite then expects the atomic-rename strategy.
    * ``large_object_bytes``: lower it for a store with a small object limit.

    Each test runs the backend's coroutines on ``loop`` (one
    :class:`~cloudckpt.engine.loop.LoopThread` per test class) and afterwards
    closes the backend's clients on it (``Backend.aclose``).
    """

    #: Whether the backend renames directories atomically (only a file system does).
    atomic_rename: ClassVar[bool] = False
    #: The tensorstore kvstore driver ``kvstore_spec`` names.
    kvstore_driver: ClassVar[str]
    #: Size of the object ``test_large_object`` writes (a multipart upload on S3).
    large_object_bytes: ClassVar[int] = 12 << 20

    @pytest.fixture
    def store(self) -> StoreUnderTest:
        """A fresh :class:`StoreUnderTest`; override it in the subclass."""
        raise NotImplementedError(f"{type(self).__name__} must define a `store` fixture")

    @pytest.fixture(scope="class")
    @classmethod
    def loop(cls) -> Iterator[LoopThread]:
        """The event loop the tests run the backend on."""
        with LoopThread("cloudckpt-conformance") as thread:
            yield thread

    @pytest.fixture(autouse=True)
    def _close_clients(self, store: StoreUnderTest, loop: LoopThread) -> Iterator[None]:
        yield
        loop.run(store.backend.aclose())

    # --------------------------------------------------------------------- reads
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

    # -------------------------------------------------------------------- writes
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
            try:
                futures = [
                    lp.submit(store.backend.put_if_absent(key, f"{i}".encode()))
                    for i, lp in enumerate([loop, other, loop, other])
                ]
                results = [f.result(60) for f in futures]
            finally:
                other.run(store.backend.aclose())
        assert sum(results) == 1

    # ------------------------------------------------------------ metadata, lists
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
        # Read as an object, it is a missing one (a restore reads its marker this way).
        assert loop.run(store.backend.get(store.path("dir"))) is None
        assert loop.run(store.backend.get(store.path("dir"), (0, 1))) is None

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

    # ------------------------------------------------------------------ deletes
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
        data = os.urandom(self.large_object_bytes)
        mid = self.large_object_bytes * 5 // 12
        loop.run(store.backend.put(store.path("big"), data))
        assert loop.run(store.backend.get(store.path("big"))) == data
        assert loop.run(store.backend.get(store.path("big"), (mid, mid + 7))) == data[mid : mid + 7]

    # -------------------------------------------------------- tensorstore, strategy
    def test_kvstore_spec_addresses_the_same_place(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        spec = store.backend.kvstore_spec(store.path("arr"))
        assert spec["driver"] == self.kvstore_driver
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
        assert store.backend.supports_atomic_rename is self.atomic_rename
        expected = atomicity.AtomicRenamePath if self.atomic_rename else atomicity.CommitMarkerPath
        assert store.backend.default_temporary_path_class() is expected
