"""tensorstore takes one GCS endpoint per process; cloudckpt sets it from its own configuration."""

from __future__ import annotations

import subprocess
import sys


def test_an_inherited_endpoint_does_not_override_this_processs() -> None:
    script = (
        "import os\n"
        "from cloudckpt.storage.gcs import GCSBackend\n"
        "spec = GCSBackend(endpoint_url='http://127.0.0.1:2').kvstore_spec('b/k')\n"
        "print(os.environ['TENSORSTORE_GCS_HTTP_URL'])\n"
        "try:\n"
        "    GCSBackend(endpoint_url='http://127.0.0.1:3').kvstore_spec('b/k')\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:1"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "http://127.0.0.1:2"  # the parent's value did not win
    assert lines[1].startswith("refused:") and "one GCS endpoint per process" in lines[1]
