"""The storage layer's public seams: registering a backend, owned backends, read-only, bucket settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import cloudckpt as cc
from cloudckpt import storage
from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage.memory import MemoryBackend
from cloudckpt.testing.conformance import BackendTests, StoreUnderTest, raw_memory

from .backend_harness import make_store
from .helpers import BUCKET, unique


class ThirdPartyBackend(MemoryBackend):
    """A backend from outside cloudckpt: the memory store under a scheme of its own."""

    scheme = "ccthird"


storage.register_backend("ccthird", ThirdPartyBackend)
storage.register_backend(
    "ccbylazy", "tests.test_storage_seams:LazyBackend", install_hint="pip install lazy"
)
storage.register_backend(
    "ccmissing", "cc_no_such_package.backend:Backend", install_hint="pip install cc-missing"
)


class LazyBackend(MemoryBackend):
    scheme = "ccbylazy"


class TestThirdPartyConformance(BackendTests):
    """The public suite, run as a third party would run it against its own backend."""

    kvstore_driver = "memory"

    @pytest.fixture
    def store(self) -> StoreUnderTest:
        backend, root = storage.resolve(f"ccthird://{unique('third')}")
        get, put = raw_memory(backend)
        return StoreUnderTest("ccthird", backend, root, get, put)


def test_a_registered_backend_saves_and_restores_through_the_manager() -> None:
    url = f"ccthird://{unique('run')}"
    tree = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": np.int32(7)}
    with cc.CheckpointManager(url) as mngr:
        assert isinstance(mngr.directory.backend, ThirdPartyBackend)
        mngr.save(1, args=cc.args.Composite(state=cc.args.StandardSave(tree)))
        mngr.wait_until_finished()
    with cc.CheckpointManager(url) as mngr:
        assert mngr.all_steps() == [1]
        restored = mngr.restore(1)["state"]
    np.testing.assert_array_equal(restored["w"], tree["w"])
    assert mngr.directory.url.startswith("ccthird://")


def test_an_import_path_is_imported_on_first_use() -> None:
    assert storage.backend_class("ccbylazy") is LazyBackend
    assert "ccbylazy" in storage.supported_schemes()


def test_a_missing_backend_package_names_what_to_install() -> None:
    with pytest.raises(ImportError, match=r"ccmissing:// needs .*pip install cc-missing"):
        storage.resolve("ccmissing://bucket/run")


def test_registration_refuses_what_cannot_be_a_backend() -> None:
    with pytest.raises(TypeError, match="Backend subclass"):
        storage.register_backend("ccbad", dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module:ClassName"):
        storage.register_backend("ccbad", "just.a.module")
    with pytest.raises(ValueError, match="invalid scheme"):
        storage.register_backend("s3://", ThirdPartyBackend)
    with pytest.raises(ValueError, match="unsupported storage scheme 'ccbad'"):
        storage.resolve("ccbad://b/x")
    with pytest.raises(ValueError, match="alias of 'gs'; register that scheme"):
        storage.register_backend("GCS", ThirdPartyBackend)  # gcs:// would never reach it
    assert storage.backend_class("gs").__name__ == "GCSBackend"


def test_checkpointers_never_share_a_backend_or_its_statistics(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = make_store("s3", request, tmp_path)
    url = store.url("shared")
    with (
        cc.Checkpointer(cc.StandardCheckpointHandler()) as a,
        cc.Checkpointer(cc.StandardCheckpointHandler()) as b,
    ):
        backend_a, backend_b = a.location(url).backend, b.location(url).backend
        assert backend_a is not backend_b
        assert a.location(store.url("other")).backend is backend_a  # one per owner
        a.save(url, args=cc.args.StandardSave({"x": np.ones(4, np.float32)}))
        assert sum(backend_a.stats.calls.values()) > 0
        assert sum(backend_b.stats.calls.values()) == 0
        np.testing.assert_array_equal(b.restore(url)["x"], np.ones(4, np.float32))
    assert storage.resolve(url)[0] is not storage.resolve(url)[0]


def test_a_read_only_backend_refuses_a_save_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    tree = {"x": np.arange(6, dtype=np.int64)}
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as writer:
        writer.save(root / "1", args=cc.args.StandardSave(tree))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    read_only = {"read_only": True}
    with cc.Checkpointer(cc.StandardCheckpointHandler(), storage_options=read_only) as reader:
        assert reader.location(root).backend.supports_writes is False
        np.testing.assert_array_equal(reader.restore(root / "1")["x"], tree["x"])
        with pytest.raises(PermissionError, match=r"read-only .*read_only=True"):
            reader.save(root / "2", args=cc.args.StandardSave(tree))
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_read_only_refuses_every_write_before_a_request(loop: LoopThread) -> None:
    backend = MemoryBackend(read_only=True)
    path = f"{unique('ro')}/key"
    for attempt in (
        backend.put(path, b"x"),
        backend.put_if_absent(path, b"x"),
        backend.put_versioned(path, b"x", if_version=None),
        backend.delete(path),
        backend.delete_many([path]),
        backend.delete_prefix(path),
    ):
        with pytest.raises(PermissionError, match=f"memory://{path}"):
            loop.run(attempt)
    assert backend.stats.calls == {}  # refused before any request
    assert loop.run(backend.get(path)) is None


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_bucket_settings_reads_the_bucket_or_says_why_not(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, loop: LoopThread
) -> None:
    store = make_store(kind, request, tmp_path)
    settings = loop.run(store.backend.bucket_settings(store.path("run")))
    assert settings is not None and settings.bucket == BUCKET
    expected = {"s3": {"lifecycle", "versioning", "location"}, "gcs": {"metadata"}}[kind]
    assert set(settings.values) | set(settings.errors) == expected
    assert not set(settings.values) & set(settings.errors)
    if kind == "gcs":
        assert settings.values["metadata"]["name"] == BUCKET
    else:
        assert isinstance(settings.values["lifecycle"], list)  # [] when none is set


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_stores_without_buckets_have_no_bucket_settings(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, loop: LoopThread
) -> None:
    store = make_store(kind, request, tmp_path)
    assert loop.run(store.backend.bucket_settings(store.root)) is None


def test_importing_cloudckpt_does_not_import_the_testing_package() -> None:
    import subprocess
    import sys

    script = (
        "import sys, cloudckpt\n"
        "print(sorted(m for m in sys.modules if m.startswith('cloudckpt.testing')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
