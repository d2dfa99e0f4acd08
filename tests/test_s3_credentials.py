"""tensorstore uses the S3 credential source cloudckpt resolved, so a healthy save is silent.

Each case runs a fresh process (tensorstore's credential chain and its C++
logging are per process) that saves and restores one step on SeaweedFS with
credentials from environment variables, an empty ``AWS_CONFIG_FILE`` and a
``HOME`` without ``~/.aws``: the set-up where tensorstore's own chain prints
``E...`` lines for every step it fails (profile files, web identity) before
finding the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique

REPO = Path(__file__).resolve().parents[1]

SAVE = """
import sys
import numpy as np
import cloudckpt as cc
url = sys.argv[1]
tree = {"w": np.arange(64 * 1024, dtype=np.float32), "b": np.ones(8, np.float32)}
with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(url, args=cc.args.Composite(state=cc.args.StandardSave(tree)))
    got = ckptr.restore(url)["state"]
assert np.array_equal(np.asarray(got["w"]), tree["w"])
print("saved and restored")
"""


def _run(
    servers: LocalServers, tmp_path: Path, **overrides: str
) -> subprocess.CompletedProcess[str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    # Default log levels: what a user sees.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "TF_CPP_", "TENSORSTORE_VERBOSE"))
    }
    env.update(servers.env)
    env.update(
        {
            "HOME": str(home),
            "PYTHONPATH": str(REPO),
            "JAX_PLATFORMS": "cpu",
        }
    )
    env.update(overrides)
    url = f"s3://{BUCKET}/{unique('creds')}/1"
    return subprocess.run(
        [sys.executable, "-c", SAVE, url],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def test_a_healthy_save_with_environment_credentials_prints_nothing(
    servers: LocalServers, tmp_path: Path
) -> None:
    assert Path(servers.env["AWS_CONFIG_FILE"]).read_text() == ""
    proc = _run(servers, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "saved and restored"
    assert proc.stderr == "", proc.stderr


def test_wrong_credentials_fail_once_and_clearly(servers: LocalServers, tmp_path: Path) -> None:
    proc = _run(servers, tmp_path, AWS_SECRET_ACCESS_KEY="wrong-secret-0123456789")
    assert proc.returncode != 0
    # One error, raised by cloudckpt's first request, before tensorstore writes anything.
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("PermissionError: access denied") and "credentials: env" in last
    assert proc.stderr.count("access denied") == 1, proc.stderr
    assert "wrong-secret-0123456789" not in proc.stderr + proc.stdout
    assert not [line for line in proc.stderr.splitlines() if line.startswith("E")], proc.stderr
