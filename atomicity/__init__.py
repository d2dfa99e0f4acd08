"""Temporary-path strategies that make checkpoints visible only when complete.

This package is independent of cloudckpt: it needs only a small async
:class:`~atomicity.store.Store`. Two strategies are provided:

* :class:`AtomicRenamePath` for stores with an atomic rename (POSIX);
* :class:`CommitMarkerPath` for object stores, where a create-only
  ``_COMMITTED`` object written last decides completeness.
"""

from __future__ import annotations

from atomicity.claims import DEFAULT_GRACE_S, Claim
from atomicity.discovery import (
    ChildInfo,
    cleanup_uncommitted,
    delete_checkpoint,
    is_abandoned,
    is_committed,
    list_committed,
    list_uncommitted,
    read_claim,
    scan,
)
from atomicity.errors import ClaimLostError, ValidationError
from atomicity.paths import (
    CLAIM_NAME,
    MARKER_NAME,
    TMP_INFIX,
    AtomicRenamePath,
    CommitMarkerPath,
    TemporaryPath,
    default_temporary_path_class,
    delete_stale,
    final_name_of,
    is_temporary_name,
)
from atomicity.store import ObjectInfo, Store, join

__all__ = [
    "CLAIM_NAME",
    "DEFAULT_GRACE_S",
    "MARKER_NAME",
    "TMP_INFIX",
    "AtomicRenamePath",
    "ChildInfo",
    "Claim",
    "ClaimLostError",
    "CommitMarkerPath",
    "ObjectInfo",
    "Store",
    "TemporaryPath",
    "ValidationError",
    "cleanup_uncommitted",
    "default_temporary_path_class",
    "delete_checkpoint",
    "delete_stale",
    "final_name_of",
    "is_abandoned",
    "is_committed",
    "is_temporary_name",
    "join",
    "list_committed",
    "list_uncommitted",
    "read_claim",
    "scan",
]
