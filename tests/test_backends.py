"""The backend conformance suite (cloudckpt.testing.conformance), run against memory, file, S3 and GCS."""

from __future__ import annotations

import os

import pytest

from cloudckpt import storage as backends
from cloudckpt.engine.loop import LoopThread
from cloudckpt.testing.conformance import BackendTests, StoreUnderTest

from .backend_harness import OBJECT_KINDS, make_store


@pytest.fixture(params=OBJECT_KINDS)
def object_store(request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


class TestMemoryBackend(BackendTests):
    kvstore_driver = "memory"

    @pytest.fixture
    def store(self, request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
        return make_store("memory", request, tmp_path)


class TestFileBackend(BackendTests):
    kvstore_driver = "file"
    atomic_rename = True

    @pytest.fixture
    def store(self, request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
        return make_store("file", request, tmp_path)


class TestS3Backend(BackendTests):
    """Against SeaweedFS (tests/test_moto.py runs the suite against moto too)."""

    kvstore_driver = "s3"

    @pytest.fixture
    def store(self, request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
        return make_store("s3", request, tmp_path)


class TestGCSBackend(BackendTests):
    """Against fake-gcs-server."""

    kvstore_driver = "gcs"

    @pytest.fixture
    def store(self, request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
        return make_store("gcs", request, tmp_path)


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
