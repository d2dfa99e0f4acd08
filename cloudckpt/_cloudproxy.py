"""A reverse proxy that answers like the real clouds where the emulators do not.

:class:`CloudProxy` sits in front of a local S3 or GCS server and, per option:

* **IAM** (``iam``): forwards only the requests the training identity of the
  terraform modules may make, and answers the rest with the 403 the cloud
  sends (S3 ``AccessDenied`` XML, no body for HEAD; GCS JSON ``forbidden``).
  The permissions are read from the modules themselves (:func:`s3_policy_from_terraform`,
  :func:`gcs_role_from_terraform`), so module and proxy cannot drift.
* **page cap** (``page_size``): rewrites ``max-keys`` / ``maxResults`` of every
  listing down to the cap, so every listing must follow continuation tokens.
* **conflicts and throttling** (``conflict_rate``, ``throttle_rate``): answers a
  share of S3 conditional PUTs with ``409 ConditionalRequestConflict`` and a
  share of requests with S3 ``503 SlowDown`` or GCS ``429``/``503`` carrying
  ``Retry-After``, without forwarding them (the request did not take effect).
* **precondition strip** (``strip_preconditions``): drops ``If-None-Match`` and
  ``ifGenerationMatch`` on the way up, as a store that ignores them would.

Rewritten S3 requests are signed again with the test credentials (the
upstream verifies SigV4 over the query and headers). The TLS-only bucket
policy is not modelled: the test channel is plain HTTP on loopback.

Not part of the public API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from cloudckpt._servers import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, free_port

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
_S3_BUCKET_SUBRESOURCES = {
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
            for sub, action in _S3_BUCKET_SUBRESOURCES.items():
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


# ----------------------------------------------------------------------------- answers
def s3_error(code: str, message: str, resource: str) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource>"
        f"<RequestId>{request_id}</RequestId><HostId>cloudckpt-proxy</HostId></Error>"
    ).encode()


def gcs_error(status: int, reason: str, message: str) -> bytes:
    error = {"code": status, "message": message}
    error["errors"] = [{"message": message, "domain": "global", "reason": reason}]  # type: ignore[list-item]
    return json.dumps({"error": error}).encode()


#: A client may GET ``PHASE_PATH + name`` to file later requests under that phase.
PHASE_PATH = "/__cloudckpt_phase__/"

S3_PRINCIPAL = "arn:aws:sts::123456789012:assumed-role/checkpoint-training/cloudckpt"
GCS_PRINCIPAL = "training@example-project.iam.gserviceaccount.com"


@dataclass
class ProxyStats:
    requests: int = 0
    #: Requests forwarded, by the permission they needed ("s3:GetObject", "storage.objects.list").
    allowed: Counter[str] = field(default_factory=Counter)
    #: Requests answered 403, by the permission that was missing.
    denied: Counter[str] = field(default_factory=Counter)
    #: Injected answers by kind ("409", "503", "429").
    injected: Counter[str] = field(default_factory=Counter)
    #: Listing pages served, and how many of them continued an earlier page.
    pages: int = 0
    continued_pages: int = 0
    #: Most keys any one forwarded listing page held.
    largest_page: int = 0
    #: (monotonic time, method, path with query, status) of every request.
    log: list[tuple[float, str, str, int]] = field(default_factory=list)
    #: Permission -> requests, per phase named by the client (see ``PHASE_PATH``);
    #: a denied one is filed as "DENIED <permission>".
    matrix: dict[str, Counter[str]] = field(default_factory=dict)


class CloudProxy:
    """See the module docstring. Use as a context manager; ``endpoint`` is where to point clients."""

    def __init__(
        self,
        upstream: str,
        *,
        flavor: str,
        s3_policy: S3Policy | None = None,
        gcs_permissions_granted: frozenset[str] | None = None,
        page_size: int | None = None,
        conflict_rate: float = 0.0,
        throttle_rate: float = 0.0,
        retry_after_s: int | None = None,
        strip_preconditions: bool = False,
        seed: int = 0,
    ) -> None:
        if flavor not in ("s3", "gcs"):
            raise ValueError(f"flavor must be 's3' or 'gcs', got {flavor!r}")
        self.flavor = flavor
        self.upstream = upstream.rstrip("/")
        self.s3_policy = s3_policy
        self.gcs_granted = gcs_permissions_granted
        self.page_size = page_size
        self.conflict_rate = conflict_rate
        self.throttle_rate = throttle_rate
        self.retry_after_s = retry_after_s
        self.strip_preconditions = strip_preconditions
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: Any = None
        self._session: Any = None
        self.phase = "-"

    @property
    def phase_url(self) -> str:
        return self.endpoint + PHASE_PATH.rstrip("/")

    def _file(self, permission: str) -> None:
        with self._lock:
            self.stats.matrix.setdefault(self.phase, Counter())[permission] += 1

    # ------------------------------------------------------------------ decisions
    def _roll(self, rate: float) -> bool:
        with self._lock:
            return rate > 0 and self._rng.random() < rate

    def _denied(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> tuple[str, str] | None:
        """The first (permission, resource) the request lacks, or None when it may go."""
        if self.flavor == "s3":
            if self.s3_policy is None:
                return None
            for action, resource, context in s3_permissions(method, path, query, headers, body):
                if not self.s3_policy.allows(action, resource, context):
                    return action, resource
                self.stats.allowed[action] += 1
                self._file(action)
            return None
        if self.gcs_granted is None:
            return None
        for permission, resource in gcs_permissions(method, path, body):
            if permission not in self.gcs_granted:
                return permission, resource
            self.stats.allowed[permission] += 1
            self._file(permission)
        return None

    def _is_listing(self, method: str, path: str, query: dict[str, str]) -> bool:
        if method != "GET":
            return False
        if self.flavor == "s3":
            bucket, _, key = path.lstrip("/").partition("/")
            return (
                bool(bucket)
                and not key
                and not any(sub in query for sub in _S3_BUCKET_SUBRESOURCES)
            )
        return re.fullmatch(r"/storage/v1/b/[^/]+/o", path) is not None

    # ------------------------------------------------------------------- handler
    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        # The raw path: GCS object names carry %2F, which decoding would turn into segments.
        method, path = request.method, request.rel_url.raw_path
        if path.startswith(PHASE_PATH):
            self.phase = path[len(PHASE_PATH) :]
            return web.Response(status=204)
        query = dict(parse_qsl(request.query_string, keep_blank_values=True))
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            self.stats.requests += 1

        def answer(status: int, payload: bytes, extra: dict[str, str] | None = None) -> Any:
            with self._lock:
                self.stats.log.append((time.monotonic(), method, request.path_qs, status))
            kind = "application/xml" if self.flavor == "s3" else "application/json"
            if method == "HEAD":
                return web.Response(status=status, headers=extra)
            return web.Response(status=status, body=payload, content_type=kind, headers=extra)

        denied = self._denied(method, path, query, headers, body)
        if denied is not None:
            permission, resource = denied
            with self._lock:
                self.stats.denied[permission] += 1
            self._file(f"DENIED {permission}")
            if self.flavor == "s3":
                message = (
                    f"User: {S3_PRINCIPAL} is not authorized to perform: {permission} on "
                    f'resource: "{resource}" because no identity-based policy allows the '
                    f"{permission} action"
                )
                return answer(403, s3_error("AccessDenied", message, path))
            message = (
                f"{GCS_PRINCIPAL} does not have {permission} access to the Google Cloud Storage "
                f"{'object' if '.objects.' in permission else 'bucket'}. Permission "
                f"'{permission}' denied on resource (or it may not exist)."
            )
            return answer(403, gcs_error(403, "forbidden", message))

        conditional = "if-none-match" in headers or "ifGenerationMatch" in query
        if (
            self.flavor == "s3"
            and method == "PUT"
            and conditional
            and self._roll(self.conflict_rate)
        ):
            with self._lock:
                self.stats.injected["409"] += 1
            message = (
                "A conflicting conditional request is currently in progress against this "
                "resource. Please try again."
            )
            return answer(409, s3_error("ConditionalRequestConflict", message, path))
        if self._roll(self.throttle_rate):
            extra = (
                {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
            )
            if self.flavor == "s3":
                with self._lock:
                    self.stats.injected["503"] += 1
                return answer(
                    503, s3_error("SlowDown", "Please reduce your request rate.", path), extra
                )
            status = self._rng.choice((429, 503))
            with self._lock:
                self.stats.injected[str(status)] += 1
            reason = "rateLimitExceeded" if status == 429 else "backendError"
            return answer(status, gcs_error(status, reason, "injected"), extra)

        rewritten = False
        listing = self._is_listing(method, path, query)
        if listing and self.page_size is not None:
            name = "max-keys" if self.flavor == "s3" else "maxResults"
            asked = int(query.get(name, 1000))
            if asked > self.page_size or name not in query:
                query[name] = str(min(asked, self.page_size))
                rewritten = True
        if self.strip_preconditions:
            if self.flavor == "s3" and "if-none-match" in headers:
                headers.pop("if-none-match")
                rewritten = True
            if "ifGenerationMatch" in query:
                query.pop("ifGenerationMatch")
                rewritten = True

        status, out_headers, payload = await self._forward(
            method, path, query, headers, body, request.query_string, rewritten
        )
        if listing and status == 200:
            self._count_page(query, payload)
        with self._lock:
            self.stats.log.append((time.monotonic(), method, request.path_qs, status))
        if method == "HEAD":
            return web.Response(status=status, headers=out_headers)
        return web.Response(status=status, body=payload, headers=out_headers)

    def _count_page(self, query: dict[str, str], payload: bytes) -> None:
        if self.flavor == "s3":
            keys = payload.count(b"<Key>")
            continued = "continuation-token" in query or "marker" in query
        else:
            keys = len(json.loads(payload).get("items") or [])
            continued = "pageToken" in query
        with self._lock:
            self.stats.pages += 1
            self.stats.continued_pages += int(continued)
            self.stats.largest_page = max(self.stats.largest_page, keys)

    async def _forward(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
        raw_query: str,
        rewritten: bool,
    ) -> tuple[int, dict[str, str], bytes]:
        import yarl

        hop = ("content-length", "transfer-encoding", "connection")
        headers = {k: v for k, v in headers.items() if k not in hop}
        if rewritten:
            qs = urlencode(sorted(query.items()), quote_via=quote, safe="-_.~")
            url = f"{self.upstream}{path}" + (f"?{qs}" if qs else "")
            if self.flavor == "s3":
                headers = _resign_s3(method, url, headers, body)
        else:
            url = self.upstream + path + (f"?{raw_query}" if raw_query else "")
        async with self._session.request(
            method,
            yarl.URL(url, encoded=True),
            headers=headers,
            data=body,
            allow_redirects=False,
            auto_decompress=False,
        ) as upstream:
            payload = await upstream.read()
            dropped = ("transfer-encoding", "connection")
            if method != "HEAD":
                dropped += ("content-length",)
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in dropped}
            return upstream.status, out, payload

    # ------------------------------------------------------------------- lifecycle
    def start(self) -> CloudProxy:
        from aiohttp import ClientSession, TCPConnector, web

        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

        async def setup() -> None:
            self._session = ClientSession(
                connector=TCPConnector(limit=64), skip_auto_headers=("User-Agent",)
            )
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(setup(), self._loop).result(30)
        return self

    def stop(self) -> None:
        async def teardown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(teardown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> CloudProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _resign_s3(method: str, url: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
    """Headers for ``url`` signed again (SigV4) with the test credentials."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    unsigned = ("authorization", "x-amz-date", "x-amz-content-sha256", "host", "expect")
    kept = {k: v for k, v in headers.items() if k not in unsigned}
    request = AWSRequest(method=method, url=url, data=body, headers=kept)
    S3SigV4Auth(Credentials(S3_ACCESS_KEY, S3_SECRET_KEY), "s3", S3_REGION).add_auth(request)
    return dict(request.headers.items())
