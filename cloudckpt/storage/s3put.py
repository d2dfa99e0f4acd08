"""Direct S3 PUTs of caller-owned buffers: SigV4 over UNSIGNED-PAYLOAD, a CRC32C, aiohttp.

The S3 backend's other requests go through s3fs (aiobotocore), and array
chunks used to go through tensorstore: over plain HTTP both sign the SHA-256
of every body (botocore also adds a CRC32 computed in Python), which on a
small host costs as much CPU as the transfer. This channel signs the request
headers only (``X-Amz-Content-SHA256: UNSIGNED-PAYLOAD``, botocore's own
``S3SigV4Auth``, never a hand-written signer) and protects the body with an
``x-amz-checksum-crc32c`` header instead: hardware crc32c, several GB/s.

The checksum is verified by the store: AWS S3 documents it, and SeaweedFS
(measured with 4.48, ``tests/test_direct_writes.py``) answers a body that
does not match it with ``400 BadDigest`` and stores nothing. Over TLS that
is the integrity AWS's own SDKs settle for. A store that ignored the header
would still leave nothing unprotected: every chunk and pack entry carries
the crc32c of cloudckpt's format, checked on every read.

Bodies are sent from the caller's buffers (memoryviews, never joined into one
``bytes``), a slice at a time with the transport drained in between, so
a PUT holds at most one slice of extra memory however large its object.
Credentials go into the ``Authorization`` header only; nothing here logs a
header or puts one into an exception.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import re
import urllib.request
import weakref
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import crc32c
import yarl
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from cloudckpt.storage.redact import redact

#: The kind (``Backend.latencies``) direct writes are judged by, apart from small requests.
DIRECT_WRITES = "direct write"
#: Requests in flight per event loop: the raw channel's and tensorstore's concurrency.
CONNECTIONS = 64
#: Bytes handed to the transport at once: what a PUT holds beyond the caller's buffers.
SLICE_BYTES = 1 << 20
#: Bodies at least this large get their crc32c computed off the event loop.
_THREAD_CRC_BYTES = 1 << 20
#: Bytes of an error answer read (S3's XML errors are a few hundred).
_ERROR_BODY_BYTES = 1 << 16

_CODE = re.compile(r"<Code>([A-Za-z0-9._-]{1,64})</Code>")
_MESSAGE = re.compile(r"<Message>([^<]{0,300})</Message>")


class S3PutError(OSError):
    """A PUT the store answered with an error status.

    Carries what the retry policy reads (``status``, ``error_code``,
    ``retry_after``); its text holds the store's error code and message, never
    a header, a signature or the rest of the answer (S3's
    ``SignatureDoesNotMatch`` echoes the string it signed).
    """

    def __init__(
        self, message: str, status: int, error_code: str | None, retry_after: str | None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.retry_after = retry_after


class BufferPayload(Payload):
    """An aiohttp request body made of the caller's buffers, sent slice by slice, never copied.

    Reusable: a retry or a hedge sends the same buffers again.
    """

    _autoclose = True

    def __init__(self, buffers: Sequence[memoryview]) -> None:
        # Flat byte views (C-contiguous buffers cast to bytes, as aiohttp writes them).
        views = [b if b.format == "B" and b.ndim == 1 else b.cast("B") for b in buffers]
        super().__init__(views, content_type="application/octet-stream")
        self._views = views
        self._total = sum(v.nbytes for v in views)
        self._size = self._total

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a checkpoint object's body is binary")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        left = self._total if content_length is None else min(content_length, self._total)
        for view in self._views:
            for at in range(0, view.nbytes, SLICE_BYTES):
                if left <= 0:
                    return
                piece = view[at : at + min(SLICE_BYTES, left)]
                left -= piece.nbytes
                # aiohttp drains the transport after every write above 64 KiB:
                # asyncio then buffers at most the unsent rest of this slice.
                await writer.write(piece)


def crc32c_of(buffers: Sequence[memoryview]) -> int:
    """The crc32c of the buffers joined."""
    value = 0
    for view in buffers:
        value = crc32c.crc32c(view, value=value)
    return value


def checksum_header(value: int) -> str:
    """The ``x-amz-checksum-crc32c`` value of a crc32c: base64 of its 4 big-endian bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode()


async def body_crc32c(buffers: Sequence[memoryview]) -> int:
    """:func:`crc32c_of`, off the event loop for large bodies (crc32c releases the GIL)."""
    if sum(b.nbytes for b in buffers) < _THREAD_CRC_BYTES:
        return crc32c_of(buffers)
    return await asyncio.to_thread(crc32c_of, buffers)


def object_url(endpoint: str, bucket: str, key: str, *, virtual_host: bool) -> str:
    """The URL of ``bucket/key`` at ``endpoint``, each path segment percent-encoded once.

    Path style (``endpoint/bucket/key``) for S3-compatible endpoints, which is
    what they serve; virtual-hosted (``bucket.host/key``) for AWS, as botocore
    addresses a DNS-compatible bucket. The key is a literal string: ``?``,
    ``#``, ``%`` and the like are sent encoded, never interpreted.
    """
    parts = urlsplit(endpoint.rstrip("/"))
    encoded = quote(key, safe="/~")
    if virtual_host:
        return f"{parts.scheme}://{bucket}.{parts.netloc}{parts.path}/{encoded}"
    return f"{parts.scheme}://{parts.netloc}{parts.path}/{quote(bucket, safe='')}/{encoded}"


def dns_compatible(bucket: str) -> bool:
    """Whether ``bucket`` can be a host name label under TLS (no dots, lower case, 3-63)."""
    return re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", bucket) is not None


def sign(
    url: str, headers: dict[str, str], credentials: Any, region: str, method: str = "PUT"
) -> dict[str, str]:
    """``headers`` plus SigV4's (``Authorization``, ``X-Amz-Date``, session token) for ``method``.

    ``credentials``: botocore's frozen credentials (``access_key``,
    ``secret_key``, ``token``), or None for an anonymous request. The body is
    declared ``UNSIGNED-PAYLOAD``: only the headers are hashed.
    """
    if credentials is None:
        return dict(headers)
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    request = AWSRequest(method=method, url=url, headers=dict(headers))
    request.context["client_config"] = _unsigned_payload_config()
    S3SigV4Auth(credentials, "s3", region).add_auth(request)
    return dict(request.headers.items())


@functools.cache
def _unsigned_payload_config() -> Any:
    """botocore's client config that makes its S3 signer use UNSIGNED-PAYLOAD, also over HTTP.

    Built once: a ``Config`` merges its options on every construction.
    """
    from botocore.config import Config

    return Config(s3={"payload_signing_enabled": False})


def proxy_for(url: yarl.URL) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``NO_PROXY``, ...), if any.

    As botocore and tensorstore's curl do. Not aiohttp's ``trust_env``: that
    would also take a ``~/.netrc`` login for the host in place of the signature.
    """
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme)
    if not proxy or urllib.request.proxy_bypass(url.host or ""):
        return None
    return proxy


class Sessions:
    """One backend's sessions of this channel, one per event loop (a session belongs to its loop)."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )

    def session(self) -> aiohttp.ClientSession:
        """The running loop's session, opened on first use."""
        loop = asyncio.get_running_loop()
        session = self._by_loop.get(loop)
        if session is None or session.closed:
            session = self._by_loop[loop] = new_session()
        return session  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Closes the running loop's session, if it has one."""
        session = self._by_loop.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()


async def target(
    fs: Any,
    endpoint_url: str | None,
    region: str | None,
    bucket: str,
    key: str,
    anonymous: bool,
    op: str = "write",
) -> tuple[str, Any, str]:
    """The URL of ``bucket/key``, the credentials to sign with (None: anonymous), the region.

    ``fs`` is the backend's s3fs client: the same endpoint, region and
    credentials as every other request (resolved from the options and the
    AWS chain). Credentials are read per request, so refreshed ones are used
    as soon as botocore has them.
    """
    meta = fs.s3.meta
    endpoint = endpoint_url or meta.endpoint_url
    signing_region = region or meta.region_name or "us-east-1"
    virtual = endpoint_url is None and dns_compatible(bucket)
    url = object_url(endpoint, bucket, key, virtual_host=virtual)
    if anonymous:
        return url, None, signing_region
    found = await fs.session.get_credentials()
    if found is None:
        raise PermissionError(
            f"cannot {op} s3://{bucket}/{key}: no credentials found in the AWS credential "
            "chain; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role"
        )
    frozen = found.get_frozen_credentials()
    if inspect.isawaitable(frozen):  # aiobotocore's credentials
        frozen = await frozen
    return url, frozen, signing_region


def new_session() -> aiohttp.ClientSession:
    """A session for this channel, bound to the running loop: :data:`CONNECTIONS` connections."""
    connector = aiohttp.TCPConnector(limit=CONNECTIONS, limit_per_host=CONNECTIONS)
    return aiohttp.ClientSession(
        connector=connector,
        # Deadlines bound each attempt (Backend._bounded); these only catch a dead socket.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=None),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def put(
    session: aiohttp.ClientSession,
    url: str,
    buffers: Sequence[memoryview],
    headers: dict[str, str],
    where: str,
) -> None:
    """One PUT of ``buffers`` to ``url``; :class:`S3PutError` on an error answer.

    ``where`` names the object in errors (``s3://bucket/key``): the URL is
    never repeated. ``400 BadDigest`` (the body arrived other than it was
    sent: the buffers are immutable while they are written) is a
    ``ConnectionError``, which the retry policy repeats.
    """
    # Sent exactly as signed: yarl would otherwise resolve ``..`` segments and
    # decode escapes such as ``%41``, and the store would see another key.
    address = yarl.URL(url, encoded=True)
    async with session.put(
        address,
        data=BufferPayload(buffers),
        headers=headers,
        allow_redirects=False,
        proxy=proxy_for(address),
    ) as response:
        if response.status < 300:
            await response.read()
            return
        what, code = await error_of(response, "PUT", where)
        if code == "BadDigest":
            raise ConnectionError(f"{what} (the bytes were damaged on the way; sent again)")
        raise S3PutError(what, response.status, code, response.headers.get("Retry-After"))


async def error_of(
    response: aiohttp.ClientResponse, method: str, where: str
) -> tuple[str, str | None]:
    """An error answer's redacted description (method, object, status, S3 code and message), its code.

    Only the ``<Code>`` and ``<Message>`` of the body are kept: the rest (and
    every header) may echo what was signed.
    """
    body = await response.content.read(_ERROR_BODY_BYTES)
    text = body.decode("utf-8", "replace")
    code_match, message_match = _CODE.search(text), _MESSAGE.search(text)
    code = code_match.group(1) if code_match else None
    message = message_match.group(1).strip() if message_match else ""
    what = redact(
        f"{method} {where}: HTTP {response.status}"
        + (f" {code}" if code else "")
        + (f": {message}" if message else "")
    )
    return what, code
