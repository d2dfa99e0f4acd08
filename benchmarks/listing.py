"""Requests to discover the steps of a root: before and after the delimiter listing (issue 14).

Builds ``listing_steps`` committed steps (saved through a
``CheckpointManager``, a small JSON item each) and writes small objects
directly under each until it holds ``listing_objects`` objects (a few dozen
writes in flight: the build takes seconds, not a save of gigabytes). Then
counts the requests each way of discovering the steps makes:

* **after**: the real backend, which lists children with one delimiter
  listing and checks each child's ``_COMMITTED`` (and ``_CLAIM``) by exact key;
* **before**: the same calls through a wrapper that hides the delimiter
  listing, so discovery falls back to one recursive listing of the root:
  exactly what it did before issue 14.

Counted on S3 and GCS by a :class:`~cloudckpt.testing.cloudproxy.CloudProxy` in
front of the server (every HTTP request; listing pages cut at 1,000 keys
as on the clouds), on the file system as backend calls
plus directory reads (``os.scandir``/``os.listdir`` audit events).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import atomicity
import cloudckpt as cc
from benchmarks.common import Context, aligned, scenario
from cloudckpt.storage import Deadlines
from cloudckpt.storage.path import StoragePath
from cloudckpt.tools import inspect as _inspect

_DIRECTORY_READS = [0]
_HOOKED: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event in ("os.scandir", "os.listdir"):
        _DIRECTORY_READS[0] += 1


class _Recursive:
    """Forwards to a backend but hides ``list_children``: discovery as before issue 14."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        if name == "list_children":
            raise AttributeError(name)
        return getattr(self._backend, name)


async def _fill(backend: Any, root: str, names: list[str], per_step: int) -> None:
    limit = asyncio.Semaphore(64)

    async def put(path: str) -> None:
        async with limit:
            await backend.put(path, b"x")

    # One directory per object, as arrays' chunk keys are (arrays/<leaf>/c/<i>/<j>).
    await asyncio.gather(
        *(put(f"{root}/{n}/state/filler/{i:05d}/c") for n in names for i in range(per_step))
    )


def _count_all(
    manager_root: StoragePath, backend: Any, count: Callable[[], int], n_steps: int
) -> dict[str, int]:
    """Requests of: manager reload (all_steps/latest_step), ls, the clean-up scan."""
    used: dict[str, int] = {}
    opts = cc.CheckpointManagerOptions(cleanup_uncommitted_on_start=False)
    root = StoragePath(backend, manager_root.path)
    before = count()
    manager = cc.CheckpointManager(root, options=opts)  # its start is one reload
    used["manager.all_steps (reload)"] = count() - before
    try:
        assert len(manager.all_steps()) == n_steps, manager.all_steps()
    finally:
        manager.close()

    async def ls_and_cleanup() -> None:
        before = count()
        rows = await _inspect.list_steps(root, read_claims=False)
        used["cloudckpt ls"] = count() - before
        assert sum(r.committed for r in rows) == n_steps
        before = count()
        await atomicity.cleanup_uncommitted(backend, root.path)
        used["clean-up scan"] = count() - before

    asyncio.run(ls_and_cleanup())
    return used


def _counter(
    name: str, ctx: Context
) -> tuple[AbstractContextManager[Any], Callable[[Any], Callable[[], int]], dict[str, Any]]:
    """(context, counter factory, storage options) for the backend ``name``."""
    if name == "file":
        if not _HOOKED:  # an audit hook cannot be removed: install it once per process
            sys.addaudithook(_audit)
            _HOOKED.append(True)

        def file_count(backend: Any) -> Callable[[], int]:
            return lambda: backend.stats.total_calls() + _DIRECTORY_READS[0]

        return nullcontext(), file_count, {}
    from cloudckpt.testing.cloudproxy import CloudProxy

    server = ctx.servers.s3 if name == "s3" else ctx.servers.gcs
    # Pages of 1,000 keys, as S3 and GCS cut them (fake-gcs-server answers in one page).
    proxy = CloudProxy(server.endpoint, flavor=name, page_size=1000)
    # The requests discovery makes, not the hedges and cut-and-resent attempts a slow
    # emulator listing 50,000 objects draws from the adaptive deadlines (as in the tests).
    options = {"endpoint_url": proxy.endpoint, "deadlines": Deadlines(hedge=False, cut_min_s=60)}
    return proxy, (lambda _backend: lambda: proxy.stats.requests), options


@scenario("listing", order=5)
def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    n_steps, per_step = cfg.listing_steps, cfg.listing_objects
    out: dict[str, Any] = {"steps": n_steps, "objects_per_step": per_step, "backends": {}}
    for target in ctx.targets:
        url = f"{target.root}/listing-{uuid.uuid4().hex[:8]}"
        # Build through the direct (unproxied) backend.
        t0 = time.monotonic()
        manager = cc.CheckpointManager(url)
        try:
            for step in range(1, n_steps + 1):
                manager.save(step, args=cc.args.Composite(state=cc.args.JsonSave({"s": step})))
            manager.wait_until_finished()
        finally:
            manager.close()
        root = StoragePath.from_url(url)
        existing = len(asyncio.run(_inspect.list_objects(root / "1")))
        names = [str(s) for s in range(1, n_steps + 1)]

        async def build(
            root: StoragePath = root, existing: int = existing, names: list[str] = names
        ) -> None:
            try:
                await _fill(root.backend, root.path, names, per_step - existing)
            finally:
                await root.backend.aclose()

        asyncio.run(build())
        built_s = time.monotonic() - t0
        ctx.log(f"listing: {target.name}: built {n_steps} x {per_step} objects in {built_s:.0f}s")
        proxy_cm, counter_for, options = _counter(target.name, ctx)
        with proxy_cm:
            backend = (
                root.backend
                if target.name == "file"
                else cc.backends.get_backend("s3" if target.name == "s3" else "gs", **options)
            )
            count = counter_for(backend)
            after = _count_all(root, backend, count, n_steps)
            before = _count_all(root, _Recursive(backend), count, n_steps)

            async def close(backend: Any = backend) -> None:
                await backend.aclose()

            asyncio.run(close())
        out["backends"][target.name] = {"before": before, "after": after, "build_s": built_s}
        ctx.log(f"listing: {target.name}: before {before}; after {after}")
        _remove(url)
    return out


def _remove(url: str) -> None:
    from benchmarks.targets import remove

    remove(url)


def table_lines(result: dict[str, Any]) -> list[str]:
    """The summary rows for ``report.table``."""
    lines = [
        f"\n== Listing: requests to discover {result['steps']} steps x "
        f"{result['objects_per_step']:,} objects (before: one recursive listing; "
        "after: delimiter listing + exact-key marker checks) =="
    ]
    header = ["backend", "operation", "before", "after"]
    rows = []
    for name, r in result["backends"].items():
        for op, after in r["after"].items():
            rows.append([name, op, str(r["before"][op]), str(after)])
    lines += aligned(header, rows)
    lines.append(
        "requests: HTTP requests through a counting proxy (S3, GCS); backend calls plus "
        "directory reads (file)"
    )
    return lines
