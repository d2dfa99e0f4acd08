"""``s3://`` backend: Amazon S3 and S3-compatible stores through s3fs (aiobotocore).

Configuration follows the AWS conventions, explicit options first:
endpoint from ``endpoint_url`` or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``;
region from ``region`` or ``AWS_REGION``/``AWS_DEFAULT_REGION``; credentials
from the AWS chain (environment, shared files / ``profile``, instance roles).
Conditional creation is a real ``If-None-Match: *`` PUT. Data objects can
also be written straight from the caller's buffers (``put_buffers``: SigV4
over UNSIGNED-PAYLOAD with a CRC32C the store checks; see ``s3put``) and read
straight into them (``read_into``: ranged GETs on the same channel; ``s3get``).

tensorstore receives the same endpoint and region in its ``s3`` kvstore spec,
and the credential *source* cloudckpt resolved (``aws_credentials``:
environment, profile, instance metadata, anonymous), so it reads the same
credentials without walking its own chain, whose failed steps (no
``~/.aws/config``, no web identity) it prints to stderr as errors even when a
later step succeeds. Only for sources it is not given a type for (SSO,
assumed or container roles) does tensorstore walk its default chain. It takes
no explicit keys, so there is deliberately no key/secret option here: use
the environment or a profile.
"""

from __future__ import annotations

import email.utils
import os
from collections.abc import Sequence
from typing import Any

from atomicity import ObjectInfo, Versioned
from cloudckpt.storage import s3client, s3get, s3put
from cloudckpt.storage._fsspec import FsspecObjectBackend, _mtime
from cloudckpt.storage._stream import Buffer
from cloudckpt.storage.base import CREATE_TOKEN_KEY, BucketSettings
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.storage.retry import RetryPolicy, error_code_of, http_status_of

#: Keys per DeleteObjects request (the S3 maximum).
DELETE_BATCH = 1000
#: Per-key DeleteObjects error codes worth another attempt.
_TRANSIENT_DELETE_CODES = frozenset({"InternalError", "SlowDown", "ServiceUnavailable"})


#: botocore credential methods -> tensorstore ``aws_credentials`` (see ``kvstore_spec``).
#: "" is botocore finding nothing: tensorstore would find nothing either, and
#: cloudckpt's own first request already failed naming the credentials.
_TS_CREDENTIAL_TYPES: dict[str, dict[str, Any] | None] = {
    "env": {"type": "environment"},
    "iam-role": {"type": "imds"},
    "": {"type": "anonymous"},
}
_PROFILE_METHODS = frozenset({"shared-credentials-file", "config-file"})


def _lost_condition(exc: BaseException) -> bool:
    """A conditional request that failed because the condition no longer holds.

    412, or a 409 other than ``ConditionalRequestConflict``: that one means a
    concurrent conditional write was in progress, and AWS asks for a retry.
    """
    status = http_status_of(exc)
    return status == 412 or (status == 409 and error_code_of(exc) != "ConditionalRequestConflict")


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
        read_only: bool = False,
        deadlines: Deadlines | None = None,
    ) -> None:
        super().__init__(retry=retry, read_only=read_only, deadlines=deadlines)
        self.endpoint_url = endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        self.region = region or _env("AWS_REGION", "AWS_DEFAULT_REGION")
        self.profile = profile
        self.anon = anon
        #: botocore's name for where it found credentials ("env", "iam-role", ...), once known;
        #: "" when the chain found none.
        self._credential_method: str | None = None
        self.request_timeout_s = request_timeout_s
        #: The aiohttp sessions of ``put_buffers``, one per event loop.
        self._direct = s3put.Sessions()

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        bucket, _, key = path.partition("/")
        spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key.rstrip("/") + "/"}
        if self.endpoint_url:
            spec["endpoint"] = self.endpoint_url
        if self.region:
            spec["aws_region"] = self.region
        credentials = self._tensorstore_credentials()
        if credentials is not None:
            spec["aws_credentials"] = credentials
        return spec

    def _tensorstore_credentials(self) -> dict[str, Any] | None:
        """tensorstore's ``aws_credentials`` for the source cloudckpt uses; None: its chain."""
        if self.anon:
            return {"type": "anonymous"}
        if self.profile:
            return {"type": "profile", "profile": self.profile}
        if self._credential_method is not None:
            return _TS_CREDENTIAL_TYPES.get(self._credential_method, self._profile_credentials())
        # Not resolved yet (no request made on any loop): botocore's chain starts
        # with the environment, and takes it whenever both keys are there.
        if _env("AWS_ACCESS_KEY_ID") and _env("AWS_SECRET_ACCESS_KEY"):
            return {"type": "environment"}
        return None

    def _profile_credentials(self) -> dict[str, Any] | None:
        if self._credential_method not in _PROFILE_METHODS:
            return None
        return {
            "type": "profile",
            "profile": _env("AWS_PROFILE", "AWS_DEFAULT_PROFILE") or "default",
        }

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
        return s3client.new_filesystem(
            endpoint_url=self.endpoint_url,
            region=self.region,
            profile=self.profile,
            anon=self.anon,
            request_timeout_s=self.request_timeout_s,
        )

    async def _start(self, fs: Any) -> None:
        await fs.set_session()
        if self.anon:
            self.credential_description = "anonymous"
            return
        creds = await fs.session.get_credentials()
        self._credential_method = "" if creds is None else str(getattr(creds, "method", "") or "?")
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

    async def aclose(self) -> None:
        await self._direct.aclose()
        await super().aclose()

    # ---------------------------------------------------------------- direct writes
    @property
    def supports_put_buffers(self) -> bool:
        """Whether ``put_buffers`` may be used: writable, and the store's region is known.

        The signature names the region, and S3 refuses one signed for another;
        with neither an endpoint nor a region configured (AWS, its default
        region assumed) writes stay on tensorstore, which finds the bucket's
        region itself.
        """
        return self.supports_writes and (self.endpoint_url is not None or self.region is not None)

    async def put_buffers(
        self,
        path: str,
        buffers: Sequence[memoryview],
        *,
        hedge: bool = False,
        crc32c: int | None = None,
    ) -> None:
        """Writes the buffers, joined, as the object ``path``: one PUT, no copy of the bytes.

        ``buffers`` are flat byte views (C-contiguous) that must not change
        until this returns; ``crc32c``, the crc32c of their bytes joined where
        the caller has it (computed here otherwise). Signed with the
        backend's endpoint, region and credentials (as s3fs resolved them)
        over UNSIGNED-PAYLOAD, with the body's ``x-amz-checksum-crc32c``,
        which the store verifies (:mod:`cloudckpt.storage.s3put`). Bounded,
        retried and, with ``hedge``, hedged (a second PUT of the same bytes to
        the same key: only for keys no other writer uses, such as a save
        attempt's data objects) as every backend request is, judged by the
        answer times of direct writes (``latencies(s3put.DIRECT_WRITES)``).
        Errors as ``put``'s.
        """
        self._check_writable("write", path)
        views = [memoryview(b) for b in buffers]
        nbytes = sum(v.nbytes for v in views)
        value = await s3put.body_crc32c(views) if crc32c is None else crc32c
        checksum = {"x-amz-checksum-crc32c": s3put.checksum_header(value)}
        bucket, key = self._split(path)

        async def attempt() -> None:
            url, credentials, region = await s3put.target(
                await self._fs(), self.endpoint_url, self.region, bucket, key, self.anon
            )
            headers = s3put.sign(url, checksum, credentials, region)
            try:
                await s3put.put(self._direct.session(), url, views, headers, self.url(path))
            except s3put.S3PutError as exc:
                if exc.status == 404:  # an upload can only miss its bucket
                    raise self._no_bucket(path) from None
                raise

        # Named "write" in errors and counts, as the data writes of the tensorstore channel.
        await self._retrying(
            "write", path, attempt, nbytes=nbytes, hedge=hedge, kind=s3put.DIRECT_WRITES
        )

    # ---------------------------------------------------------------- direct reads
    @property
    def supports_read_into(self) -> bool:
        """Whether ``read_into`` may be used: the region is known (as for ``put_buffers``)."""
        return self.endpoint_url is not None or self.region is not None

    async def read_into(self, path: str, offset: int, buffers: list[Buffer]) -> int | None:
        """Reads ``path`` from ``offset`` straight into ``buffers`` (flat byte views or sinks).

        One ranged GET streamed into the buffers; the bytes placed (fewer when
        the object ends first), None when it does not exist. Contract and
        errors as ``GCSBackend.read_into``'s; see :func:`s3get.read_into`.
        Only where ``supports_read_into``.
        """
        return await s3get.read_into(self, path, offset, buffers)

    def _not_found_says(self, exc: BaseException) -> str | None:
        code = error_code_of(exc)
        return {"NoSuchKey": "object", "NoSuchBucket": "bucket"}.get(code or "")

    async def _list_page(
        self, bucket: str, key_prefix: str, token: str | None, limit: int | None
    ) -> tuple[list[ObjectInfo], str | None]:
        # ListObjectsV2 with the prefix always set: the training policy grants
        # s3:ListBucket only under an s3:prefix condition.
        fs = await self._fs()
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix}
        if token is not None:
            kwargs["ContinuationToken"] = token
        if limit is not None:
            kwargs["MaxKeys"] = limit
        page = await fs._call_s3("list_objects_v2", **kwargs)
        infos = [
            ObjectInfo(f"{bucket}/{obj['Key']}", int(obj.get("Size", 0)), _mtime(obj))
            for obj in page.get("Contents") or []
            if not obj["Key"].endswith("/")  # a zero-byte "folder" placeholder
        ]
        next_token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        if page.get("IsTruncated") and not next_token:
            raise OSError(f"S3 truncated a listing of s3://{bucket}/{key_prefix} without a token")
        return infos, next_token

    async def _list_dirs_page(
        self, bucket: str, key_prefix: str, token: str | None
    ) -> tuple[list[str], str | None]:
        fs = await self._fs()
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix, "Delimiter": "/"}
        if token is not None:
            kwargs["ContinuationToken"] = token
        page = await fs._call_s3("list_objects_v2", **kwargs)
        prefixes = [str(p["Prefix"]) for p in page.get("CommonPrefixes") or [] if "Prefix" in p]
        next_token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        if page.get("IsTruncated") and not next_token:
            raise OSError(f"S3 truncated a listing of s3://{bucket}/{key_prefix} without a token")
        return prefixes, next_token

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
        extra = (
            {} if byte_range is None else {"Range": f"bytes={byte_range[0]}-{byte_range[1] - 1}"}
        )
        try:
            got = await self._get_object(path, **extra)
        except OSError as exc:
            if http_status_of(exc) == 416:  # range starts at the end of the object
                return b""
            raise
        return None if got is None else got[0]

    async def _get_object(self, path: str, **extra: Any) -> tuple[bytes, dict[str, Any]] | None:
        """One GetObject: (body, response), or None when only the object is missing."""
        fs = await self._fs()
        bucket, _, key = path.partition("/")
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)
        except FileNotFoundError as exc:
            missing_bucket = await self._missing(path, exc)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None
        body = response["Body"]
        try:
            return bytes(await body.read()), response
        finally:
            body.close()

    async def _info(self, path: str) -> dict[str, Any] | None:
        fs = await self._fs()
        bucket, _, key = path.partition("/")
        try:
            head = await fs._call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError as exc:
            missing_bucket = await self._missing(path, exc)
            if missing_bucket is not None:
                raise missing_bucket from None
            return None
        return {
            "type": "file",
            "size": head["ContentLength"],
            "LastModified": head.get("LastModified"),
            "Metadata": head.get("Metadata", {}),
        }

    async def _delete_exact(self, paths: list[str]) -> None:
        fs = await self._fs()
        by_bucket: dict[str, list[str]] = {}
        for path in paths:
            bucket, _, key = path.partition("/")
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for i in range(0, len(keys), DELETE_BATCH):
                batch = keys[i : i + DELETE_BATCH]
                try:
                    response = await self._bounded(
                        "delete",
                        f"{bucket}/{batch[0]}",
                        lambda b=batch, bk=bucket: fs._call_s3(
                            "delete_objects",
                            Bucket=bk,
                            Delete={"Objects": [{"Key": k} for k in b], "Quiet": True},
                        ),
                    )
                except FileNotFoundError:  # no bucket: nothing to delete, as on GCS
                    break
                # DeleteObjects answers 200 even when some keys failed; each is listed.
                errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
                if errors:
                    first = errors[0]
                    url = self.url(f"{bucket}/{first.get('Key', '')}")
                    what = (
                        f"could not delete {len(errors)} of {len(batch)} objects, first "
                        f"{url}: {first.get('Code')}"
                    )
                    if first.get("Code") == "AccessDenied":
                        raise PermissionError(what)
                    if first.get("Code") in _TRANSIENT_DELETE_CODES:
                        raise ConnectionError(what)  # retried by the policy
                    raise OSError(f"{what}; run the deletion again")

    # Conditional requests: If-None-Match: * and If-Match: <ETag> on PUT, and
    # If-Match on DELETE. ETags of identical bytes are equal, so every claim
    # version carries a fresh nonce. SeaweedFS honours all three (tested in
    # tests/test_protocol_backends.py); so does S3 for general-purpose buckets.
    @property
    def supports_conditional_delete(self) -> bool:
        return True

    async def _get_versioned(self, path: str) -> Versioned | None:
        got = await self._get_object(path)
        if got is None:
            return None
        data, response = got
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
        except FileNotFoundError as exc:
            if if_version is None:
                raise (
                    await self._missing(path, exc) or FileNotFoundError(self.url(path))
                ) from None
            return None  # If-Match on a missing object: 404
        except OSError as exc:
            if _lost_condition(exc):
                return None
            raise  # ConditionalRequestConflict: retried by the policy, as AWS advises
        return str(response["ETag"])

    async def _delete_versioned(self, path: str, version: str) -> bool:
        fs = await self._fs()
        bucket, _, key = path.partition("/")
        try:
            await fs._call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except (FileNotFoundError, FileExistsError):
            return False
        except OSError as exc:
            if http_status_of(exc) == 404 or _lost_condition(exc):
                return False
            raise
        return True

    async def _now(self, path: str) -> float:
        # The store's clock: the Date header of a one-key listing scoped to ``path``
        # (s3:ListBucket under the run's prefix; HeadBucket needs more than that).
        fs = await self._fs()
        bucket, key = self._split(path)
        response = await fs._call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        return (
            email.utils.parsedate_to_datetime(date).timestamp()
            if date
            else await super()._now(path)
        )

    async def _created_with_token(self, path: str, token: str) -> bool:
        info = await self._info(path)
        return info is not None and info["Metadata"].get(CREATE_TOKEN_KEY) == token

    async def bucket_settings(self, path: str) -> BucketSettings:
        """Lifecycle rules, versioning and location of the bucket (see ``BucketSettings``)."""
        bucket = self.bucket_of(path)
        values: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        for name, operation in _SETTINGS_REQUESTS:
            try:
                fs = await self._fs()
                answer = await fs._call_s3(operation, Bucket=bucket)
            except Exception as exc:  # a refused read is an answer, not a failure
                if name == "lifecycle" and error_code_of(exc) == "NoSuchLifecycleConfiguration":
                    values[name] = []
                else:
                    errors[name] = exc
                continue
            values[name] = answer.get("Rules", []) if name == "lifecycle" else answer
        return BucketSettings(bucket, values, errors)


#: ``BucketSettings`` names and the S3 requests that read them.
_SETTINGS_REQUESTS = (
    ("lifecycle", "get_bucket_lifecycle_configuration"),
    ("versioning", "get_bucket_versioning"),
    ("location", "get_bucket_location"),
)
