"""Temporary-path strategies that make checkpoints visible only when complete.

This package is independent of cloudckpt: it needs only a small async
:class:`~atomicity.store.Store`. Two strategies are provided:

* :class:`AtomicRenamePath` for stores with an atomic rename (POSIX);
* :class:`CommitMarkerPath` for object stores, where a create-only
  ``_COMMITTED`` object written last decides completeness.
"""

from __future__ import annotations

from atomicity.claims import COMMITTED, DEFAULT_GRACE_S, DELETING, REVOKED, WRITING, Claim
from atomicity.discovery import (
    ChildInfo,
    Settlement,
    cleanup_uncommitted,
    delete_checkpoint,
    is_abandoned,
    is_committed,
    list_committed,
    list_uncommitted,
    read_claim,
    scan,
    settle,
    sweep_fenced,
)
from atomicity.errors import ClaimLostError, OutcomeUnknownError, ValidationError
from atomicity.paths import (
    ATTEMPT_ID,
    ATTEMPT_TAG,
    CLAIM_NAME,
    MARKER_NAME,
    TMP_INFIX,
    AtomicRenamePath,
    CommitMarkerPath,
    TemporaryPath,
    attempt_dir,
    attempt_of,
    default_temporary_path_class,
    delete_stale,
    final_name_of,
    is_temporary_name,
    judge,
    marker_attempt,
    read_versioned_claim,
    remove_attempt_objects,
)
from atomicity.store import ObjectInfo, Store, Versioned, join

__all__ = [
    "ATTEMPT_ID",
    "ATTEMPT_TAG",
    "CLAIM_NAME",
    "COMMITTED",
    "DEFAULT_GRACE_S",
    "DELETING",
    "MARKER_NAME",
    "REVOKED",
    "TMP_INFIX",
    "WRITING",
    "AtomicRenamePath",
    "ChildInfo",
    "Claim",
    "ClaimLostError",
    "CommitMarkerPath",
    "ObjectInfo",
    "OutcomeUnknownError",
    "Settlement",
    "Store",
    "TemporaryPath",
    "ValidationError",
    "Versioned",
    "attempt_dir",
    "attempt_of",
    "cleanup_uncommitted",
    "default_temporary_path_class",
    "delete_checkpoint",
    "delete_stale",
    "final_name_of",
    "is_abandoned",
    "is_committed",
    "is_temporary_name",
    "join",
    "judge",
    "list_committed",
    "list_uncommitted",
    "marker_attempt",
    "read_claim",
    "read_versioned_claim",
    "remove_attempt_objects",
    "scan",
    "settle",
    "sweep_fenced",
]
