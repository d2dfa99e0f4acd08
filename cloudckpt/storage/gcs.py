"""``gs://`` backend: Google Cloud Storage through gcsfs (aiohttp).

Configuration follows Google's conventions, explicit options first: endpoint
from ``endpoint_url`` or ``STORAGE_EMULATOR_HOST``; credentials from
``token`` or Application Default Credentials (anonymous against an
emulator). Conditional creation is a real ``ifGenerationMatch=0`` upload.

This module writes no environment variable. gcsfs gets every setting as an
argument. tensorstore's ``gcs`` driver has no endpoint in its spec or context:
it reads ``TENSORSTORE_GCS_HTTP_URL`` (and, against an emulator,
``GOOGLE_AUTH_TOKEN_FOR_TESTING``) from the environment when it opens a
store. So a backend whose endpoint is not the one tensorstore will use refuses to
hand out a kvstore spec, naming the variables to set
(:func:`tensorstore_environment`), rather than changing the process's
environment behind its other users.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import os
import uuid
from typing import Any
from urllib.parse import quote

# gcsfs.GCSFileSystem is, unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set
# before gcsfs was imported, the experimental ExtendedGcsFileSystem, whose every
# bucket call first waits out a 60 s gRPC probe for hierarchical-namespace
# buckets (fatal against an emulator). The core class has no such probe; it is
# named here so that no environment variable has to be set on import.
from gcsfs.core import GCSFileSystem as _CoreGCSFileSystem
from gcsfs.retry import validate_response

from atomicity import ObjectInfo, Versioned
from cloudckpt.storage._fsspec import FsspecObjectBackend, _mtime
from cloudckpt.storage._stream import Buffer, fill_from_range
from cloudckpt.storage.base import CREATE_TOKEN_KEY, BucketSettings
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.storage.retry import RetryPolicy

_TS_URL_VAR = "TENSORSTORE_GCS_HTTP_URL"
_TS_TOKEN_VAR = "GOOGLE_AUTH_TOKEN_FOR_TESTING"
#: The JSON API endpoint gcsfs and tensorstore use when none is configured.
DEFAULT_ENDPOINT = "https://storage.googleapis.com"


def tensorstore_environment(endpoint: str) -> dict[str, str]:
    """The environment that points tensorstore's ``gcs`` driver at ``endpoint``.

    Apply it before the process opens ``gs://`` arrays (in a launcher, a job
    spec, or ``os.environ.update`` at start-up): tensorstore takes its GCS
    endpoint from the environment only, so all of a process's GCS arrays go
    to one endpoint. Against an
    emulator (any endpoint but Google's) it also tells tensorstore not to look
    for Google credentials.
    """
    endpoint = _normalise_endpoint(endpoint)
    env = {_TS_URL_VAR: endpoint}
    if endpoint != DEFAULT_ENDPOINT:
        env[_TS_TOKEN_VAR] = "emulator"
    return env


def _error_details(contents: bytes) -> tuple[str, str]:
    """The message and first reason of a GCS JSON error body ("" where absent)."""
    try:
        error = json.loads(contents)["error"]
        reasons = error.get("errors") or [{}]
        return str(error.get("message", "")), str(reasons[0].get("reason", ""))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return "", ""


#: Object deletions in flight at once (GCS has no multi-object delete in its JSON API).
DELETE_CONCURRENCY = 32


class _SingleAttemptGCSFileSystem(_CoreGCSFileSystem):
    """gcsfs with one attempt per request and the error body's details kept.

    gcsfs wraps every request in its own retry loop; cloudckpt retries once, in
    cloudckpt.storage.retry. gcsfs's errors also drop the response's
    ``Retry-After`` and turn every 404 into a bare ``FileNotFoundError``; this
    request keeps both (as ``retry_after``, ``error_code`` and ``gcs_message``
    on the exception) so that retries honour the server's wait and a missing
    bucket is told from a missing object without asking for bucket metadata.
    """

    async def _request(  # type: ignore[override]
        self,
        method: str,
        path: str,
        *args: Any,
        headers: dict[str, str] | None = None,
        json: Any = None,
        data: Any = None,
        cache_type: str | None = None,
        cache_source: str | None = None,
        **kwargs: Any,
    ) -> tuple[int, Any, Any, bytes]:
        await self._set_session()
        if hasattr(data, "seek"):
            data.seek(0)
        async with self.session.request(
            method=method,
            url=self._format_path(path, args),
            params=self._get_params(kwargs),
            json=json,
            headers=self._get_headers(headers, cache_type=cache_type, cache_source=cache_source),
            data=data,
            timeout=self.requests_timeout,
        ) as response:
            contents = await response.read()
            if response.status >= 400:
                _raise_for(response, contents, path, args)
            return response.status, response.headers, response.request_info, contents

    async def _read_range_into(self, path: str, offset: int, buffers: list[Buffer]) -> int:
        """One ranged media GET of ``path`` streamed into ``buffers``; the bytes placed.

        The body goes from aiohttp's receive buffers straight into the caller's
        memory as it arrives, instead of being joined into one ``bytes`` first
        and copied again. 404 raises ``FileNotFoundError`` (as ``_request``).
        """
        await self._set_session()
        want = sum(b.nbytes for b in buffers)
        headers = self._get_headers({"Range": f"bytes={offset}-{offset + want - 1}"})
        async with self.session.get(
            self.url(path), headers=headers, timeout=self.requests_timeout
        ) as response:
            if response.status == 416:  # the range starts at or after the end
                return 0
            if response.status >= 400:
                _raise_for(response, await response.read(), path, ())
            return await fill_from_range(response, buffers, offset, f"gs://{path}", "GCS")

    def split_path(self, path: str) -> tuple[str, str, None]:
        # A key is a literal string: never read ``#generation`` or
        # ``?generation=`` out of it, whatever ``version_aware`` says.
        bucket, _, key = path.partition("/")
        return bucket, key, None


def _raise_for(response: Any, contents: bytes, path: str, args: Any) -> None:
    """Raises gcsfs's error for a failed response, with the details retries need."""
    try:
        validate_response(response.status, contents, path, args)
    except Exception as exc:
        exc.gcs_message, exc.error_code = _error_details(contents)  # type: ignore[attr-defined]
        exc.retry_after = response.headers.get("Retry-After")  # type: ignore[attr-defined]
        raise


def _normalise_endpoint(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    return endpoint if "://" in endpoint else f"http://{endpoint}"


class GCSBackend(FsspecObjectBackend):
    """Google Cloud Storage, or an emulator of its JSON API."""

    scheme = "gs"

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        project: str | None = None,
        token: Any = None,
        request_timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        read_only: bool = False,
        deadlines: Deadlines | None = None,
    ) -> None:
        super().__init__(retry=retry, read_only=read_only, deadlines=deadlines)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        endpoint = endpoint_url or emulator
        self.endpoint_url = _normalise_endpoint(endpoint) if endpoint else None
        self.project = project
        self.token = token if token is not None else ("anon" if self.endpoint_url else None)
        self.request_timeout_s = request_timeout_s

    def _check_tensorstore_endpoint(self) -> None:
        """Refuses a spec that tensorstore would send elsewhere, or with other credentials."""
        ours = self.endpoint_url or DEFAULT_ENDPOINT
        theirs = os.environ.get(_TS_URL_VAR)
        theirs = _normalise_endpoint(theirs) if theirs else DEFAULT_ENDPOINT
        needed = tensorstore_environment(ours)
        missing = [k for k in needed if k != _TS_URL_VAR and not os.environ.get(k)]
        if theirs == ours and not missing:
            return
        what = (
            f"would talk to {theirs}: tensorstore reads its GCS endpoint only from the environment"
            if theirs != ours
            else f"would look for Google credentials, which an emulator has none of ({missing[0]})"
        )
        settings = " ".join(f"{k}={v}" for k, v in needed.items())
        raise ValueError(
            f"this gs:// backend talks to {ours}, but tensorstore, which writes the arrays, "
            f"{what}. Set {settings} in the environment before the process opens arrays "
            "(cloudckpt.storage.gcs.tensorstore_environment gives them)"
        )

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        self._check_tensorstore_endpoint()
        bucket, _, key = path.partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": key.rstrip("/") + "/"}

    def _tensorstore_context_spec(self) -> dict[str, Any]:
        policy = self.retry_policy
        spec: dict[str, Any] = {
            "gcs_request_concurrency": {"limit": 64},
            "gcs_request_retries": {
                "max_retries": policy.max_attempts,
                "initial_delay": f"{policy.initial_backoff_s}s",
                "max_delay": f"{policy.max_backoff_s}s",
            },
        }
        if self.project:
            spec["gcs_user_project"] = {"project_id": self.project}
        return spec

    def _new_filesystem(self) -> Any:
        kwargs: dict[str, Any] = {
            "asynchronous": True,
            "skip_instance_cache": True,
            "use_listings_cache": False,
            "requests_timeout": self.request_timeout_s,
            "token": self.token,
        }
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        if self.project:
            kwargs["project"] = self.project
        return _SingleAttemptGCSFileSystem(**kwargs)

    async def _start(self, fs: Any) -> None:
        # gcsfs closes a session still open when its filesystem is collected, on the
        # loop the filesystem knows; an asynchronous one knows none, and gcsfs then
        # closes it on whatever loop runs at that moment (fsspec's IO thread, the
        # collector's), which aiohttp refuses inside a finalizer ("attached to a
        # different loop"). Told its own loop, gcsfs closes it there while that loop
        # runs, and shuts its sockets at once when it does not.
        fs._loop = asyncio.get_running_loop()
        await fs._set_session()
        method = getattr(getattr(fs, "credentials", None), "method", None)
        self.credential_description = f"{method or 'default'} (gcsfs)"

    async def _stop(self, fs: Any) -> None:
        session = getattr(fs, "_session", None)
        if session is not None and not session.closed:
            await session.close()

    def _not_found_says(self, exc: BaseException) -> str | None:
        # The JSON API's own words: "No such object: b/k" and "The specified
        # bucket does not exist." Emulators may say neither ("Not Found").
        for current in (exc, exc.__cause__, exc.__context__):
            message = str(getattr(current, "gcs_message", "") or "").lower()
            if "no such object" in message:
                return "object"
            if "bucket does not exist" in message:
                return "bucket"
        return None

    async def _list_page(
        self, bucket: str, key_prefix: str, token: str | None, limit: int | None
    ) -> tuple[list[ObjectInfo], str | None]:
        fs = await self._fs()
        page = await fs._call(
            "GET",
            "b/{}/o",
            bucket,
            json_out=True,
            prefix=key_prefix,
            pageToken=token,
            maxResults=limit,
            fields="items(name,size,updated),nextPageToken",
        )
        infos = [
            ObjectInfo(f"{bucket}/{obj['name']}", int(obj.get("size", 0)), _mtime(obj))
            for obj in page.get("items") or []
            if not obj["name"].endswith("/")  # a zero-byte "folder" placeholder
        ]
        return infos, page.get("nextPageToken") or None

    async def _list_dirs_page(
        self, bucket: str, key_prefix: str, token: str | None
    ) -> tuple[list[str], str | None]:
        fs = await self._fs()
        page = await fs._call(
            "GET",
            "b/{}/o",
            bucket,
            json_out=True,
            prefix=key_prefix,
            delimiter="/",
            pageToken=token,
            fields="prefixes,nextPageToken",
        )
        return [str(p) for p in page.get("prefixes") or []], page.get("nextPageToken") or None

    async def _info(self, path: str) -> dict[str, Any] | None:
        # One objects.get; gcsfs's info would add a listing when the key is missing.
        fs = await self._fs()
        bucket, key = self._split(path)
        try:
            meta = await fs._call("GET", "b/{}/o/{}", bucket, key, json_out=True)
        except FileNotFoundError as exc:
            missing_bucket = await self._missing(path, exc)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None
        return {**meta, "type": "file", "size": int(meta.get("size", 0))}

    async def _create_object(self, fs: Any, path: str, data: bytes, token: str) -> None:
        await fs._pipe_file(path, data, mode="create", metadata={CREATE_TOKEN_KEY: token})

    async def _delete_exact(self, paths: list[str]) -> None:
        fs = await self._fs()
        limit = asyncio.Semaphore(DELETE_CONCURRENCY)

        async def one(path: str) -> None:
            bucket, _, key = path.partition("/")
            async with limit:
                try:
                    await self._bounded(
                        "delete", path, lambda: fs._call("DELETE", "b/{}/o/{}", bucket, key)
                    )
                except FileNotFoundError:
                    pass

        await asyncio.gather(*(one(p) for p in paths))

    @property
    def supports_conditional_delete(self) -> bool:
        return True

    async def _get_versioned(self, path: str) -> Versioned | None:
        return await _gcs_get_versioned(self, path)

    async def _put_versioned(self, path: str, data: bytes, if_version: str | None) -> str | None:
        return await _gcs_put_versioned(self, path, data, if_version)

    async def _delete_versioned(self, path: str, version: str) -> bool:
        return await _gcs_delete_versioned(self, path, version)

    async def _now(self, path: str) -> float:
        return await _gcs_now(self, path)

    async def read_into(self, path: str, offset: int, buffers: list[Buffer]) -> int | None:
        """Reads ``path`` from ``offset`` straight into ``buffers`` (flat byte views or sinks).

        One ranged GET whose body is copied into the buffers as it arrives (no
        temporary object): restores place chunk data in the arrays handed to
        devices this way. Returns the bytes placed (fewer than the buffers hold
        when the object ends first), or None when the object does not exist.
        Retried and hedged as ``get`` is (named ``read`` in errors). Only the first request writes into
        ``buffers``; a hedge or a retry reads into memory of its own, copied in
        once it has won (by then every other request of the read is stopped).
        """
        fs = await self._fs()
        return await self._ranged_read_into(
            path, buffers, lambda into: fs._read_range_into(path, offset, into)
        )

    async def _created_with_token(self, path: str, token: str) -> bool:
        info = await self._info(path)
        return info is not None and (info.get("metadata") or {}).get(CREATE_TOKEN_KEY) == token

    async def bucket_settings(self, path: str) -> BucketSettings:
        """The bucket resource as ``"metadata"`` (see ``BucketSettings``)."""
        bucket = self.bucket_of(path)
        try:
            fs = await self._fs()
            meta = await fs._call("GET", "b/{}", bucket, json_out=True)
        except Exception as exc:  # a refused read is an answer, not a failure
            return BucketSettings(bucket, errors={"metadata": exc})
        return BucketSettings(bucket, values={"metadata": meta})


# ------------------------------------------------------------ conditional requests
# GCS: ifGenerationMatch=<generation> (0: absent) on uploads, and on deletes.
# fake-gcs-server honours it on multipart uploads (create and replace) but not
# on media uploads and not on DELETE (tests/test_protocol_backends.py shows
# both); real GCS honours all. The protocol never needs a conditional delete
# for safety, so the emulator's gap only costs the belt on top of the braces.


def _generation_time(meta: dict[str, Any]) -> float | None:
    value = meta.get("updated") or meta.get("timeCreated")
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


async def _gcs_get_versioned(backend: GCSBackend, path: str) -> Versioned | None:
    fs = await backend._fs()
    bucket, _, key = path.partition("/")
    try:
        meta = await fs._call("GET", "b/{}/o/{}", bucket, key, json_out=True)
        generation = str(meta["generation"])
        _, data = await fs._call(
            "GET", "b/{}/o/{}", bucket, key, alt="media", generation=generation
        )
    except FileNotFoundError as exc:
        missing_bucket = await backend._missing(path, exc)
        if missing_bucket is not None:
            raise missing_bucket from None
        return None
    return Versioned(bytes(data), generation, _generation_time(meta))


async def _gcs_put_versioned(
    backend: GCSBackend, path: str, data: bytes, if_version: str | None
) -> str | None:
    fs = await backend._fs()
    bucket, _, key = path.partition("/")
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
        f"{json.dumps({'name': key})}\r\n--{boundary}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + bytes(data) + f"\r\n--{boundary}--\r\n".encode()
    try:
        out = await fs._call(
            "POST",
            f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
            uploadType="multipart",
            ifGenerationMatch="0" if if_version is None else if_version,
            headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
            data=body,
            json_out=True,
        )
    except FileExistsError:  # 412: the condition did not hold
        return None
    except FileNotFoundError as exc:
        missing_bucket = await backend._missing(path, exc)
        if missing_bucket is not None:
            raise missing_bucket from None
        return None
    return str(out["generation"])


async def _gcs_delete_versioned(backend: GCSBackend, path: str, version: str) -> bool:
    fs = await backend._fs()
    bucket, _, key = path.partition("/")
    try:
        await fs._call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
    except (FileNotFoundError, FileExistsError):
        return False
    return True


async def _gcs_now(backend: GCSBackend, path: str) -> float:
    # The store's clock: the Date header of a one-key listing scoped to ``path``
    # (storage.objects.list: no bucket-level permission needed).
    fs = await backend._fs()
    bucket, key = backend._split(path)
    headers, _ = await fs._call("GET", "b/{}/o", bucket, prefix=key, maxResults=1)
    date = headers.get("Date") or headers.get("date")
    return (
        email.utils.parsedate_to_datetime(date).timestamp()
        if date
        else dt.datetime.now().timestamp()
    )
