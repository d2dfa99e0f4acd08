"""S3 backends share botocore's model loader, and nothing else: each keeps its own credentials.

A new botocore session parses S3's service model again when its client is
made (0.09-0.22 s of CPU per manager, CLI command or process opening an S3
root). Every backend's session is handed one loader instead. What must stay
per backend is who it is: two backends with different profiles, used side by
side on one loop against SeaweedFS, each sign with their own profile's keys.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cloudckpt.storage.s3 import S3Backend
from cloudckpt.storage.s3client import data_loader
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique


def _profiles(tmp_path: Path, servers: LocalServers) -> Path:
    creds = servers.s3.credentials
    path = tmp_path / "credentials"
    path.write_text(
        f"[good]\naws_access_key_id = {creds.access_key}\n"
        f"aws_secret_access_key = {creds.secret_key}\n"
        "[bad]\naws_access_key_id = CCNOSUCHKEY00000000\n"
        "aws_secret_access_key = not-the-secret\n"
    )
    return path


def test_backends_share_the_model_loader_and_keep_their_own_profiles(
    servers: LocalServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(_profiles(tmp_path, servers)))
    # The environment's keys are the good ones: a profile named explicitly must win over them.
    key = f"{BUCKET}/{unique('sessions')}/object"

    async def main() -> None:
        good, bad = S3Backend(profile="good"), S3Backend(profile="bad")
        try:
            await good.put(key, b"written with the good profile")
            with pytest.raises(PermissionError) as denied:
                await bad.put(key + "-bad", b"never stored")
            assert "s3://" in str(denied.value)
            assert servers.s3.credentials.secret_key not in str(denied.value)
            assert await good.get(key) == b"written with the good profile"
            assert await good.exists(key + "-bad") is False
            sessions = [(await b._fs()).session for b in (good, bad)]
            assert sessions[0] is not sessions[1]
            assert all(s.get_component("data_loader") is data_loader() for s in sessions)
            assert good.credential_description.startswith("shared-credentials-file")
            assert bad.credential_description.endswith("...0000")
        finally:
            await good.aclose()
            await bad.aclose()

    asyncio.run(main())
