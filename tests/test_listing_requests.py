"""Discovering steps costs requests per step, never per object (issue 14).

``CheckpointManager.all_steps``/``latest_step`` (its reload), ``cloudckpt ls``
and clean-up's scan list a root with one delimiter listing (S3
``Delimiter=/``, GCS ``delimiter=/``, one ``scandir`` on a file system) and
check each child's ``_COMMITTED`` (and ``_CLAIM``) by exact key. The tests
count the requests these make on a root of committed steps (plus one live
uncommitted save), then add objects under every step and count again: the
counts must not change. On S3 and GCS every HTTP request is counted by a
:class:`~cloudckpt.testing.cloudproxy.CloudProxy` in front of the real server, which
also cuts listings into pages of two (as the clouds cut them at 1,000), so
the delimiter listing must follow its continuation tokens. On the file
system a request is a backend call or a directory read (``os.scandir`` and
``os.listdir``, counted by an audit hook). A recursive listing
(``sizes=True``) is counted as well, to show the counter sees objects.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import atomicity
import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage import get_backend, split_url
from cloudckpt.storage.base import Backend
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.storage.path import StoragePath
from cloudckpt.testing.cloudproxy import CloudProxy
from cloudckpt.testing.servers import LocalServers
from cloudckpt.tools import inspect as _inspect

from .backend_harness import FAST_RETRY
from .helpers import BUCKET, unique

STATIC = Deadlines(hedge=False, cut_min_s=60)

STEPS = (1, 2, 3, 4)
LIVE_STEP = 5  # claimed by this (live) process, never committed
PAGE = 2  # keys per listing page through the proxy


_DIRECTORY_READS = [0]


def _count_directory_reads(event: str, args: tuple[Any, ...]) -> None:
    if event in ("os.scandir", "os.listdir"):
        _DIRECTORY_READS[0] += 1


@contextmanager
def _counted(
    kind: str, servers: LocalServers | None, tmp_path: Path
) -> Iterator[tuple[str, dict[str, Any], Backend, Callable[[], int]]]:
    """(root URL, storage options, backend, request counter) for ``kind``."""
    if kind == "file":
        if not _DIRECTORY_READS[1:]:  # an audit hook cannot be removed: install it once
            sys.addaudithook(_count_directory_reads)
            _DIRECTORY_READS.append(1)
        backend = get_backend("file")
        yield (
            str(tmp_path / unique("root")),
            {},
            backend,
            lambda: backend.stats.total_calls() + _DIRECTORY_READS[0],
        )
        return
    assert servers is not None
    upstream = servers.s3.endpoint if kind == "s3" else servers.gcs.endpoint
    with CloudProxy(upstream, flavor=kind, page_size=PAGE) as proxy:
        # Counts of requests, so none is hedged or cut and resent: on a loaded
        # machine the adaptive bounds once added 4 to a clean-up scan of GCS.
        options = {"endpoint_url": proxy.endpoint, "retry": FAST_RETRY, "deadlines": STATIC}
        backend = get_backend("s3" if kind == "s3" else "gs", **options)
        scheme = "s3" if kind == "s3" else "gs"
        yield (
            f"{scheme}://{BUCKET}/{unique('listing')}",
            options,
            backend,
            lambda: proxy.stats.requests,
        )


async def _fill(backend: Backend, root: str, live: str, per_step: int) -> None:
    """``per_step`` small objects under every step (written directly, a few at once)."""
    limit = asyncio.Semaphore(16)

    async def put(path: str) -> None:
        async with limit:
            await backend.put(path, b"x")

    await asyncio.gather(
        *(
            put(f"{root}/{name}/meta/filler/{i:05d}/x")
            for name in (*map(str, STEPS), live)
            for i in range(per_step)
        )
    )


def _measure(
    manager: cc.CheckpointManager,
    backend: Backend,
    root: StoragePath,
    loop: LoopThread,
    count: Callable[[], int],
    live: str,
) -> dict[str, int]:
    """Requests made by each way of discovering the steps of ``root``."""
    used: dict[str, int] = {}

    def run(name: str, act: Callable[[], Any]) -> Any:
        before = count()
        out = act()
        used[name] = count() - before
        return out

    run("manager.reload", manager.reload)
    assert manager.all_steps() == list(STEPS) and manager.latest_step() == STEPS[-1]
    rows = run("ls --all", lambda: loop.run(_inspect.list_steps(root, read_claims=True)))
    assert [(r.name, r.committed) for r in rows] == [
        *((str(s), True) for s in STEPS),
        (live, False),
    ]
    assert rows[-1].claim is not None and rows[-1].claim["live"] is True
    deleted = run(
        "cleanup scan", lambda: loop.run(atomicity.cleanup_uncommitted(backend, root.path))
    )
    assert deleted == []  # the live claim is spared
    run("recursive listing", lambda: loop.run(atomicity.scan(backend, root.path, sizes=True)))
    return used


@pytest.mark.parametrize("kind", ["file", "s3", "gcs"])
def test_discovering_steps_costs_the_same_however_many_objects_they_hold(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, loop: LoopThread
) -> None:
    servers = request.getfixturevalue("servers") if kind != "file" else None
    with _counted(kind, servers, tmp_path) as (url, _options, backend, count):
        opts = cc.CheckpointManagerOptions(cleanup_uncommitted_on_start=False)
        # Saved straight to the server (tensorstore, which writes them, knows no proxy) ...
        with cc.CheckpointManager(url, options=opts) as writer:
            for step in STEPS:
                writer.save(step, args=cc.args.Composite(meta=cc.args.JsonSave({"s": step})))
            writer.wait_until_finished()
        # ... and discovered through the counted backend.
        _, path = split_url(url)
        manager = cc.CheckpointManager(StoragePath(backend, path), options=opts)
        try:
            root = manager.directory
            # A save in flight: its claim is this live process's.
            # On POSIX an attempt writes under its temporary name.
            live = f"{LIVE_STEP}{atomicity.TMP_INFIX}x" if kind == "file" else str(LIVE_STEP)
            claim = atomicity.Claim.new(3600.0).to_bytes()
            assert loop.run(
                backend.put_if_absent(f"{root.path}/{live}/{atomicity.CLAIM_NAME}", claim)
            )
            loop.run(_fill(backend, root.path, live, 1))
            few = _measure(manager, backend, root, loop, count, live)
            loop.run(_fill(backend, root.path, live, 40))
            many = _measure(manager, backend, root, loop, count, live)
        finally:
            manager.close()
    print(f"\n[{kind}] requests with 1 object/step: {few}; with 40: {many}")
    assert {k: v for k, v in many.items() if k != "recursive listing"} == {
        k: v for k, v in few.items() if k != "recursive listing"
    }
    # The counter sees objects: a recursive listing of 40 objects per step pages more.
    assert many["recursive listing"] > few["recursive listing"]
    # Per step, not per object: a marker (or claim) check per child plus a few pages.
    children = len(STEPS) + 1
    assert few["manager.reload"] <= 2 * children + 2
