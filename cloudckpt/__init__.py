"""cloudckpt: asynchronous checkpoints straight to GCS, S3 and the file system."""

from __future__ import annotations

from cloudckpt import backends
from cloudckpt.backends import Backend, RetryPolicy, resolve

__all__ = ["Backend", "RetryPolicy", "backends", "resolve"]
