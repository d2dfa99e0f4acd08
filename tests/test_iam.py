"""Every operation under exactly the permissions terraform/ grants, through an IAM-enforcing proxy.

The proxy (cloudckpt.testing.cloudproxy.CloudProxy) reads the S3 module's ``training``
policy document and the GCS module's role binding with python-hcl2, forwards
only what they allow, and answers the rest with the 403 the cloud sends. The
emulators behind it enforce no IAM, so this is where a request for bucket
metadata on the hot path shows. Listings are also capped at 7 keys a page.

The operations run in a worker process (tests/cloud_worker.py) whose client
environment points at the proxy; the worker names each phase to the proxy, so
the test reports the operations x permissions matrix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cloudckpt.testing.cloudiam import (
    S3Policy,
    gcs_permissions,
    gcs_role_from_terraform,
    s3_permissions,
    s3_policy_from_terraform,
)
from cloudckpt.testing.cloudproxy import CloudProxy
from cloudckpt.testing.servers import LocalServers

from . import zygote
from .helpers import BUCKET, unique

REPO = Path(__file__).resolve().parents[1]
S3_MODULE = REPO / "terraform" / "modules" / "s3-checkpoint-bucket"
GCS_MODULE = REPO / "terraform" / "modules" / "gcs-checkpoint-bucket"
PAGE = 7


def _policy(prefix: str) -> S3Policy:
    return s3_policy_from_terraform(S3_MODULE, bucket=BUCKET, checkpoint_prefix=prefix)


def test_the_proxy_reads_the_modules_policies() -> None:
    policy = _policy("checkpoints/")
    allows = policy.allows
    arn = f"arn:aws:s3:::{BUCKET}"
    assert allows("s3:PutObject", f"{arn}/checkpoints/run/1/x", {})
    assert not allows("s3:PutObject", f"{arn}/elsewhere/x", {})
    assert allows("s3:ListBucket", arn, {"s3:prefix": "checkpoints/run/"})
    assert not allows("s3:ListBucket", arn, {"s3:prefix": "other/"})
    assert not allows("s3:ListBucket", arn, {})  # HeadBucket carries no s3:prefix
    assert not allows("s3:GetLifecycleConfiguration", arn, {})
    role, granted = gcs_role_from_terraform(GCS_MODULE)
    assert role == "roles/storage.objectUser"
    assert "storage.objects.list" in granted and "storage.buckets.get" not in granted


def test_requests_map_to_the_permissions_the_clouds_check() -> None:
    b = f"/{BUCKET}"
    assert s3_permissions("HEAD", b, {}, {}, b"") == [
        ("s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {})
    ]
    assert s3_permissions("GET", b, {"list-type": "2", "prefix": "p/"}, {}, b"")[0][2] == {
        "s3:prefix": "p/"
    }
    assert (
        s3_permissions("GET", b, {"lifecycle": ""}, {}, b"")[0][0] == "s3:GetLifecycleConfiguration"
    )
    assert s3_permissions("DELETE", f"{b}/k", {"uploadId": "u"}, {}, b"")[0][0] == (
        "s3:AbortMultipartUpload"
    )
    body = b"<Delete><Object><Key>p/a</Key></Object><Object><Key>p/b</Key></Object></Delete>"
    assert [p[1] for p in s3_permissions("POST", b, {"delete": ""}, {}, body)] == [
        f"arn:aws:s3:::{BUCKET}/p/a",
        f"arn:aws:s3:::{BUCKET}/p/b",
    ]
    assert gcs_permissions("GET", f"/storage/v1/b/{BUCKET}", b"") == [
        ("storage.buckets.get", BUCKET)
    ]
    assert gcs_permissions("GET", f"/storage/v1/b/{BUCKET}/o", b"")[0][0] == "storage.objects.list"
    assert gcs_permissions("POST", f"/upload/storage/v1/b/{BUCKET}/o", b"")[0][0] == (
        "storage.objects.create"
    )


def _run_worker(kind: str, proxy: CloudProxy, root: str, servers: LocalServers) -> dict:
    env = {**os.environ, **servers.env, "PYTHONPATH": str(REPO)}
    if kind == "s3":
        env["AWS_ENDPOINT_URL"] = proxy.endpoint
    else:
        env["STORAGE_EMULATOR_HOST"] = proxy.endpoint
        env["TENSORSTORE_GCS_HTTP_URL"] = proxy.endpoint
    done = zygote.run("tests.cloud_worker", [root, proxy.phase_url], env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _proxy(kind: str, servers: LocalServers, prefix: str) -> CloudProxy:
    if kind == "s3":
        return CloudProxy(
            servers.s3.endpoint, flavor="s3", s3_policy=_policy(prefix), page_size=PAGE
        )
    _, granted = gcs_role_from_terraform(GCS_MODULE)
    return CloudProxy(
        servers.gcs.endpoint, flavor="gcs", gcs_permissions_granted=granted, page_size=PAGE
    )


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_every_operation_works_with_the_modules_permissions(
    kind: str, servers: LocalServers
) -> None:
    prefix = f"{unique('iam')}/"  # the module's checkpoint_prefix
    scheme = "s3" if kind == "s3" else "gs"
    root = f"{scheme}://{BUCKET}/{prefix}train"
    with _proxy(kind, servers, prefix) as proxy:
        results = _run_worker(kind, proxy, root, servers)
    matrix = proxy.stats.matrix
    print(f"\n[{kind}] operations x permissions (requests), pages capped at {PAGE} keys:")
    for name, counts in matrix.items():
        print(f"  {name:24s} {dict(sorted(counts.items()))}")
    print(
        f"  listing pages={proxy.stats.pages} continued={proxy.stats.continued_pages} "
        f"largest={proxy.stats.largest_page}"
    )
    assert dict(proxy.stats.denied) == {}, matrix
    assert results["all_steps_after_retention"] == [2, 3]
    assert results["all_steps_reopened"] == [2, 3]
    assert results["crashed_left"] == []
    assert results["copy_left"] == []
    assert results["objects"] > PAGE
    # Listings really were cut into pages, and followed to the end.
    assert proxy.stats.largest_page <= PAGE and proxy.stats.continued_pages > 0
    for name in ("save", "restore", "manager-save-retention", "cli-ls", "cli-cp", "cli-gc"):
        assert name in matrix, name


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_missing_bucket_is_named_without_bucket_permissions(
    kind: str, servers: LocalServers, loop
) -> None:
    from cloudckpt.storage.gcs import GCSBackend
    from cloudckpt.storage.s3 import S3Backend

    from .backend_harness import FAST_RETRY

    with _proxy(kind, servers, "") as proxy:  # prefix "" grants the whole (missing) bucket
        if kind == "s3":
            proxy.s3_policy = s3_policy_from_terraform(
                S3_MODULE, bucket="no-such-bucket-iam", checkpoint_prefix=""
            )
            backend = S3Backend(endpoint_url=proxy.endpoint, retry=FAST_RETRY)
        else:
            backend = GCSBackend(endpoint_url=proxy.endpoint, retry=FAST_RETRY)
        for call in (
            lambda: backend.get("no-such-bucket-iam/k"),
            lambda: backend.exists("no-such-bucket-iam/k"),
            lambda: backend.put_if_absent("no-such-bucket-iam/k", b"x"),
            lambda: backend.list_prefix("no-such-bucket-iam/run").__anext__(),
        ):
            with pytest.raises(
                FileNotFoundError, match="bucket 'no-such-bucket-iam' does not exist"
            ):
                loop.run(call())
        loop.run(backend.aclose())
    assert dict(proxy.stats.denied) == {}


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_refused_request_names_the_permission_the_cloud_refused(
    kind: str, servers: LocalServers, loop
) -> None:
    from cloudckpt.storage.gcs import GCSBackend
    from cloudckpt.storage.s3 import S3Backend

    from .backend_harness import FAST_RETRY

    granted = f"{unique('granted')}/"
    with _proxy(kind, servers, granted) as proxy:
        if kind == "s3":
            backend = S3Backend(endpoint_url=proxy.endpoint, retry=FAST_RETRY)
            # Outside the module's checkpoint_prefix: the policy allows nothing there.
            path, want = f"{BUCKET}/elsewhere/x", "s3:PutObject"
        else:
            # objectUser covers the whole bucket; an identity without create is refused.
            proxy.gcs_granted = frozenset({"storage.objects.get", "storage.objects.list"})
            backend = GCSBackend(endpoint_url=proxy.endpoint, retry=FAST_RETRY)
            path, want = f"{BUCKET}/{granted}x", "storage.objects.create"
        with pytest.raises(PermissionError, match=f"the store refused {want}") as info:
            loop.run(backend.put(path, b"x"))
        loop.run(backend.aclose())
    assert BUCKET in str(info.value) and backend.stats.total_retries() == 0
    assert dict(proxy.stats.denied) == {want: 1}


def test_s3_multi_object_delete_refuses_key_by_key(servers: LocalServers) -> None:
    # AWS authorises DeleteObjects per key: a refused key is an AccessDenied entry
    # in a 200 answer, not a 403. A client that ignores the entries loses nothing
    # visibly, and deletes nothing.
    from cloudckpt.testing.conformance import raw_fsspec
    from cloudckpt.testing.servers import s3_admin_client

    from .backend_harness import s3fs_client

    raw_get, raw_put = raw_fsspec(s3fs_client())
    granted, other = f"{unique('granted')}/", f"{unique('other')}/"
    raw_put(f"{BUCKET}/{granted}a", b"1")
    raw_put(f"{BUCKET}/{other}b", b"2")
    with _proxy("s3", servers, granted) as proxy:
        client = s3_admin_client(proxy.endpoint, servers.s3.credentials)
        out = client.delete_objects(
            Bucket=BUCKET, Delete={"Objects": [{"Key": f"{granted}a"}, {"Key": f"{other}b"}]}
        )
        client.close()
    assert [d["Key"] for d in out.get("Deleted", [])] == [f"{granted}a"]
    assert [(e["Key"], e["Code"]) for e in out["Errors"]] == [(f"{other}b", "AccessDenied")]
    assert raw_get(f"{BUCKET}/{granted}a") is None and raw_get(f"{BUCKET}/{other}b") == b"2"
