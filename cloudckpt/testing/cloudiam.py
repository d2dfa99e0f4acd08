"""The training identity's permissions, read from terraform/, and what each request needs.

For :class:`cloudckpt.testing.cloudproxy.CloudProxy`: :func:`s3_policy_from_terraform`
reads the S3 module's ``training`` policy document and
:func:`gcs_role_from_terraform` the GCS module's role binding with
python-hcl2, so module and proxy cannot drift. :func:`s3_permissions` and
:func:`gcs_permissions` map one HTTP request to the IAM actions (S3) or
permissions (GCS) the cloud checks for it, as documented by AWS ("Actions,
resources, and condition keys for Amazon S3") and Google ("IAM permissions
for JSON methods").

Needs the ``test`` extra (python-hcl2 reads the terraform modules).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# --------------------------------------------------------------------------- policies
#: Published permissions of the predefined GCS roles a module may grant
#: (https://cloud.google.com/storage/docs/access-control/iam-roles), the
#: storage.* part. A module granting a role not listed here fails loudly.
GCS_ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "roles/storage.objectUser": frozenset(
        {
            "storage.objects.create",
            "storage.objects.delete",
            "storage.objects.get",
            "storage.objects.list",
            "storage.objects.restore",
            "storage.objects.update",
            "storage.multipartUploads.abort",
            "storage.multipartUploads.create",
            "storage.multipartUploads.list",
            "storage.multipartUploads.listParts",
            "storage.managedFolders.create",
            "storage.managedFolders.delete",
            "storage.managedFolders.get",
            "storage.managedFolders.list",
            "storage.folders.create",
            "storage.folders.delete",
            "storage.folders.get",
            "storage.folders.list",
            "storage.folders.rename",
        }
    ),
    "roles/storage.objectViewer": frozenset(
        {
            "storage.objects.get",
            "storage.objects.list",
            "storage.folders.get",
            "storage.folders.list",
        }
    ),
}


@dataclass(frozen=True)
class Statement:
    effect: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    #: (test, variable, values) triples, all of which must hold.
    conditions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class S3Policy:
    """An identity policy: allowed when an Allow statement matches and no Deny does."""

    statements: tuple[Statement, ...]

    def allows(self, action: str, resource: str, context: dict[str, str]) -> bool:
        matching = [s for s in self.statements if _statement_matches(s, action, resource, context)]
        return any(s.effect == "Allow" for s in matching) and not any(
            s.effect == "Deny" for s in matching
        )


def _iam_glob(pattern: str, value: str, *, case: bool = True) -> bool:
    # IAM wildcards: * (any run, "/" included) and ?; nothing else is special.
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case else re.IGNORECASE) is not None


def _statement_matches(s: Statement, action: str, resource: str, context: dict[str, str]) -> bool:
    if not any(_iam_glob(a, action, case=False) for a in s.actions):
        return False
    if not any(_iam_glob(r, resource) for r in s.resources):
        return False
    for test, variable, values in s.conditions:
        if variable not in context:
            return False  # a condition on a key the request lacks does not hold
        got = context[variable]
        if test == "StringLike":
            ok = any(_iam_glob(v, got) for v in values)
        elif test == "StringEquals":
            ok = got in values
        else:
            raise ValueError(f"condition operator {test!r} is not modelled by the IAM proxy")
        if not ok:
            return False
    return True


def _load_hcl_dir(module: Path) -> dict[str, list[Any]]:
    import hcl2  # test extra

    options = hcl2.SerializationOptions(
        strip_string_quotes=True, explicit_blocks=False, with_comments=False
    )
    merged: dict[str, list[Any]] = {}
    for path in sorted(module.glob("*.tf")):
        with path.open(encoding="utf-8") as f:
            for key, blocks in hcl2.load(f, serialization_options=options).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def _interpolate(text: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise ValueError(f"the IAM proxy cannot resolve ${{{name}}} in {text!r}")
        return _interpolate(values[name], values)

    return re.sub(r"\$\{([^}]+)\}", one, text)


def s3_policy_from_terraform(module: Path, *, bucket: str, checkpoint_prefix: str) -> S3Policy:
    """The ``training`` policy document of the S3 module, for one bucket and prefix."""
    config = _load_hcl_dir(module)
    values = {"aws_s3_bucket.this.arn": f"arn:aws:s3:::{bucket}"}
    values["var.checkpoint_prefix"] = checkpoint_prefix
    for block in config.get("locals", []):
        values.update({f"local.{k}": v for k, v in block.items()})
    documents = [
        body["training"]
        for entry in config.get("data", [])
        for kind, body in entry.items()
        if kind == "aws_iam_policy_document" and "training" in body
    ]
    if len(documents) != 1:
        raise ValueError(f"{module} has no single aws_iam_policy_document.training")
    statements = []
    for raw in documents[0]["statement"]:
        conditions = tuple(
            (
                c["test"],
                c["variable"],
                tuple(_interpolate(v, values) for v in c["values"]),
            )
            for c in raw.get("condition", [])
        )
        statements.append(
            Statement(
                effect=raw.get("effect", "Allow"),
                actions=tuple(raw["actions"]),
                resources=tuple(_interpolate(r, values) for r in raw["resources"]),
                conditions=conditions,
            )
        )
    return S3Policy(tuple(statements))


def gcs_role_from_terraform(module: Path) -> tuple[str, frozenset[str]]:
    """The role the GCS module binds to the training identity, and its permissions."""
    config = _load_hcl_dir(module)
    roles = [
        body["role"]
        for entry in config.get("resource", [])
        for body in entry.get("google_storage_bucket_iam_member", {}).values()
    ]
    if len(roles) != 1:
        raise ValueError(f"{module} does not bind exactly one role: {roles}")
    if roles[0] not in GCS_ROLE_PERMISSIONS:
        raise ValueError(f"the IAM proxy does not know the permissions of {roles[0]}")
    return roles[0], GCS_ROLE_PERMISSIONS[roles[0]]


# ------------------------------------------------------------------ request -> permission
S3_BUCKET_SUBRESOURCES = {
    "location": "s3:GetBucketLocation",
    "lifecycle": "s3:GetLifecycleConfiguration",
    "versioning": "s3:GetBucketVersioning",
    "policy": "s3:GetBucketPolicy",
    "acl": "s3:GetBucketAcl",
    "tagging": "s3:GetBucketTagging",
    "uploads": "s3:ListBucketMultipartUploads",
    "cors": "s3:GetBucketCORS",
    "encryption": "s3:GetEncryptionConfiguration",
}
_S3_OBJECT_SUBRESOURCES = {
    ("GET", "tagging"): "s3:GetObjectTagging",
    ("PUT", "tagging"): "s3:PutObjectTagging",
    ("GET", "acl"): "s3:GetObjectAcl",
    ("PUT", "acl"): "s3:PutObjectAcl",
    ("GET", "attributes"): "s3:GetObjectAttributes",
    ("GET", "uploadId"): "s3:ListMultipartUploadParts",
    ("POST", "restore"): "s3:RestoreObject",
}


def s3_permissions(
    method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
) -> list[tuple[str, str, dict[str, str]]]:
    """(action, resource ARN, condition context) the S3 request needs, path-style."""
    bucket, _, key = unquote(path.lstrip("/")).partition("/")
    method = "GET" if method == "HEAD" else method
    if not bucket:
        return [("s3:ListAllMyBuckets", "*", {})]
    arn = f"arn:aws:s3:::{bucket}"
    if not key:
        if method == "POST" and "delete" in query:
            keys = [k.text or "" for k in ET.fromstring(body).iter() if k.tag.endswith("Key")]
            return [("s3:DeleteObject", f"{arn}/{k}", {}) for k in keys]
        if method == "GET":
            for sub, action in S3_BUCKET_SUBRESOURCES.items():
                if sub in query:
                    return [(action, arn, {})]
            context = {"s3:prefix": query["prefix"]} if "prefix" in query else {}
            return [("s3:ListBucket", arn, context)]
        return [
            ({"PUT": "s3:CreateBucket", "DELETE": "s3:DeleteBucket"}.get(method, "s3:?"), arn, {})
        ]
    for (m, sub), action in _S3_OBJECT_SUBRESOURCES.items():
        if m == method and sub in query and not (sub == "uploadId" and "partNumber" in query):
            return [(action, f"{arn}/{key}", {})]
    if method == "DELETE":
        action = "s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject"
        return [(action, f"{arn}/{key}", {})]
    if method in ("PUT", "POST"):
        needs = [("s3:PutObject", f"{arn}/{key}", {})]
        source = headers.get("x-amz-copy-source")
        if source:
            needs.append(("s3:GetObject", "arn:aws:s3:::" + unquote(source.lstrip("/")), {}))
        return needs
    return [("s3:GetObject", f"{arn}/{key}", {})]


_GCS_OBJECT = re.compile(r"^/(?:download/)?storage/v1/b/([^/]+)/o/([^/]+)(/.*)?$")


def gcs_permissions(method: str, path: str, body: bytes) -> list[tuple[str, str]]:
    """(permission, resource) the GCS JSON API request needs."""
    if path.startswith("/batch/storage/v1"):
        inner = re.findall(rb"^(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.1", body, re.M)
        out: list[tuple[str, str]] = []
        for m, p in inner:
            out += gcs_permissions(m.decode(), urlsplit(p.decode()).path, b"")
        return out or [("storage.batch.empty", path)]
    if path.startswith("/upload/storage/v1/b/"):
        return [("storage.objects.create", path.split("/")[5])]
    match = _GCS_OBJECT.match(path)
    if match:
        bucket, obj, rest = match.group(1), unquote(match.group(2)), match.group(3) or ""
        resource = f"{bucket}/{obj}"
        if rest.startswith(("/rewriteTo/", "/copyTo/")):
            dst = rest.split("/")
            return [("storage.objects.get", resource), ("storage.objects.create", dst[3])]
        if rest:
            return [(f"storage.objects.{rest.strip('/')}", resource)]
        return [
            (
                {
                    "GET": "storage.objects.get",
                    "DELETE": "storage.objects.delete",
                    "PATCH": "storage.objects.update",
                    "PUT": "storage.objects.update",
                }.get(method, "storage.objects.?"),
                resource,
            )
        ]
    parts = path.strip("/").split("/")  # storage v1 b <bucket> [o|iam|...]
    if parts[:3] == ["storage", "v1", "b"]:
        if len(parts) == 3:
            return [("storage.buckets.list" if method == "GET" else "storage.buckets.create", "")]
        if len(parts) == 5 and parts[4] == "o":
            if method == "POST":
                return [("storage.objects.create", parts[3])]
            return [("storage.objects.list", parts[3])]
        if len(parts) == 4:
            action = {"GET": "get", "DELETE": "delete"}.get(method, "update")
            return [(f"storage.buckets.{action}", parts[3])]
        return [(f"storage.buckets.{parts[4]}", parts[3])]
    return [("storage.unknown", path)]
