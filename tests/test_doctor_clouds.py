"""``cloudckpt doctor`` against stores that answer like the clouds, not like the emulators.

Through a proxy that strips the create-only preconditions (a store that
ignores them), doctor reports exactly that one failure and still checks the
bucket's settings. Through the IAM proxy built from terraform/, every
functional check passes with the training identity's permissions, and the
settings it may not read are "could not check", naming the permission.
Doctor runs as ``python -m cloudckpt`` in a subprocess because tensorstore
reads its GCS endpoint once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudckpt.testing.cloudiam import gcs_role_from_terraform, s3_policy_from_terraform
from cloudckpt.testing.cloudproxy import CloudProxy
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique

REPO = Path(__file__).resolve().parents[1]
FUNCTIONAL = ("reachable", "create-only put", "read", "tensorstore", "list", "delete")


def _doctor(kind: str, proxy: CloudProxy, url: str, servers: LocalServers) -> tuple[int, dict]:
    env = {**os.environ, **servers.env, "PYTHONPATH": str(REPO)}
    if kind == "s3":
        env["AWS_ENDPOINT_URL"] = proxy.endpoint
    else:
        env["STORAGE_EMULATOR_HOST"] = env["TENSORSTORE_GCS_HTTP_URL"] = proxy.endpoint
    done = subprocess.run(
        [sys.executable, "-m", "cloudckpt", "doctor", "--json", url],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, json.loads(done.stdout)


def _statuses(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_store_that_ignores_preconditions_fails_once_and_settings_are_still_checked(
    kind: str, servers: LocalServers
) -> None:
    upstream = servers.s3.endpoint if kind == "s3" else servers.gcs.endpoint
    url = f"{'s3' if kind == 's3' else 'gs'}://{BUCKET}/{unique('doctor')}"
    with CloudProxy(upstream, flavor=kind, strip_preconditions=True) as proxy:
        code, report = _doctor(kind, proxy, url, servers)
    statuses = _statuses(report)
    assert code == 1 and report["failed"] == 1
    assert statuses["create-only put"] == "fail"
    create = next(c for c in report["checks"] if c["name"] == "create-only put")
    assert "ignores If-None-Match" in create["detail"]
    assert all(statuses[name] == "ok" for name in FUNCTIONAL if name != "create-only put")
    settings = {"s3": "versioning (soft delete)", "gcs": "soft delete"}[kind]
    assert settings in statuses  # not skipped after the failure


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_doctor_with_the_training_identity_says_what_settings_need(
    kind: str, servers: LocalServers
) -> None:
    prefix = f"{unique('doctor-iam')}/"
    if kind == "s3":
        policy = s3_policy_from_terraform(
            REPO / "terraform/modules/s3-checkpoint-bucket", bucket=BUCKET, checkpoint_prefix=prefix
        )
        proxy = CloudProxy(servers.s3.endpoint, flavor="s3", s3_policy=policy)
    else:
        _, granted = gcs_role_from_terraform(REPO / "terraform/modules/gcs-checkpoint-bucket")
        proxy = CloudProxy(servers.gcs.endpoint, flavor="gcs", gcs_permissions_granted=granted)
    url = f"{'s3' if kind == 's3' else 'gs'}://{BUCKET}/{prefix}run"
    with proxy:
        code, report = _doctor(kind, proxy, url, servers)
    statuses = _statuses(report)
    assert code == 0 and report["failed"] == 0, report
    assert all(statuses[name] == "ok" for name in FUNCTIONAL)
    unknown = [c for c in report["checks"] if c["status"] == "unknown"]
    needs = {"s3": "s3:GetLifecycleConfiguration", "gcs": "storage.buckets.get"}[kind]
    assert unknown and any(needs in (c["fix"] or "") for c in unknown)
    denied_only = {
        "s3": {"s3:GetLifecycleConfiguration", "s3:GetBucketVersioning", "s3:GetBucketLocation"},
        "gcs": {"storage.buckets.get"},
    }[kind]
    assert set(proxy.stats.denied) == denied_only


def test_a_store_that_refuses_preconditions_is_named_by_doctor(servers: LocalServers) -> None:
    url = f"s3://{BUCKET}/{unique('doctor-501')}"
    with CloudProxy(servers.s3.endpoint, flavor="s3", refuse_preconditions=True) as proxy:
        code, report = _doctor("s3", proxy, url, servers)
    statuses = _statuses(report)
    assert code == 1 and report["failed"] == 1 and statuses["create-only put"] == "fail"
    create = next(c for c in report["checks"] if c["name"] == "create-only put")
    assert "does not support create-only puts" in create["detail"]
    assert all(statuses[name] == "ok" for name in FUNCTIONAL if name != "create-only put")
