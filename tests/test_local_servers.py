"""The harness's servers stop for good: no process and no listening port outlive ``local_servers``.

SeaweedFS does not finish its own graceful stop (its filer's gRPC server waits
on streams its other components hold), so the harness kills it a second after
SIGTERM; fake-gcs-server exits on SIGTERM. Either way nothing may be left to
hold the ports or the data directory.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

from cloudckpt.testing.servers import local_servers


def _answers(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((parts.hostname, parts.port)) == 0


def test_stopped_servers_leave_no_process_and_no_port(tmp_path: Path) -> None:
    with local_servers(buckets=("stop-test",), workdir=tmp_path) as srv:
        procs = [srv.s3._proc.proc, srv.gcs._proc.proc]  # type: ignore[union-attr]
        endpoints = [srv.s3.endpoint, srv.gcs.endpoint]
        assert all(_answers(e) for e in endpoints)
        assert all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs), [p.returncode for p in procs]
    assert not any(_answers(e) for e in endpoints), endpoints
