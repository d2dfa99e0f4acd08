"""``cloudckpt doctor``'s settings checks: what a bucket's configuration means for checkpoints.

Reads the settings through ``Backend.bucket_settings`` (S3 lifecycle,
versioning and region; GCS soft delete, lifecycle, versioning and location)
and says what to change. A setting the server does not report (as with local
emulators), or that the identity may not read, is "could not check", naming
the permission, never a failure.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from cloudckpt.storage import BucketSettings
from cloudckpt.storage.path import StoragePath
from cloudckpt.storage.retry import error_code_of
from cloudckpt.tools.doctor_report import INFO, OK, UNKNOWN, WARN, DoctorReport, short_error

_ABORT_FIX_S3 = (
    "add an enabled lifecycle rule with AbortIncompleteMultipartUpload DaysAfterInitiation=1 "
    "covering the prefix (terraform/modules/s3-checkpoint-bucket does; or `aws s3api "
    "put-bucket-lifecycle-configuration`): abandoned multipart uploads are billed until aborted"
)
_ABORT_FIX_GCS = (
    "add a lifecycle rule with action AbortIncompleteMultipartUpload and condition age=1 "
    "(terraform/modules/gcs-checkpoint-bucket does)"
)


async def check_settings(report: DoctorReport, root: StoragePath) -> None:
    """Adds what the bucket's (or the disk's) settings mean for checkpoints under ``root``."""
    backend = root.backend
    settings = await backend.bucket_settings(root.path)
    if settings is not None and backend.scheme == "s3":
        _s3_settings(report, settings, _key_prefix(root), getattr(backend, "region", None))
    elif settings is not None and backend.scheme == "gs":
        _gcs_settings(report, settings, _key_prefix(root))
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


def _key_prefix(root: StoragePath) -> str:
    key = root.path.partition("/")[2]
    return key.rstrip("/") + "/" if key else ""


def _rule_prefix(rule: dict[str, Any]) -> str:
    flt = rule.get("Filter") or {}
    return str(
        flt.get("Prefix") or (flt.get("And") or {}).get("Prefix") or rule.get("Prefix") or ""
    )


def _why(settings: BucketSettings, name: str) -> str:
    exc = settings.errors[name]
    return error_code_of(exc) or short_error(exc)


def _s3_settings(
    report: DoctorReport, settings: BucketSettings, prefix: str, configured: str | None
) -> None:
    rules: list[dict[str, Any]] | None = settings.values.get("lifecycle")
    if "lifecycle" in settings.errors:
        report.add(
            "abort incomplete multipart uploads",
            UNKNOWN,
            f"could not check: GetBucketLifecycleConfiguration failed ({_why(settings, 'lifecycle')})",
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
    versioning = settings.values.get("versioning")
    if versioning is not None:
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
    else:
        report.add(
            "versioning (soft delete)",
            UNKNOWN,
            f"could not check: GetBucketVersioning failed ({_why(settings, 'versioning')})",
            "grant s3:GetBucketVersioning to see it (the training policy of "
            "terraform/modules/s3-checkpoint-bucket does not), or check the bucket by hand",
        )
    location = settings.values.get("location")
    if location is not None:
        region = location.get("LocationConstraint") or "us-east-1"
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
    else:
        report.add(
            "region",
            UNKNOWN,
            f"could not check: GetBucketLocation failed ({_why(settings, 'location')})",
            "grant s3:GetBucketLocation to see it (the training policy does not)",
        )


def _gcs_settings(report: DoctorReport, settings: BucketSettings, prefix: str) -> None:
    bucket = settings.bucket
    meta: dict[str, Any] | None = settings.values.get("metadata")
    if meta is None:
        why = f"could not read the bucket's metadata ({short_error(settings.errors['metadata'])})"
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
