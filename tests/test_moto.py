"""A second S3 implementation: moto's server runs the backend conformance suite and a smoke test.

SeaweedFS is the S3 of the default run; behaviour that only one server shows
is a property of that server, not of S3. moto (``moto[server]``) is started
by the harness on a free 127.0.0.1 port and stopped by PID, like the others.
The conformance suite (cloudckpt.testing.conformance) runs here with its
``store`` fixture pointed at moto.
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
from cloudckpt.testing.conformance import BackendTests, StoreUnderTest, raw_fsspec
from cloudckpt.testing.servers import LocalServers, MotoS3

from .backend_harness import FAST_RETRY
from .helpers import BUCKET, unique
from .test_cli import assert_same_tree, make_tree


@pytest.fixture(scope="module")
def moto(servers: LocalServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    # ``servers`` first: it sets the credential environment tensorstore reads.
    # The same credentials as the session's clients (moto accepts any).
    server = MotoS3(tmp_path_factory.mktemp("moto"), (BUCKET,), credentials=servers.s3.credentials)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _raw_client(moto: MotoS3) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=moto.endpoint,
        key=moto.credentials.access_key,
        secret=moto.credentials.secret_key,
        client_kwargs={"region_name": moto.credentials.region},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def _moto_store(moto: MotoS3) -> StoreUnderTest:
    backend = S3Backend(endpoint_url=moto.endpoint, retry=FAST_RETRY)
    get, put = raw_fsspec(_raw_client(moto))
    return StoreUnderTest("s3", backend, f"{BUCKET}/{unique('moto')}", get, put)


class TestMotoConformance(BackendTests):
    """Every conformance test, against moto."""

    kvstore_driver = "s3"

    @pytest.fixture
    def store(self, moto: MotoS3) -> StoreUnderTest:
        return _moto_store(moto)


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
    raw = _raw_client(moto)
    keys = raw.find(root.removeprefix("s3://"))
    assert keys and not any("/1/" in k for k in keys)
    assert np.asarray(restored["state"]["params"]["w"]).shape == (256, 32)
