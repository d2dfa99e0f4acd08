"""How an S3 backend's s3fs client is made: exact keys, one model loader, no retries of its own.

* Keys are literal: s3fs's own path split cuts a key at ``?versionId=`` and
  reads access-point ARNs, so the client's class splits ``bucket/key`` at the
  first slash and nothing else.
* botocore's loader of service models and endpoints is shared by every
  backend's session. A new session otherwise parses S3's model again when its
  client is made: 0.09-0.22 s of CPU for every manager, CLI command and
  process that opens an S3 root, against 0.01 s with the loader shared
  (``s3fs`` ``set_session`` on a 2-core host). The loader only reads
  botocore's data files and caches what it read; credentials and profiles
  stay per session.
* Retries happen once, in :mod:`cloudckpt.storage.retry`: botocore and s3fs
  make one attempt each.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def exact_filesystem_class() -> type:
    import s3fs

    class ExactKeyS3FileSystem(s3fs.S3FileSystem):
        """s3fs with ``bucket/key`` split at the first slash and nothing else.

        Every s3fs call made through this class (``_pipe_file`` included)
        addresses exactly the key it is given.
        """

        def split_path(self, path: str) -> tuple[str, str, None]:
            bucket, _, key = path.partition("/")
            return bucket, key, None

    return ExactKeyS3FileSystem


@functools.cache
def data_loader() -> Any:
    """botocore's loader, shared by every backend's session."""
    import aiobotocore.session

    # Made by a session, so that it searches the same data paths (AWS_DATA_PATH).
    return aiobotocore.session.AioSession().get_component("data_loader")


def new_filesystem(
    *,
    endpoint_url: str | None,
    region: str | None,
    profile: str | None,
    anon: bool,
    request_timeout_s: float,
) -> Any:
    """An asynchronous s3fs filesystem on a session of its own (``profile``'s credentials)."""
    import aiobotocore.session

    session = aiobotocore.session.AioSession(profile=profile)
    session.register_component("data_loader", data_loader())
    fs = exact_filesystem_class()(
        asynchronous=True,
        skip_instance_cache=True,
        use_listings_cache=False,
        anon=anon,
        session=session,
        endpoint_url=endpoint_url,
        client_kwargs={"region_name": region} if region else {},
        config_kwargs={
            "retries": {"total_max_attempts": 1, "mode": "standard"},
            "connect_timeout": request_timeout_s,
            "read_timeout": request_timeout_s,
        },
    )
    fs.retries = 1
    return fs
