"""Temporary-path strategies that make checkpoints visible only when complete.

This package is independent of cloudckpt: it needs only a small async
:class:`~atomicity.store.Store`. :mod:`atomicity.types` states the protocol
(:class:`TemporaryPath`, its call order and the names it writes);
:mod:`atomicity.paths` provides two strategies:

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
    AtomicRenamePath,
    CommitMarkerPath,
    default_temporary_path_class,
    delete_stale,
    judge,
    read_versioned_claim,
    remove_attempt_objects,
)
from atomicity.store import ChildLister, ObjectInfo, Store, Versioned, join
from atomicity.types import (
    ATTEMPT_ID,
    ATTEMPT_TAG,
    CLAIM_NAME,
    ITEM_DOCUMENTS,
    MARKER_NAME,
    STEP_DOCUMENTS,
    TMP_INFIX,
    TemporaryPath,
    attempt_dir,
    attempt_of,
    final_name_of,
    is_document,
    is_document_data,
    is_temporary_name,
    marker_attempt,
)

__all__ = [
    "ATTEMPT_ID",
    "ATTEMPT_TAG",
    "CLAIM_NAME",
    "COMMITTED",
    "DEFAULT_GRACE_S",
    "DELETING",
    "ITEM_DOCUMENTS",
    "MARKER_NAME",
    "REVOKED",
    "STEP_DOCUMENTS",
    "TMP_INFIX",
    "WRITING",
    "AtomicRenamePath",
    "ChildInfo",
    "ChildLister",
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
    "is_document",
    "is_document_data",
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
