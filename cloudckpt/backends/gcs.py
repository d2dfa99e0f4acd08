"""``gs://`` backend: Google Cloud Storage through gcsfs (aiohttp).

Configuration follows Google's conventions, explicit options first: endpoint
from ``endpoint_url`` or ``STORAGE_EMULATOR_HOST``; credentials from
``token`` or Application Default Credentials (anonymous against an
emulator). Conditional creation is a real ``ifGenerationMatch=0`` upload.

tensorstore's ``gcs`` driver has no endpoint in its spec; it reads
``TENSORSTORE_GCS_HTTP_URL`` (and, against an emulator,
``GOOGLE_AUTH_TOKEN_FOR_TESTING``) from the environment. This backend sets
them from its own endpoint, so users configure one thing. One process can
therefore address a single GCS endpoint.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import os
import uuid
from typing import Any
from urllib.parse import quote

# Before gcsfs is imported: otherwise every bucket call first waits out a 60 s
# gRPC probe for hierarchical-namespace buckets (fatal against an emulator).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import gcsfs

from atomicity import Versioned
from cloudckpt.backends._fsspec import FsspecObjectBackend
from cloudckpt.backends.base import CREATE_TOKEN_KEY
from cloudckpt.backends.retry import RetryPolicy

_TS_URL_VAR = "TENSORSTORE_GCS_HTTP_URL"
_TS_TOKEN_VAR = "GOOGLE_AUTH_TOKEN_FOR_TESTING"
#: The GCS endpoint this process has pointed tensorstore at (it reads one, process-wide).
_tensorstore_endpoint: str | None = None


class _SingleAttemptGCSFileSystem(gcsfs.GCSFileSystem):
    # gcsfs wraps every request in its own retry loop; cloudckpt retries once,
    # in cloudckpt.backends.retry, so use the undecorated request.
    _request = gcsfs.GCSFileSystem._request.__wrapped__


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
    ) -> None:
        super().__init__(retry=retry)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        endpoint = endpoint_url or emulator
        self.endpoint_url = _normalise_endpoint(endpoint) if endpoint else None
        self.project = project
        self.token = token if token is not None else ("anon" if self.endpoint_url else None)
        self.request_timeout_s = request_timeout_s

    @staticmethod
    def _point_tensorstore_at(endpoint: str) -> None:
        global _tensorstore_endpoint
        if _tensorstore_endpoint is not None and _tensorstore_endpoint != endpoint:
            raise ValueError(
                f"tensorstore in this process already talks to GCS at {_tensorstore_endpoint}; it "
                f"cannot also use {endpoint}. Use one GCS endpoint per process."
            )
        # Set even when inherited from a parent process: this process's endpoint wins.
        _tensorstore_endpoint = endpoint
        os.environ[_TS_URL_VAR] = endpoint
        # An emulator accepts any bearer token; tensorstore must not look for real ones.
        os.environ.setdefault(_TS_TOKEN_VAR, "emulator")

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        if self.endpoint_url:
            self._point_tensorstore_at(self.endpoint_url)
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
        await fs._set_session()
        method = getattr(getattr(fs, "credentials", None), "method", None)
        self.credential_description = f"{method or 'default'} (gcsfs)"

    async def _stop(self, fs: Any) -> None:
        session = getattr(fs, "_session", None)
        if session is not None and not session.closed:
            await session.close()

    async def _bucket_exists(self, bucket: str) -> bool:
        fs = await self._fs()
        try:
            await fs._call("GET", "b/{}", bucket, json_out=True)
        except FileNotFoundError:
            return False
        return True

    async def _create_object(self, fs: Any, path: str, data: bytes, token: str) -> None:
        await fs._pipe_file(path, data, mode="create", metadata={CREATE_TOKEN_KEY: token})

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

    async def _created_with_token(self, path: str, token: str) -> bool:
        info = await self._info(path)
        return info is not None and (info.get("metadata") or {}).get(CREATE_TOKEN_KEY) == token


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
    except FileNotFoundError:
        missing_bucket = await backend._missing(path)
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
    except FileNotFoundError:
        missing_bucket = await backend._missing(path)
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
    fs = await backend._fs()
    headers, _ = await fs._call("GET", "b/{}", backend.bucket_of(path))
    date = headers.get("Date") or headers.get("date")
    return (
        email.utils.parsedate_to_datetime(date).timestamp()
        if date
        else dt.datetime.now().timestamp()
    )
