"""`make demo` in its short form: the main job, end to end, as CI runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_quick_runs_green() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cloudckpt.demo", "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    text = out.stdout
    assert text.count("matches the saved state") == 3  # s3, gs and the local folder
    assert text.count("killed while committing") == 3
    assert "UNCOMMITTED" not in text and "all checks passed" in text
