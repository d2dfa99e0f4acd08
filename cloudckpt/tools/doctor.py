"""``cloudckpt doctor``: checks a live bucket (or directory) from the training host.

Functional checks write probe objects under ``<root>/_cloudckpt-doctor-<id>/``
through the same backend and tensorstore spec a save uses, and delete them
again: reachable, create-only put works and a second one is refused, read
back, list and delete within the prefix, and the tensorstore data path.
Settings checks read what the storage API exposes (S3 lifecycle, versioning
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
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import tensorstore as ts

from cloudckpt.storage import Backend
from cloudckpt.storage.path import StoragePath

OK, FAIL, WARN, UNKNOWN, INFO = "ok", "fail", "fix", "unknown", "info"
PROBE_PREFIX = "_cloudckpt-doctor-"
_ABORT_FIX_S3 = (
    "add an enabled lifecycle rule with AbortIncompleteMultipartUpload DaysAfterInitiation=1 "
    "covering the prefix (terraform/modules/s3-checkpoint-bucket does; or `aws s3api "
    "put-bucket-lifecycle-configuration`): abandoned multipart uploads are billed until aborted"
)
_ABORT_FIX_GCS = (
    "add a lifecycle rule with action AbortIncompleteMultipartUpload and condition age=1 "
    "(terraform/modules/gcs-checkpoint-bucket does)"
)


@dataclass
class Check:
    """One finding: ``ok``, ``fail``, ``fix`` (a setting to change), ``unknown`` or ``info``."""

    name: str
    status: str
    detail: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DoctorReport:
    url: str
    store: str = ""
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str, fix: str | None = None) -> Check:
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        return check

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "store": self.store,
            "checks": [c.to_json() for c in self.checks],
            "failed": self.count(FAIL),
            "to_fix": self.count(WARN),
            "could_not_check": self.count(UNKNOWN),
        }


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


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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
            await _settings(report, root)
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
        report.add(name, FAIL, _short(exc), fix)
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
        left = [f"({_short(exc)})"]
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


# ------------------------------------------------------------------------------ settings
async def _settings(report: DoctorReport, root: StoragePath) -> None:
    backend = root.backend
    if backend.scheme == "s3":
        await _s3_settings(report, root)
    elif backend.scheme == "gs":
        await _gcs_settings(report, root)
    elif backend.scheme == "file":
        usage = shutil.disk_usage(_existing_parent(root.path))
        report.add(
            "disk space",
            INFO,
            f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB",
        )


def _existing_parent(path: str) -> str:
    while path and not os.path.exists(path):
        path = os.path.dirname(path.rstrip("/")) or "/"
    return path or "/"


def _error_code(exc: BaseException) -> str | None:
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        current = current.__cause__ or current.__context__
    return None


def _key_prefix(root: StoragePath) -> str:
    key = root.path.partition("/")[2]
    return key.rstrip("/") + "/" if key else ""


def _rule_prefix(rule: dict[str, Any]) -> str:
    flt = rule.get("Filter") or {}
    return str(
        flt.get("Prefix") or (flt.get("And") or {}).get("Prefix") or rule.get("Prefix") or ""
    )


async def _s3_settings(report: DoctorReport, root: StoragePath) -> None:
    backend: Any = root.backend
    bucket, prefix = root.path.split("/", 1)[0], _key_prefix(root)
    fs = await backend._fs()  # the backend's own client: same endpoint and credentials

    rules: list[dict[str, Any]] | None = None
    try:
        rules = (await fs._call_s3("get_bucket_lifecycle_configuration", Bucket=bucket)).get(
            "Rules", []
        )
    except Exception as exc:
        code = _error_code(exc)
        if code == "NoSuchLifecycleConfiguration":
            rules = []
        else:
            report.add(
                "abort incomplete multipart uploads",
                UNKNOWN,
                f"could not check: GetBucketLifecycleConfiguration failed ({code or _short(exc)})",
                "grant s3:GetLifecycleConfiguration to see it, or check the bucket's lifecycle "
                "rules by hand: " + _ABORT_FIX_S3,
            )
    if rules is not None:
        covering = [
            r for r in rules if r.get("Status") == "Enabled" and prefix.startswith(_rule_prefix(r))
        ]
        abort = [r for r in covering if r.get("AbortIncompleteMultipartUpload")]
        if abort:
            days = abort[0]["AbortIncompleteMultipartUpload"].get("DaysAfterInitiation")
            report.add(
                "abort incomplete multipart uploads",
                OK,
                f"rule {abort[0].get('ID', '?')!r} aborts them after {days} day(s)",
            )
        else:
            report.add(
                "abort incomplete multipart uploads",
                WARN,
                f"no enabled lifecycle rule covering {prefix or 'the bucket'} aborts them",
                _ABORT_FIX_S3,
            )
        for r in covering:
            expiration = r.get("Expiration") or {}
            if expiration.get("Days"):
                report.add(
                    "expiry",
                    INFO,
                    f"rule {r.get('ID', '?')!r} deletes objects under "
                    f"{_rule_prefix(r) or 'the bucket'} after {expiration['Days']} days: "
                    "older checkpoints there will vanish",
                )
    try:
        versioning = await fs._call_s3("get_bucket_versioning", Bucket=bucket)
        status = versioning.get("Status") or "never enabled"
        noncurrent = any(r.get("NoncurrentVersionExpiration") for r in rules or [])
        if status == "Enabled" and not noncurrent:
            report.add(
                "versioning (soft delete)",
                WARN,
                "versioning is on: every deleted or replaced checkpoint stays as a billed "
                "noncurrent version",
                "suspend versioning, or add a NoncurrentVersionExpiration lifecycle rule",
            )
        else:
            report.add(
                "versioning (soft delete)",
                OK,
                f"versioning {status.lower()}"
                + ("; noncurrent versions expire" if noncurrent else "")
                + ": deleted checkpoints stop costing",
            )
    except Exception as exc:
        report.add(
            "versioning (soft delete)",
            UNKNOWN,
            f"could not check: GetBucketVersioning failed ({_error_code(exc) or _short(exc)})",
            "grant s3:GetBucketVersioning to see it (the training policy of "
            "terraform/modules/s3-checkpoint-bucket does not), or check the bucket by hand",
        )
    try:
        location = await fs._call_s3("get_bucket_location", Bucket=bucket)
        region = location.get("LocationConstraint") or "us-east-1"
        configured = getattr(backend, "region", None)
        if configured and configured != region:
            report.add(
                "region",
                WARN,
                f"the bucket is in {region} but clients are configured for {configured}",
                "keep the bucket in the accelerators' region and set AWS_REGION to it",
            )
        else:
            report.add(
                "region",
                INFO,
                f"bucket region {region}; keep it in the same region as the accelerators",
            )
    except Exception as exc:
        report.add(
            "region",
            UNKNOWN,
            f"could not check: GetBucketLocation failed ({_error_code(exc) or _short(exc)})",
            "grant s3:GetBucketLocation to see it (the training policy does not)",
        )


async def _gcs_settings(report: DoctorReport, root: StoragePath) -> None:
    backend: Any = root.backend
    bucket, prefix = root.path.split("/", 1)[0], _key_prefix(root)
    try:
        fs = await backend._fs()  # the backend's own client: same endpoint and credentials
        meta = await fs._call("GET", "b/{}", bucket, json_out=True)
    except Exception as exc:
        why = f"could not read the bucket's metadata ({_short(exc)})"
        fix = (
            "grant storage.buckets.get (e.g. roles/storage.legacyBucketReader) to see it; "
            "roles/storage.objectUser, the training role of terraform/, does not have it"
        )
        for name in ("soft delete", "abort incomplete multipart uploads"):
            report.add(name, UNKNOWN, why, fix)
        return
    reported = "softDeletePolicy" in meta
    if reported:
        seconds = int((meta.get("softDeletePolicy") or {}).get("retentionDurationSeconds", 0))
        if seconds > 0:
            report.add(
                "soft delete",
                WARN,
                f"soft delete keeps every deleted checkpoint for {seconds / 86400:g} days, billed",
                f"`gcloud storage buckets update gs://{bucket} --clear-soft-delete`, or "
                "soft_delete_policy { retention_duration_seconds = 0 } in terraform",
            )
        else:
            report.add("soft delete", OK, "off: deleted checkpoints stop costing at once")
    else:
        report.add(
            "soft delete",
            UNKNOWN,
            "could not check: the server does not report softDeletePolicy (an emulator?)",
        )
    rules = (meta.get("lifecycle") or {}).get("rule")
    if rules is None and not reported:
        report.add(
            "abort incomplete multipart uploads",
            UNKNOWN,
            "could not check: the server reports neither lifecycle rules nor soft delete "
            "(an emulator?)",
        )
    else:
        rules = rules or []

        def covers(rule: dict[str, Any]) -> bool:
            prefixes = (rule.get("condition") or {}).get("matchesPrefix") or [""]
            return any(prefix.startswith(p) for p in prefixes)

        abort = [
            r
            for r in rules
            if (r.get("action") or {}).get("type") == "AbortIncompleteMultipartUpload" and covers(r)
        ]
        if abort:
            age = (abort[0].get("condition") or {}).get("age")
            report.add(
                "abort incomplete multipart uploads",
                OK,
                f"a lifecycle rule aborts them after {age} day(s)",
            )
        else:
            report.add(
                "abort incomplete multipart uploads",
                WARN,
                f"no lifecycle rule covering {prefix or 'the bucket'} aborts them",
                _ABORT_FIX_GCS,
            )
        for r in rules:
            if (r.get("action") or {}).get("type") == "Delete" and covers(r):
                report.add(
                    "expiry",
                    INFO,
                    f"a lifecycle rule deletes objects {json_condition(r)}: "
                    "older checkpoints there will vanish",
                )
    if (meta.get("versioning") or {}).get("enabled"):
        report.add(
            "versioning",
            WARN,
            "object versioning is on: deleted checkpoints stay as billed noncurrent versions",
            f"`gcloud storage buckets update gs://{bucket} --no-versioning`",
        )
    location = meta.get("location")
    if location:
        kind = meta.get("locationType", "location")
        report.add(
            "location",
            INFO,
            f"bucket {kind} {location}; keep it in the same region as the accelerators",
        )
    if (meta.get("hierarchicalNamespace") or {}).get("enabled"):
        report.add("hierarchical namespace", INFO, "enabled")


def json_condition(rule: dict[str, Any]) -> str:
    condition = rule.get("condition") or {}
    return ", ".join(f"{k}={v}" for k, v in sorted(condition.items())) or "(no condition)"
