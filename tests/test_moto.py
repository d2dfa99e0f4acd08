"""A second S3 implementation: moto's server runs the backend conformance suite and a smoke test.

SeaweedFS is the S3 of the default run; behaviour that only one server shows
is a property of that server, not of S3. moto (``moto[server]``) is started
by the harness on a free 127.0.0.1 port and stopped by PID, like the others.
The conformance class of tests/test_backends.py is collected here again with
its ``store`` fixture pointed at moto.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage.s3 import S3Backend
from cloudckpt.testing.servers import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, LocalServers, MotoS3

from .backend_harness import FAST_RETRY, StoreUnderTest, _fsspec_raw
from .helpers import BUCKET, unique
from .test_backends import TestConformance as _Conformance
from .test_cli import assert_same_tree, make_tree


@pytest.fixture(scope="module")
def moto(servers: LocalServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    # ``servers`` first: it sets the credential environment tensorstore reads.
    server = MotoS3(tmp_path_factory.mktemp("moto"), (BUCKET,))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _raw_client(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=endpoint,
        key=S3_ACCESS_KEY,
        secret=S3_SECRET_KEY,
        client_kwargs={"region_name": S3_REGION},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def _moto_store(moto: MotoS3) -> StoreUnderTest:
    backend = S3Backend(endpoint_url=moto.endpoint, retry=FAST_RETRY)
    get, put = _fsspec_raw(_raw_client(moto.endpoint))
    return StoreUnderTest("s3", backend, f"{BUCKET}/{unique('moto')}", get, put)


@pytest.fixture
def store(moto: MotoS3) -> StoreUnderTest:
    return _moto_store(moto)


class TestMotoConformance(_Conformance):
    """Every conformance test, against moto."""


def test_moto_save_restore_and_manager(moto: MotoS3, loop: LoopThread, tmp_path: Path) -> None:
    options = {"endpoint_url": moto.endpoint}
    root = f"s3://{BUCKET}/{unique('moto-run')}"
    tree = make_tree()
    with cc.CheckpointManager(
        root, options=cc.CheckpointManagerOptions(max_to_keep=2), storage_options=options
    ) as mngr:
        for step in (1, 2, 3):
            mngr.save(step, args=cc.args.Composite(state=cc.args.StandardSave(tree)))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 3]
    with cc.CheckpointManager(root, storage_options=options) as mngr:
        assert mngr.all_steps() == [2, 3]
        restored = mngr.restore(3)
    assert_same_tree(restored["state"], tree)
    raw = _raw_client(moto.endpoint)
    keys = raw.find(root.removeprefix("s3://"))
    assert keys and not any("/1/" in k for k in keys)
    assert np.asarray(restored["state"]["params"]["w"]).shape == (256, 32)
