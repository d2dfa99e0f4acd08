"""``cloudckpt doctor``: checks a live bucket (or directory) from the training host.

Functional checks write probe objects under ``<root>/_cloudckpt-doctor-<id>/``
through the same backend and tensorstore spec a save uses, and delete them
again: reachable, create-only put works and a second one is refused, read
back, list and delete within the prefix, and the tensorstore data path.
Settings checks (:mod:`cloudckpt.tools.doctor_settings`, through
``Backend.bucket_settings``) read what the storage API exposes (S3 lifecycle, versioning
and region; GCS soft delete, lifecycle, versioning and location) and say what
to change. A setting the server does not report (as with local emulators) is
"could not check", never a failure.

Each functional check uses its own probe object, so one failure (a store
that ignores create-only preconditions and overwrote its probe) cannot make
the next checks fail for the wrong reason. The functional checks need only
what a save needs, exactly what the terraform/ modules grant the training
identity (S3: Get/Put/DeleteObject and ListBucket under the prefix; GCS:
roles/storage.objectUser). The settings checks read bucket configuration,
which that identity may not: S3 s3:GetLifecycleConfiguration,
s3:GetBucketVersioning and s3:GetBucketLocation; GCS storage.buckets.get.
Without them a setting is "could not check", naming the permission. Settings
are checked whenever the bucket is reachable, whatever the functional checks found.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import tensorstore as ts

from cloudckpt.storage import Backend
from cloudckpt.storage.path import StoragePath
from cloudckpt.tools.doctor_report import (
    FAIL,
    INFO,
    OK,
    UNKNOWN,
    WARN,
    Check,
    DoctorReport,
    short_error,
)
from cloudckpt.tools.doctor_settings import check_settings

PROBE_PREFIX = "_cloudckpt-doctor-"

# The report's types and statuses are doctor's vocabulary: callers read them from here.
__all__ = [
    "FAIL",
    "INFO",
    "OK",
    "PROBE_PREFIX",
    "UNKNOWN",
    "WARN",
    "Check",
    "DoctorReport",
    "describe_store",
    "run_doctor",
]


def _safe_endpoint(url: str) -> str:
    """An endpoint URL without any user:password part."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def describe_store(backend: Backend) -> str:
    """Class, endpoint, region/project and credential source; never a secret."""
    parts = [type(backend).__name__]
    endpoint = getattr(backend, "endpoint_url", None)
    if backend.scheme in ("s3", "gs"):
        parts.append(f"endpoint {_safe_endpoint(endpoint) if endpoint else 'default'}")
    for attr in ("region", "project"):
        value = getattr(backend, attr, None)
        if value:
            parts.append(f"{attr} {value}")
    credentials = getattr(backend, "credential_description", None)
    if credentials:
        parts.append(f"credentials: {credentials}")
    return ", ".join(parts)


async def run_doctor(root: StoragePath) -> DoctorReport:
    """Runs every check against ``root``; always removes its probe objects."""
    report = DoctorReport(root.url)
    probe = root / f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    created_root = root.backend.scheme == "file" and not os.path.exists(root.path)
    reachable = False
    try:
        reachable = await _reachable(report, probe)
        if reachable:
            await _functional(report, probe)
            await check_settings(report, root)
    finally:
        if reachable:
            await _cleanup(report, probe, root if created_root else None)
    report.store = describe_store(root.backend)
    return report


async def _step(
    report: DoctorReport, name: str, fn: Callable[[], Awaitable[str]], fix: str
) -> bool:
    start = time.perf_counter()
    try:
        detail = await fn()
    except Exception as exc:  # every failure is a finding, not a crash
        report.add(name, FAIL, short_error(exc), fix)
        return False
    report.add(name, OK, f"{detail} ({time.perf_counter() - start:.2f}s)")
    return True


class _Failed(Exception):
    pass


async def _reachable(report: DoctorReport, probe: StoragePath) -> bool:
    async def reach() -> str:
        async for _ in probe.backend.list_prefix(probe.path):
            break
        return f"listed {probe.url}"

    return await _step(
        report,
        "reachable",
        reach,
        "check the URL, that the bucket exists, the endpoint (AWS_ENDPOINT_URL / "
        "STORAGE_EMULATOR_HOST) and the credentials",
    )


async def _functional(report: DoctorReport, probe: StoragePath) -> bool:
    backend = probe.backend
    first, second = b"cloudckpt doctor probe 1\n", b"cloudckpt doctor probe 2\n"
    target = probe / "create-only"

    async def create_only() -> str:
        if not await backend.put_if_absent(target.path, first):
            raise _Failed(f"{target} already existed before the probe")
        if await backend.put_if_absent(target.path, second):
            raise _Failed(
                "a second create-only put of the same object succeeded: the store ignores "
                "If-None-Match: * / ifGenerationMatch=0, so commit markers cannot keep two "
                "writers apart"
            )
        if await backend.get(target.path) != first:
            raise _Failed("the refused second put replaced the object's content")
        return "created an object, and a second create-only put of it was refused"

    ok = await _step(
        report,
        "create-only put",
        create_only,
        "use a store that honours conditional creates (S3 If-None-Match: *, GCS "
        "ifGenerationMatch=0) and grant object create permission on the prefix",
    )

    readable = probe / "read"

    async def read_back() -> str:
        await backend.put(readable.path, first)
        data = await backend.get(readable.path)
        part = await backend.get(readable.path, (0, 9))
        size = await backend.size(readable.path)
        if data != first or part != first[:9] or size != len(first):
            raise _Failed("read back different bytes than were written")
        return "whole and ranged reads return what was written"

    ok &= await _step(report, "read", read_back, "grant object read on the prefix")

    async def ts_path() -> str:
        kv = await ts.KvStore.open(probe.kvstore_spec(), context=backend.tensorstore_context())
        await asyncio.wait_for(kv.write("tensorstore", second), 60)
        if await backend.get((probe / "tensorstore").path) != second:
            raise _Failed("an object written by tensorstore reads back differently")
        await backend.put((probe / "for-tensorstore").path, first)
        result = await asyncio.wait_for(kv.read("for-tensorstore"), 60)
        if bytes(result.value) != first:
            raise _Failed("tensorstore reads different bytes than the backend wrote")
        return "tensorstore (the array data path) writes and reads the same objects"

    ok &= await _step(
        report,
        "tensorstore",
        ts_path,
        "arrays are written by tensorstore with its own clients: check that it sees the same "
        "endpoint and credentials (environment, AWS profile, Application Default Credentials)",
    )

    async def listing() -> str:
        listed = probe / "list"
        want = {(listed / f"object-{i}").path: i + 1 for i in range(3)}
        for path, size in want.items():
            await backend.put(path, b"x" * size)
        found = {info.path: info.size async for info in backend.list_prefix(listed.path)}
        missing = [p for p in want if found.get(p) != want[p]]
        if missing:
            raise _Failed(f"a listing right after writing misses (or mis-sizes) {missing}")
        return f"a listing sees the {len(want)} probe objects with their sizes"

    ok &= await _step(report, "list", listing, "grant list on the bucket for the prefix")

    if backend.supports_atomic_rename:

        async def rename() -> str:
            src, dst = probe / "rename-src", probe / "rename-dst"
            await backend.put((src / "x").path, first)
            await backend.rename(src.path, dst.path)
            if not await backend.exists((dst / "x").path):
                raise _Failed("a renamed directory lost its content")
            await backend.put((src / "x").path, first)
            try:
                await backend.rename(src.path, dst.path)
            except FileExistsError:
                return "directories rename atomically, and never onto an existing one"
            raise _Failed("rename replaced an existing directory")

        ok &= await _step(
            report, "atomic rename", rename, "use a POSIX file system with rename(2) semantics"
        )

    async def delete() -> str:
        doomed = probe / "delete"
        await backend.put(doomed.path, first)
        await backend.delete(doomed.path)
        if await backend.exists(doomed.path):
            raise _Failed("an object still exists after it was deleted")
        await backend.delete_prefix(probe.path)
        left = [info.path async for info in backend.list_prefix(probe.path)]
        if left:
            raise _Failed(f"{len(left)} object(s) remain after deleting the prefix")
        return "objects and the probe prefix delete"

    ok &= await _step(report, "delete", delete, "grant object delete on the prefix")
    return ok


async def _cleanup(report: DoctorReport, probe: StoragePath, made_root: StoragePath | None) -> None:
    backend = probe.backend
    try:
        await backend.delete_prefix(probe.path)
        left = [info.path async for info in backend.list_prefix(probe.path)]
    except Exception as exc:
        left = [f"({short_error(exc)})"]
    if left:
        report.add(
            "clean-up",
            WARN,
            f"probe objects remain under {probe.url}",
            f"delete {probe.url} by hand",
        )
    if made_root is not None:
        try:
            os.rmdir(made_root.path)  # only if still empty: doctor created it
        except OSError:
            pass
