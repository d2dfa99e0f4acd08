"""``s3://`` backend: Amazon S3 and S3-compatible stores through s3fs (aiobotocore).

Configuration follows the AWS conventions, explicit options first:
endpoint from ``endpoint_url`` or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``;
region from ``region`` or ``AWS_REGION``/``AWS_DEFAULT_REGION``; credentials
from the AWS chain (environment, shared files / ``profile``, instance roles).
Conditional creation is a real ``If-None-Match: *`` PUT.

tensorstore receives the same endpoint and region in its ``s3`` kvstore spec
and reads credentials from the same chain. It has no way to take explicit keys,
so there is deliberately no key/secret option here: use the environment or a
profile.
"""

from __future__ import annotations

import email.utils
import os
from typing import Any

from atomicity import Versioned
from cloudckpt.backends._fsspec import FsspecObjectBackend
from cloudckpt.backends.base import CREATE_TOKEN_KEY
from cloudckpt.backends.retry import RetryPolicy, http_status_of


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


class S3Backend(FsspecObjectBackend):
    """S3 or an S3-compatible store."""

    scheme = "s3"

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        anon: bool = False,
        request_timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(retry=retry)
        self.endpoint_url = endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        self.region = region or _env("AWS_REGION", "AWS_DEFAULT_REGION")
        self.profile = profile
        self.anon = anon
        self.request_timeout_s = request_timeout_s

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        bucket, _, key = path.partition("/")
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key.rstrip("/") + "/"}
        if self.endpoint_url:
            spec["endpoint"] = self.endpoint_url
        if self.region:
            spec["aws_region"] = self.region
        if self.anon:
            spec["aws_credentials"] = {"type": "anonymous"}
        elif self.profile:
            spec["aws_credentials"] = {"type": "profile", "profile": self.profile}
        return spec

    def _tensorstore_context_spec(self) -> dict[str, Any]:
        policy = self.retry_policy
        return {
            "s3_request_concurrency": {"limit": 64},
            "s3_request_retries": {
                "max_retries": policy.max_attempts,
                "initial_delay": f"{policy.initial_backoff_s}s",
                "max_delay": f"{policy.max_backoff_s}s",
            },
        }

    def _new_filesystem(self) -> Any:
        import s3fs

        client_kwargs = {"region_name": self.region} if self.region else {}
        fs = s3fs.S3FileSystem(
            asynchronous=True,
            skip_instance_cache=True,
            use_listings_cache=False,
            anon=self.anon,
            profile=self.profile,
            endpoint_url=self.endpoint_url,
            client_kwargs=client_kwargs,
            config_kwargs={
                # Retries happen once, in cloudckpt.backends.retry.
                "retries": {"total_max_attempts": 1, "mode": "standard"},
                "connect_timeout": self.request_timeout_s,
                "read_timeout": self.request_timeout_s,
            },
        )
        fs.retries = 1
        return fs

    async def _start(self, fs: Any) -> None:
        await fs.set_session()
        if self.anon:
            self.credential_description = "anonymous"
            return
        creds = await fs.session.get_credentials()
        if creds is None:
            self.credential_description = "none found in the AWS credential chain"
        else:
            key = getattr(creds, "access_key", "") or ""
            self.credential_description = (
                f"{getattr(creds, 'method', 'AWS chain')}, access key id ...{key[-4:]}"
            )

    async def _stop(self, fs: Any) -> None:
        creator = getattr(fs, "_s3creator", None)
        if creator is not None and hasattr(creator, "__aexit__"):
            await creator.__aexit__(None, None, None)

    async def _bucket_exists(self, bucket: str) -> bool:
        fs = await self._fs()
        try:
            await fs._call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if http_status_of(exc) == 404:
                return False
            raise
        return True

    async def _create_object(self, fs: Any, path: str, data: bytes, token: str) -> None:
        try:
            await fs._pipe_file(path, data, mode="create", Metadata={CREATE_TOKEN_KEY: token})
        except OSError as exc:
            if not isinstance(exc, FileExistsError) and http_status_of(exc) == 412:
                raise FileExistsError(self.url(path)) from exc
            raise

    # s3fs's cat_file and info add a HEAD, or a listing when a key is missing;
    # a checkpoint store counts its requests, so these are one request each.
    async def _get(self, path: str, byte_range: tuple[int, int] | None) -> bytes | None:
        if byte_range is not None and byte_range[0] == byte_range[1]:
            return b"" if await self._exists(path) else None
        fs = await self._fs()
        bucket, _, key = path.partition("/")
        extra = (
            {} if byte_range is None else {"Range": f"bytes={byte_range[0]}-{byte_range[1] - 1}"}
        )
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)
        except FileNotFoundError:
            missing_bucket = await self._missing(path)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None
        except OSError as exc:
            if http_status_of(exc) == 416:  # range starts at the end of the object
                return b""
            raise
        body = response["Body"]
        try:
            return bytes(await body.read())
        finally:
            body.close()

    async def _info(self, path: str) -> dict[str, Any] | None:
        fs = await self._fs()
        bucket, _, key = path.partition("/")
        try:
            head = await fs._call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            missing_bucket = await self._missing(path)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None
        return {
            "type": "file",
            "size": head["ContentLength"],
            "LastModified": head.get("LastModified"),
            "Metadata": head.get("Metadata", {}),
        }

    # Conditional requests: If-None-Match: * and If-Match: <ETag> on PUT, and
    # If-Match on DELETE. ETags of identical bytes are equal, so every claim
    # version carries a fresh nonce. SeaweedFS honours all three (tested in
    # tests/test_protocol_backends.py); so does S3 for general-purpose buckets.
    @property
    def supports_conditional_delete(self) -> bool:
        return True

    async def _get_versioned(self, path: str) -> Versioned | None:
        fs = await self._fs()
        bucket, _, key = path.partition("/")
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            missing_bucket = await self._missing(path)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None
        body = response["Body"]
        try:
            data = bytes(await body.read())
        finally:
            body.close()
        modified = response.get("LastModified")
        return Versioned(data, response["ETag"], modified.timestamp() if modified else None)

    async def _put_versioned(self, path: str, data: bytes, if_version: str | None) -> str | None:
        fs = await self._fs()
        bucket, _, key = path.partition("/")
        condition = {"IfNoneMatch": "*"} if if_version is None else {"IfMatch": if_version}
        try:
            response = await fs._call_s3(
                "put_object", Bucket=bucket, Key=key, Body=data, **condition
            )
        except FileExistsError:
            return None
        except FileNotFoundError:
            if if_version is None:
                raise (await self._missing(path) or FileNotFoundError(self.url(path))) from None
            return None  # If-Match on a missing object: 404
        except OSError as exc:
            if http_status_of(exc) in (409, 412):  # 409: a concurrent conditional write won
                return None
            raise
        return str(response["ETag"])

    async def _delete_versioned(self, path: str, version: str) -> bool:
        fs = await self._fs()
        bucket, _, key = path.partition("/")
        try:
            await fs._call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except (FileNotFoundError, FileExistsError):
            return False
        except OSError as exc:
            if http_status_of(exc) in (404, 409, 412):
                return False
            raise
        return True

    async def _now(self, path: str) -> float:
        # The store's clock: the Date header of a bucket HEAD (one small request).
        fs = await self._fs()
        response = await fs._call_s3("head_bucket", Bucket=self.bucket_of(path))
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        return (
            email.utils.parsedate_to_datetime(date).timestamp()
            if date
            else await super()._now(path)
        )

    async def _created_with_token(self, path: str, token: str) -> bool:
        info = await self._info(path)
        return info is not None and info["Metadata"].get(CREATE_TOKEN_KEY) == token
