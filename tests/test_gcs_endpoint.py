"""The GCS backend writes no environment variable, and refuses to let tensorstore talk elsewhere.

tensorstore's gcs driver takes its endpoint from ``TENSORSTORE_GCS_HTTP_URL``
only; gcsfs takes it as an argument. A backend whose endpoint differs from
tensorstore's says which variables to set instead of setting them behind the
process's other users. Run in fresh processes, so nothing inherited decides.
"""

from __future__ import annotations

import json
import subprocess
import sys

_SCRIPT = """
import json, os
WATCHED = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "STORAGE_EMULATOR_HOST")
watched = {k: os.environ.get(k) for k in WATCHED}
from cloudckpt.storage.gcs import GCSBackend, tensorstore_environment
before = dict(os.environ)  # after the import: JAX sets variables of its own
out = {}
for endpoint in ("http://127.0.0.1:2", "http://127.0.0.1:3"):
    try:
        out[endpoint] = GCSBackend(endpoint_url=endpoint).kvstore_spec("bkt/k")["driver"]
    except ValueError as exc:
        out[endpoint] = "refused: " + str(exc)
out["environment_changed"] = dict(os.environ) != before or watched != {
    k: os.environ.get(k) for k in WATCHED
}
out["helper"] = tensorstore_environment("127.0.0.1:2")
print(json.dumps(out))
"""


def _run(env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_mismatched_endpoint_is_refused_naming_what_to_set() -> None:
    out = _run({"TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:1"})
    refusal = str(out["http://127.0.0.1:2"])
    assert refusal.startswith("refused:")
    assert "TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:2" in refusal
    assert "GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator" in refusal
    assert "would talk to http://127.0.0.1:1" in refusal
    assert out["environment_changed"] is False
    assert out["helper"] == {
        "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:2",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }


def test_the_endpoint_tensorstore_uses_is_accepted_and_others_refused() -> None:
    out = _run(
        {
            "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:2",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        }
    )
    assert out["http://127.0.0.1:2"] == "gcs"
    assert str(out["http://127.0.0.1:3"]).startswith("refused:")
    assert out["environment_changed"] is False


def test_an_emulator_without_the_test_token_is_refused() -> None:
    out = _run({"TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:2"})
    refusal = str(out["http://127.0.0.1:2"])
    assert "Google credentials" in refusal and "GOOGLE_AUTH_TOKEN_FOR_TESTING" in refusal


def test_importing_the_backend_sets_no_gcsfs_switch_and_uses_the_core_class() -> None:
    # The experimental gcsfs class waits out a 60 s gRPC probe against an emulator;
    # the backend avoids it without writing GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT.
    script = (
        "import os, gcsfs.core\n"
        "from cloudckpt.storage.gcs import GCSBackend\n"
        "fs = GCSBackend(endpoint_url='http://127.0.0.1:2')._new_filesystem()\n"
        "print(type(fs).__mro__[1] is gcsfs.core.GCSFileSystem,\n"
        "      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT' in os.environ)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]
