"""Small helpers shared by the tests."""

from __future__ import annotations

import os

BUCKET = "cloudckpt-test"


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{os.urandom(6).hex()}"
