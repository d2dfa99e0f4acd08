"""Stragglers: requests that never answer, through a proxy in front of the real servers.

:class:`cloudckpt.testing.stallproxy.StallProxy` holds some requests forever with the
connection open, the way a wedged load balancer or a dead storage node does
on the real clouds (the emulators never stall). Each save and restore runs in
its own process (``tests/stall_worker.py``) because tensorstore reads its
stall bound once per process; the deadlines there are short (a 1 s floor) so
that stalls cost seconds. Nothing here asserts on wall-clock time: the
unstalled-vs-stalled times are measured by ``benchmarks/stragglers.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import pytest

from cloudckpt.storage.path import StoragePath
from cloudckpt.testing.servers import LocalServers
from cloudckpt.testing.stallproxy import StallProxy

from . import zygote
from .helpers import BUCKET, unique

ROOT = Path(__file__).resolve().parent.parent
FLOOR_S = 1.0


def worker_env(kind: str, endpoint: str) -> dict[str, str]:
    """The environment of a worker process whose every request of ``kind`` goes to ``endpoint``."""
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("TENSORSTORE_CURL_"):
            del env[name]  # the worker's own deadlines set them
    env["PYTHONPATH"] = str(ROOT)
    if kind == "s3":
        env["AWS_ENDPOINT_URL"] = endpoint
        env.pop("AWS_ENDPOINT_URL_S3", None)
    else:
        env["STORAGE_EMULATOR_HOST"] = endpoint
        env["TENSORSTORE_GCS_HTTP_URL"] = endpoint
    return env


def _run_worker(
    kind: str,
    servers: LocalServers,
    proxy: StallProxy,
    url: str,
    attempts: int = 10,
    floor_s: float = FLOOR_S,
    hedge_floor_s: float = FLOOR_S / 4,
) -> tuple[int, dict[str, object]]:
    env = worker_env(kind, proxy.endpoint)
    done = zygote.run(
        "tests.stall_worker",
        [url, str(floor_s), str(attempts), str(hedge_floor_s)],
        env=env,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"worker printed no result (rc {done.returncode}):\n{done.stderr[-3000:]}"
    return done.returncode, json.loads(lines[-1])


def _listed(url: str) -> set[str]:
    """What is in the bucket under ``url``, read straight from the server (not the proxy)."""
    root = StoragePath.from_url(url)

    async def run() -> set[str]:
        try:
            return {i.path[len(root.path) + 1 :] async for i in root.backend.list_prefix(root.path)}
        finally:
            await root.backend.aclose()

    return asyncio.run(run())


def _upstream(kind: str, servers: LocalServers) -> str:
    return servers.s3.endpoint if kind == "s3" else servers.gcs.endpoint


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_one_request_in_50_stalls_forever_and_save_and_restore_complete(
    kind: str, servers: LocalServers
) -> None:
    url = f"{'s3' if kind == 's3' else 'gs'}://{BUCKET}/{unique('stall')}"
    # Every 50th request of each method (PUT/POST, GET, ...) is held forever.
    counts: dict[str, int] = {}

    def one_in_50(method: str, path: str) -> bool:
        counts[method] = counts.get(method, 0) + 1
        return counts[method] % 50 == 25

    with StallProxy(_upstream(kind, servers), flavor=kind, stall=one_in_50) as proxy:
        rc, result = _run_worker(kind, servers, proxy, url)
    assert rc == 0, result
    assert result["equal"] is True
    methods = {method for method, _ in proxy.stats.stalled}
    # Both a write (tensorstore's chunk PUT/POST or the backend's) and a read were held.
    assert "GET" in methods and methods & {"PUT", "POST"}, proxy.stats.stalled
    listed = _listed(url)
    assert "_COMMITTED" in listed
    # Every array's chunks are there (the stalled writes were redone).
    # Format 2: under the attempt that wrote them (``@<attempt>/arrays/<i>/...``).
    arrays = (re.match(r"(?:@[^/]+/)?arrays/([0-9]+)/", name) for name in listed)
    assert {m.group(1) for m in arrays if m} == {str(i) for i in range(40)}, sorted(listed)
    print(
        f"\n[{kind}] requests={proxy.stats.requests} stalled={len(proxy.stats.stalled)} "
        f"save {result['save_s']:.1f}s restore {result['restore_s']:.1f}s"
    )


def _chunk_of(leaf: int, method: str) -> Callable[[str, str], bool]:
    def pick(m: str, path: str) -> bool:
        return m == method and f"/arrays/{leaf}/c" in unquote(path)

    return pick


@pytest.mark.parametrize(
    ("kind", "what", "stall", "names"),
    [
        ("s3", "write", _chunk_of(3, "PUT"), "arrays/3"),
        ("gcs", "write", _chunk_of(3, "POST"), "arrays/3"),
        ("s3", "read", _chunk_of(5, "GET"), "arrays/5"),
        ("gcs", "read", _chunk_of(5, "GET"), "arrays/5"),
        ("s3", "put", lambda m, p: m == "PUT" and p.endswith("/pytree.json"), "pytree.json"),
    ],
    ids=["s3-chunk-write", "gcs-chunk-write", "s3-chunk-read", "gcs-chunk-read", "s3-metadata"],
)
def test_an_object_that_always_stalls_fails_naming_it_and_the_process(
    kind: str, what: str, stall: Callable[[str, str], bool], names: str, servers: LocalServers
) -> None:
    url = f"{'s3' if kind == 's3' else 'gs'}://{BUCKET}/{unique('dead')}"
    with StallProxy(_upstream(kind, servers), flavor=kind, stall=stall) as proxy:
        rc, result = _run_worker(kind, servers, proxy, url, attempts=3)
    assert rc == 3, result
    assert result["error"] == "TimeoutError", result["message"]
    message = str(result["message"])
    print(f"\n[{kind} {what}] {message}")
    assert names in message and BUCKET in message, message
    assert "on process 0 stalled" in message, message
    assert what in message, message
    assert "X-Amz-Signature" not in message and "Authorization" not in message
    assert proxy.stats.stalled  # the requests were held, not refused
    if what != "read":  # a failed save is never a checkpoint
        assert "_COMMITTED" not in _listed(url)


def _first_get_of(marker: str) -> Callable[[str, str], bool]:
    """Holds the first GET whose path contains ``marker``; later ones (the hedge) pass."""
    held: list[str] = []

    def pick(method: str, path: str) -> bool:
        if method == "GET" and marker in unquote(path) and not held:
            held.append(path)
            return True
        return False

    return pick


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_stalled_chunk_read_is_answered_by_its_hedge(kind: str, servers: LocalServers) -> None:
    """One attempt only and a 60 s floor: without the hedge this restore would fail."""
    url = f"{'s3' if kind == 's3' else 'gs'}://{BUCKET}/{unique('hedge')}"
    with StallProxy(
        _upstream(kind, servers), flavor=kind, stall=_first_get_of("/arrays/7/c")
    ) as proxy:
        rc, result = _run_worker(
            kind, servers, proxy, url, attempts=1, floor_s=60, hedge_floor_s=0.2
        )
    assert rc == 0, result
    assert result["equal"] is True
    assert len(proxy.stats.stalled) == 1 and "/arrays/7/c" in unquote(proxy.stats.stalled[0][1])


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_stalled_small_get_is_answered_by_its_hedge(kind: str, servers: LocalServers) -> None:
    """The backends' own reads: one attempt, a 60 s deadline, and the first GET held forever."""
    from cloudckpt.storage import Deadlines, RetryPolicy
    from cloudckpt.storage.gcs import GCSBackend
    from cloudckpt.storage.s3 import S3Backend

    key = f"{BUCKET}/{unique('hedge')}/meta.json"
    payload = b'{"step": 14}'
    deadlines = Deadlines(floor_s=60, hedge_floor_s=0.2)
    once = RetryPolicy(max_attempts=1)
    with StallProxy(
        _upstream(kind, servers), flavor=kind, stall=_first_get_of("meta.json")
    ) as proxy:
        backend = (
            S3Backend(endpoint_url=proxy.endpoint, retry=once, deadlines=deadlines)
            if kind == "s3"
            else GCSBackend(endpoint_url=proxy.endpoint, retry=once, deadlines=deadlines)
        )

        async def run() -> bytes | None:
            try:
                await backend.put(key, payload)
                return await backend.get(key)
            finally:
                await backend.aclose()

        got = asyncio.run(run())
    assert got == payload
    assert len(proxy.stats.stalled) == 1
    assert backend.stats.total_retries() == 0  # the hedge answered, not a retry
