"""What the test servers honour of the conditions the commit protocol uses (issue 12).

Raw HTTP, no cloudckpt code between the test and the server, so that
docs/FORMAT.md ("What the test servers honour") states what SeaweedFS and
fake-gcs-server really do, and a server upgrade that changes it fails here:

* SeaweedFS (S3): ``If-None-Match: *`` and ``If-Match`` on PUT, ``If-Match``
  on DELETE: all honoured, as on AWS general-purpose buckets.
* fake-gcs-server (GCS): ``ifGenerationMatch`` (0 and a generation) honoured
  on multipart uploads, which cloudckpt uses for every conditional write;
  **ignored** on media uploads and on DELETE (a stale generation deletes).
  Real GCS honours all of them; tests that depend on the conditional delete
  go through :class:`~cloudckpt.testing.cloudproxy.CloudProxy` with
  ``gcs_conditional_deletes`` (tests/test_protocol_orphans.py).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import boto3  # a test dependency through moto[server] (pyproject.toml)
import botocore.exceptions

from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET


def _s3_status(call: Any) -> int:
    try:
        return int(call()["ResponseMetadata"]["HTTPStatusCode"])
    except botocore.exceptions.ClientError as exc:
        return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])


def test_seaweedfs_honours_if_none_match_and_if_match_on_put_and_delete(
    servers: LocalServers,
) -> None:
    env = servers.env
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )
    key = f"conditions-{uuid.uuid4().hex}/k"

    def put(body: bytes, **condition: str) -> int:
        return _s3_status(lambda: s3.put_object(Bucket=BUCKET, Key=key, Body=body, **condition))

    def etag() -> str:
        return str(s3.head_object(Bucket=BUCKET, Key=key)["ETag"])

    def exists() -> bool:
        return _s3_status(lambda: s3.head_object(Bucket=BUCKET, Key=key)) == 200

    assert put(b"1", IfNoneMatch="*") == 200
    assert put(b"2", IfNoneMatch="*") == 412
    first = etag()
    assert put(b"3", IfMatch='"00000000000000000000000000000000"') == 412
    assert put(b"4", IfMatch=first) == 200
    second = etag()
    assert second != first
    missing = _s3_status(
        lambda: s3.put_object(Bucket=BUCKET, Key=f"{key}-missing", Body=b"x", IfMatch=first)
    )
    assert missing in (404, 412)  # AWS: 404 NoSuchKey; SeaweedFS: 412
    assert _s3_status(lambda: s3.delete_object(Bucket=BUCKET, Key=key, IfMatch=first)) == 412
    assert exists()
    assert _s3_status(lambda: s3.delete_object(Bucket=BUCKET, Key=key, IfMatch=second)) == 204
    assert not exists()


class _Gcs:
    def __init__(self, endpoint: str) -> None:
        self.base = endpoint.rstrip("/")
        self.name = f"conditions-{uuid.uuid4().hex}/k"

    def request(
        self,
        method: str,
        url: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body = resp.read()
                return resp.status, json.loads(body) if body else {}
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    def _object(self) -> str:
        return f"{self.base}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(self.name, safe='')}"

    def generation(self) -> str | None:
        status, meta = self.request("GET", self._object())
        return str(meta["generation"]) if status == 200 else None

    def media(self, data: bytes, generation: str) -> int:
        query = urllib.parse.urlencode(
            {"uploadType": "media", "name": self.name, "ifGenerationMatch": generation}
        )
        return self.request("POST", f"{self.base}/upload/storage/v1/b/{BUCKET}/o?{query}", data)[0]

    def multipart(self, data: bytes, generation: str) -> int:
        boundary = uuid.uuid4().hex
        body = (
            (
                f"--{boundary}\r\nContent-Type: application/json\r\n\r\n"
                f"{json.dumps({'name': self.name})}\r\n--{boundary}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        query = urllib.parse.urlencode({"uploadType": "multipart", "ifGenerationMatch": generation})
        headers = {"Content-Type": f"multipart/related; boundary={boundary}"}
        url = f"{self.base}/upload/storage/v1/b/{BUCKET}/o?{query}"
        return self.request("POST", url, body, headers)[0]

    def delete(self, generation: str) -> int:
        return self.request("DELETE", f"{self._object()}?ifGenerationMatch={generation}")[0]


def test_fake_gcs_server_honours_if_generation_match_on_multipart_uploads_only(
    servers: LocalServers,
) -> None:
    gcs = _Gcs(servers.gcs.endpoint)
    # Multipart (cloudckpt's conditional writes): create-only and replace-if honoured.
    assert gcs.multipart(b"1", "0") == 200
    assert gcs.multipart(b"2", "0") == 412
    first = gcs.generation()
    assert first is not None
    assert gcs.multipart(b"3", str(int(first) - 1)) == 412
    assert gcs.multipart(b"4", first) == 200
    second = gcs.generation()
    assert second not in (None, first)
    # Media uploads: the condition is ignored (real GCS answers 412 to both).
    assert gcs.media(b"5", "0") == 200
    assert gcs.media(b"6", first) == 200
    # DELETE: ignored too, a stale generation deletes (real GCS: 412, object kept).
    assert gcs.delete(first) in (200, 204)
    assert gcs.generation() is None
