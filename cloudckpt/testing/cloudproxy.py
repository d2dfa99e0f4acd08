"""A reverse proxy that answers like the real clouds where the emulators do not.

:class:`CloudProxy` sits in front of a local S3 or GCS server and, per option:

* **IAM** (``s3_policy``, ``gcs_permissions_granted``): forwards only the
  requests the training identity of the terraform modules may make, and
  answers the rest with the 403 the cloud sends (S3 ``AccessDenied`` XML, no
  body for HEAD; GCS JSON ``forbidden``). The permissions are read from the
  modules themselves (see :mod:`cloudckpt.testing.cloudiam`), so module and proxy
  cannot drift.
* **page cap** (``page_size``): rewrites ``max-keys`` / ``maxResults`` of every
  listing down to the cap, so every listing must follow continuation tokens.
* **conflicts and throttling** (``conflict_rate``, ``throttle_rate``): answers a
  share of S3 conditional PUTs with ``409 ConditionalRequestConflict`` and a
  share of requests with S3 ``503 SlowDown`` or GCS ``429``/``503`` carrying
  ``Retry-After``, without forwarding them (the request did not take effect).
* **precondition strip** (``strip_preconditions``): drops ``If-None-Match`` and
  ``ifGenerationMatch`` on the way up, as a store that ignores them would;
  ``refuse_preconditions`` answers an S3 conditional PUT ``501 NotImplemented``,
  as S3 did before August 2024 and some S3-compatible stores still do.
* **GCS conditional deletes** (``gcs_conditional_deletes``): fake-gcs-server
  ignores ``ifGenerationMatch`` on DELETE; real GCS answers 412 when the live
  generation differs. The proxy reads the object's generation and answers
  that 412 itself, with every GCS write and delete through it forwarded one
  at a time, so nothing changes the object between its read and the delete.

Rewritten S3 requests are signed again with the upstream's credentials
(``s3_credentials``; by default this process's ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, which ``LocalServers.env`` sets), since the
upstream verifies SigV4 over the query and headers. The TLS-only bucket
policy is not modelled: the test channel is plain HTTP on loopback.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode
from xml.sax.saxutils import escape as xml_escape

from cloudckpt.testing.cloudiam import (
    S3_BUCKET_SUBRESOURCES,
    S3Policy,
    gcs_permissions,
    s3_permissions,
)
from cloudckpt.testing.faultproxy import LoopbackProxy
from cloudckpt.testing.servers import S3_REGION, S3Credentials


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


class CloudProxy(LoopbackProxy):
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
        refuse_preconditions: bool = False,
        gcs_conditional_deletes: bool = False,
        seed: int = 0,
        s3_credentials: S3Credentials | None = None,
    ) -> None:
        super().__init__(upstream, flavor)
        self.s3_credentials = s3_credentials
        self.s3_policy = s3_policy
        self.gcs_granted = gcs_permissions_granted
        self.page_size = page_size
        self.conflict_rate = conflict_rate
        self.throttle_rate = throttle_rate
        self.retry_after_s = retry_after_s
        self.strip_preconditions = strip_preconditions
        self.refuse_preconditions = refuse_preconditions
        self.gcs_conditional_deletes = gcs_conditional_deletes
        self._writes: Any = None  # an asyncio.Lock, made on the proxy's own loop
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.phase = "-"

    @property
    def phase_url(self) -> str:
        return self.endpoint + PHASE_PATH.rstrip("/")

    def _credentials(self) -> S3Credentials:
        """What the upstream S3 server accepts (see the module docstring)."""
        if self.s3_credentials is not None:
            return self.s3_credentials
        try:
            return S3Credentials(
                os.environ["AWS_ACCESS_KEY_ID"],
                os.environ["AWS_SECRET_ACCESS_KEY"],
                os.environ.get("AWS_REGION", S3_REGION),
            )
        except KeyError:
            raise RuntimeError(
                "CloudProxy re-signs rewritten S3 requests: pass s3_credentials=, or set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (LocalServers.env does)"
            ) from None

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
                bool(bucket) and not key and not any(sub in query for sub in S3_BUCKET_SUBRESOURCES)
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

        if (
            self.flavor == "s3"
            and self.s3_policy is not None
            and method == "POST"
            and "delete" in query
            and "/" not in path.strip("/")
        ):
            return await self._delete_objects(path, query, headers, body, request.query_string)
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
        if self.flavor == "s3" and method == "PUT" and conditional and self.refuse_preconditions:
            message = "A header you provided implies functionality that is not implemented"
            return answer(501, s3_error("NotImplemented", message, path))
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

        if self.gcs_conditional_deletes and self.flavor == "gcs" and method != "GET":
            status, out_headers, payload = await self._gcs_write(
                method, path, query, headers, body, request.query_string, rewritten
            )
        else:
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

    async def _delete_objects(
        self, path: str, query: dict[str, str], headers: dict[str, str], body: bytes, raw: str
    ) -> Any:
        """S3 DeleteObjects: each key is authorised alone, and a refused key is an
        ``AccessDenied`` entry in a 200 answer, never a 403 (as AWS does)."""
        from aiohttp import web

        assert self.s3_policy is not None
        bucket = unquote(path.strip("/"))
        root = ET.fromstring(body)
        keys = [el.text or "" for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Key"]
        quiet = any(
            el.tag.rsplit("}", 1)[-1] == "Quiet" and (el.text or "").strip() == "true"
            for el in root.iter()
        )
        refused = []
        for key in keys:
            if self.s3_policy.allows("s3:DeleteObject", f"arn:aws:s3:::{bucket}/{key}", {}):
                self.stats.allowed["s3:DeleteObject"] += 1
                self._file("s3:DeleteObject")
            else:
                refused.append(key)
                self.stats.denied["s3:DeleteObject"] += 1
                self._file("DENIED s3:DeleteObject")
        if not refused:
            status, out_headers, payload = await self._forward(
                "POST", path, query, headers, body, raw, False
            )
            return web.Response(status=status, body=payload, headers=out_headers)
        kept = [k for k in keys if k not in refused]
        result = '<DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></DeleteResult>'
        if kept:
            objects = "".join(f"<Object><Key>{xml_escape(k)}</Key></Object>" for k in kept)
            new_body = (
                '<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Quiet>{'true' if quiet else 'false'}</Quiet>{objects}</Delete>"
            ).encode()
            headers = {
                k: v
                for k, v in headers.items()
                if k != "content-md5" and not k.startswith(("x-amz-checksum", "x-amz-sdk-checksum"))
            }
            headers["content-md5"] = base64.b64encode(hashlib.md5(new_body).digest()).decode()
            status, _, payload = await self._forward(
                "POST", path, query, headers, new_body, raw, True
            )
            if status != 200:
                return web.Response(status=status, body=payload, content_type="application/xml")
            result = payload.decode()
        errors = "".join(
            f"<Error><Key>{xml_escape(k)}</Key><Code>AccessDenied</Code>"
            "<Message>Access Denied</Message></Error>"
            for k in refused
        )
        merged = result.replace("</DeleteResult>", errors + "</DeleteResult>")
        return web.Response(status=200, text=merged, content_type="application/xml")

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

    async def _gcs_write(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: bytes,
        raw_query: str,
        rewritten: bool,
    ) -> tuple[int, dict[str, str], bytes]:
        """A GCS write or delete, one at a time; a DELETE's ifGenerationMatch honoured."""
        import asyncio

        if self._writes is None:
            self._writes = asyncio.Lock()
        async with self._writes:
            wanted = query.get("ifGenerationMatch")
            if method == "DELETE" and wanted is not None:
                status, _, meta = await self._forward("GET", path, {}, headers, b"", "", False)
                if status == 200 and str(json.loads(meta).get("generation")) != wanted:
                    with self._lock:
                        self.stats.injected["412"] += 1
                    reason = "At least one of the pre-conditions you specified did not hold."
                    json_type = {"Content-Type": "application/json"}
                    return 412, json_type, gcs_error(412, "conditionNotMet", reason)
            return await self._forward(method, path, query, headers, body, raw_query, rewritten)

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
                headers = _resign_s3(method, url, headers, body, self._credentials())
        else:
            url = self.upstream + path + (f"?{raw_query}" if raw_query else "")
        return await self._upstream(method, yarl.URL(url, encoded=True), headers, body)


def _resign_s3(
    method: str, url: str, headers: dict[str, str], body: bytes, credentials: S3Credentials
) -> dict[str, str]:
    """Headers for ``url`` signed again (SigV4) with ``credentials``."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    unsigned = ("authorization", "x-amz-date", "x-amz-content-sha256", "host", "expect")
    kept = {k: v for k, v in headers.items() if k not in unsigned}
    request = AWSRequest(method=method, url=url, data=body, headers=kept)
    signer = Credentials(credentials.access_key, credentials.secret_key)
    S3SigV4Auth(signer, "s3", credentials.region).add_auth(request)
    return dict(request.headers.items())
