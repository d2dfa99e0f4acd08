"""Session fixtures: real S3 (SeaweedFS) and GCS (fake-gcs-server) servers on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest

# Eight CPU devices per test process, before anything initialises JAX's backend.
jax.config.update("jax_num_cpu_devices", 8)

from cloudckpt.engine.loop import LoopThread
from cloudckpt.testing.servers import LocalServers, local_servers

from .helpers import BUCKET


@pytest.fixture(scope="session")
def servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServers]:
    """Both servers for the whole session, with the client environment applied."""
    workdir = tmp_path_factory.mktemp("servers")
    with local_servers(buckets=(BUCKET, "cloudckpt-other"), workdir=workdir) as srv:
        _STARTED.append(srv)
        saved = {k: os.environ.get(k) for k in srv.env}
        os.environ.update(srv.env)
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"\n[cloudckpt] {srv.describe()}")
        try:
            yield srv
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _STARTED.remove(srv)


#: The session's servers, once a test has asked for them.
_STARTED: list[LocalServers] = []


@pytest.fixture(autouse=True, scope="module")
def _empty_gcs_after_each_module() -> Iterator[None]:
    """Each test module finds the GCS buckets empty (FakeGCS.empty_buckets says why).

    Tests write under unique prefixes and read only their own, so nothing
    crosses modules; an emptied bucket only keeps listings as cheap as on GCS.
    """
    yield
    for srv in _STARTED:
        srv.gcs.empty_buckets()


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread("cloudckpt-tests")
    yield thread
    thread.close()


@pytest.fixture
def file_root(tmp_path: Path) -> str:
    return str(tmp_path / "ckpt")


@pytest.fixture(params=["inline", "threads"])
def placement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How scatters place the pieces handed over: at once (hosts of two cores or fewer,
    ``THREADS`` 0, as on CI) or by two placing threads (bigger hosts), both tested here.
    """
    from cloudckpt.handlers.pytree import scatter

    monkeypatch.setattr(scatter, "THREADS", 0 if request.param == "inline" else 2)
    return str(request.param)
