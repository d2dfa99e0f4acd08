"""Direct S3 ranged GETs streamed into caller buffers: the read side of :mod:`s3put`.

Restores read chunk data with ranged GETs whose bodies go from aiohttp's
receive buffers straight into the arrays handed to devices (or into sinks,
:mod:`cloudckpt.storage._stream`), never joined into one ``bytes``: the
same channel as direct writes (its sessions, botocore's ``S3SigV4Auth`` over
UNSIGNED-PAYLOAD, exact URLs, the environment's proxy). A GET has no body to
hash, so the signature costs only the headers; integrity comes from the
crc32c of every chunk and pack entry in cloudckpt's format, checked by the
reader.

Credentials go into the ``Authorization`` header only; errors carry the
store's code and message (redacted), never a header or the signed string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
import yarl

from cloudckpt.storage import s3put
from cloudckpt.storage._stream import Buffer, fill_from_range
from cloudckpt.storage.s3put import S3PutError, error_of, proxy_for

if TYPE_CHECKING:
    from cloudckpt.storage.s3 import S3Backend

#: The kind (``Backend.latencies``) direct reads are judged by, apart from small requests.
DIRECT_READS = "direct read"


class S3GetError(S3PutError):
    """A GET the store answered with an error status (``status``, ``error_code``, ...)."""


async def get_into(
    session: aiohttp.ClientSession,
    url: str,
    offset: int,
    buffers: list[Buffer],
    headers: dict[str, str],
    where: str,
) -> int:
    """One GET of bytes ``offset..`` of ``url`` streamed into ``buffers``; the bytes placed.

    ``headers`` are the signed ones and must include the ``Range`` that was
    signed (``range_header``). Fewer bytes than the buffers hold when the
    object ends first (none when it ends at or before ``offset``: 416).
    :class:`S3GetError` on an error answer; ``where`` names the object in it
    (``s3://bucket/key``), the URL is never repeated.
    """
    # Sent exactly as signed (see s3put.put).
    address = yarl.URL(url, encoded=True)
    async with session.get(
        address, headers=headers, allow_redirects=False, proxy=proxy_for(address)
    ) as response:
        if response.status == 416:  # the range starts at or after the end
            await response.read()
            return 0
        if response.status >= 300:
            what, code = await error_of(response, "GET", where)
            raise S3GetError(what, response.status, code, response.headers.get("Retry-After"))
        return await fill_from_range(response, buffers, offset, where, "S3")


def range_header(offset: int, nbytes: int) -> dict[str, str]:
    """The ``Range`` header of ``nbytes`` (> 0) bytes from ``offset``."""
    return {"Range": f"bytes={offset}-{offset + nbytes - 1}"}


async def read_into(
    backend: S3Backend, path: str, offset: int, buffers: list[Buffer]
) -> int | None:
    """``S3Backend.read_into``: ``path`` from ``offset`` streamed into ``buffers``.

    One ranged GET signed with the backend's endpoint, region and
    credentials (as s3fs resolved them, read per request) over the
    backend's direct-channel sessions. Returns the bytes placed (fewer than
    the buffers hold when the object ends first), or None when the object
    does not exist; a missing bucket is a ``FileNotFoundError`` naming it, a
    refusal a ``PermissionError`` naming the credential source (the
    backend's ``_translate``). Retried and hedged as ``get`` is (named
    ``read`` in errors), judged by the answer times of direct reads
    (``latencies(DIRECT_READS)``). Only the first request writes into
    ``buffers``; a hedge or a retry reads into memory of its own, copied in
    once it has won (by then every other request of the read is stopped).
    """
    want = sum(b.nbytes for b in buffers)
    bucket, key = backend._split(path)
    where = backend.url(path)

    async def request(into: list[Buffer]) -> int:
        url, credentials, region = await s3put.target(
            await backend._fs(),
            backend.endpoint_url,
            backend.region,
            bucket,
            key,
            backend.anon,
            "read",
        )
        headers = s3put.sign(url, range_header(offset, want), credentials, region, "GET")
        try:
            return await get_into(backend._direct.session(), url, offset, into, headers, where)
        except S3GetError as exc:
            if exc.status == 404:  # the object or its bucket: told apart by the caller
                missing = FileNotFoundError(str(exc))
                missing.error_code = exc.error_code  # type: ignore[attr-defined]
                raise missing from None
            raise

    return await backend._ranged_read_into(path, buffers, request, DIRECT_READS)
