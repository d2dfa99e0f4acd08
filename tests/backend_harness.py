"""Per-backend test fixtures: the backend under test, a fresh root, and raw access.

The raw hooks read and write around the backend under test (plain files, a
fresh s3fs/gcsfs client, tensorstore's memory store) so that tests check
what really landed in storage rather than trusting the backend to report on
itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import tensorstore as ts

from cloudckpt import storage as backends
from cloudckpt.storage import Backend
from cloudckpt.storage.retry import RetryPolicy

from .helpers import BUCKET, unique

FAST_RETRY = RetryPolicy(max_attempts=8, initial_backoff_s=0.01, max_backoff_s=0.2, max_total_s=30)


@dataclass
class StoreUnderTest:
    name: str
    backend: Backend
    root: str  # backend-local path of a fresh, empty directory
    raw_get: Callable[[str], bytes | None]
    raw_put: Callable[[str, bytes], None]

    def url(self, *parts: str) -> str:
        return self.backend.url("/".join((self.root, *parts)))

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))


def _s3fs_client() -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        key=os.environ["AWS_ACCESS_KEY_ID"],
        secret=os.environ["AWS_SECRET_ACCESS_KEY"],
        client_kwargs={"region_name": os.environ["AWS_REGION"]},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def _gcsfs_client() -> Any:
    import gcsfs

    return gcsfs.GCSFileSystem(
        endpoint_url=os.environ["STORAGE_EMULATOR_HOST"],
        token="anon",
        skip_instance_cache=True,
    )


def _fsspec_raw(fs: Any) -> tuple[Callable[[str], bytes | None], Callable[[str, bytes], None]]:
    def get(path: str) -> bytes | None:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    def put(path: str, data: bytes) -> None:
        fs.pipe_file(path, data)

    return get, put


def _file_raw() -> tuple[Callable[[str], bytes | None], Callable[[str, bytes], None]]:
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


def _memory_raw(
    backend: Backend,
) -> tuple[Callable[[str], bytes | None], Callable[[str, bytes], None]]:
    kv = ts.KvStore.open({"driver": "memory"}, context=backend.tensorstore_context()).result()

    def get(path: str) -> bytes | None:
        result = kv.read(path).result()
        return None if result.state == "missing" else bytes(result.value)

    def put(path: str, data: bytes) -> None:
        kv.write(path, data).result()

    return get, put


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> StoreUnderTest:
    """Builds the store under test; object stores pull in the ``servers`` fixture."""
    if kind == "memory":
        backend = backends.get_backend("memory")
        get, put = _memory_raw(backend)
        return StoreUnderTest(kind, backend, unique("mem"), get, put)
    if kind == "file":
        backend = backends.get_backend("file")
        get, put = _file_raw()
        return StoreUnderTest(kind, backend, str(tmp_path / unique("root")), get, put)
    request.getfixturevalue("servers")
    if kind == "s3":
        backend = backends.get_backend("s3", retry=FAST_RETRY)
        get, put = _fsspec_raw(_s3fs_client())
    elif kind == "gcs":
        backend = backends.get_backend("gs", retry=FAST_RETRY)
        get, put = _fsspec_raw(_gcsfs_client())
    else:
        raise ValueError(kind)
    return StoreUnderTest(kind, backend, f"{BUCKET}/{unique('root')}", get, put)


ALL_KINDS = ["memory", "file", "s3", "gcs"]
OBJECT_KINDS = ["s3", "gcs"]
