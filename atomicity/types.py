"""The temporary-path protocol: the contract every strategy keeps, and the names it uses.

The strategies themselves are in :mod:`atomicity.paths`; this module holds
only what a caller or a reader of a store needs to know.

Contract (who calls what, in order):

1. Every process computes the same ``TemporaryPath`` with ``from_final``.
2. The primary process alone calls ``await create()``. It claims the path (a
   conditional create of ``_CLAIM``, or a conditional takeover of a stale
   claim on the exact version judged stale). A live claim held by someone
   else, or a committed checkpoint at the final path, raises
   ``FileExistsError`` before any data is written. Other processes wait for
   it (a barrier) before writing.
3. All processes write their data under ``get()``. The primary calls
   ``renew()`` now and then (heartbeat) so that clean-up sees the claim live.
4. After every process has finished writing, the primary alone calls
   ``await finalize()``: the commit point is one conditional request on this
   attempt's own claim version, so an attempt whose claim was taken over or
   revoked can never commit, however long it was paused (fencing).
5. On any failure the primary calls ``await abort()``: it finds out whether
   the commit point was passed (reading back its own claim) and otherwise
   revokes the claim (conditionally) before deleting what it wrote. It
   returns True when the attempt turned out committed.

See docs/FORMAT.md ("How a step becomes visible") for the full protocol and
the invariants it keeps.
"""

from __future__ import annotations

import re
from typing import Protocol

from atomicity.claims import DEFAULT_GRACE_S, Claim
from atomicity.store import Store, basename, join, parent

#: Object written last, create-only; its presence makes a path a checkpoint.
MARKER_NAME = "_COMMITTED"
#: Object written first, changed only by conditional requests; see atomicity.claims.
CLAIM_NAME = "_CLAIM"
#: Infix of temporary sibling names used by :class:`atomicity.paths.AtomicRenamePath`.
TMP_INFIX = ".cloudckpt-tmp-"


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` (one path component) is an atomic-rename temporary name."""
    return TMP_INFIX in name


#: What follows ``TMP_INFIX`` in the name a deletion renames a step to (rename stores).
DELETING_TAG = "deleting-"


def is_deletion_name(name: str) -> bool:
    """Whether ``name`` is a step a deletion renamed away: only its removal remains to do."""
    return is_temporary_name(name) and name.split(TMP_INFIX, 1)[1].startswith(DELETING_TAG)


class TemporaryPath(Protocol):
    """A strategy that makes a path visible only once it is complete."""

    @classmethod
    def from_final(
        cls,
        final_path: str,
        store: Store,
        *,
        attempt: str | None = None,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> TemporaryPath:
        """Every process of one save must pass the same ``attempt`` id."""
        ...

    def get(self) -> str:
        """The path to write under while the save is in progress."""
        ...

    def get_final(self) -> str:
        """The path the checkpoint will have once finalized."""
        ...

    @property
    def claim(self) -> Claim:
        """This attempt's claim (identical on every process only for its attempt id)."""
        ...

    async def create(self) -> str:
        """Claims the path (primary process only). Returns ``get()``."""
        ...

    async def renew(self) -> None:
        """Renews the claim (heartbeat); ``ClaimLostError`` when it was taken."""
        ...

    async def finalize(self) -> None:
        """Makes the checkpoint visible (primary process only, after all writes)."""
        ...

    async def abort(self) -> bool:
        """After a failure: True when the attempt committed after all, else revokes and removes it."""
        ...

    @classmethod
    async def validate(cls, temporary_path: str, store: Store) -> None: ...

    @classmethod
    async def validate_final(cls, final_path: str, store: Store) -> str | None:
        """Raises ``ValidationError`` unless committed; returns the attempt its marker names."""
        ...


def marker_bytes(attempt: str) -> bytes:
    """The content of the marker that commits ``attempt``."""
    return b'{"committed_attempt": "%s"}' % attempt.encode()


def marker_attempt(data: bytes | None) -> str | None:
    """The attempt a marker names; None when unreadable (markers are untrusted input)."""
    import json

    try:
        value = json.loads(data or b"")["committed_attempt"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


#: A path component ``@<attempt>`` marks an object as written by that attempt only.
ATTEMPT_TAG = "@"
#: What the attempt ids cloudckpt makes look like (hex digests and UUIDs).
ATTEMPT_ID = re.compile(r"[0-9a-f]{16,64}")


def attempt_dir(path: str, attempt: str) -> str:
    """Where an attempt writes objects under its own names (``<path>/@<attempt>``).

    Objects under their attempt's own names can never be mixed up with
    another attempt's: a writer paused past its fence writes only its own
    names, and clean-up deletes only attempts that can no longer commit.
    """
    return join(path, f"{ATTEMPT_TAG}{attempt}")


def attempt_of(relative: str) -> str | None:
    """The attempt tag of an object path relative to its step, if it carries one.

    Tags sit right under the step (``@<attempt>/...``) or right under an item
    (``<item>/@<attempt>/...``: cloudckpt's handlers), nowhere deeper; item
    names never start with ``@``.
    """
    parts = relative.split("/", 2)
    for part in parts[:2] if len(parts) > 1 else ():
        if part.startswith(ATTEMPT_TAG) and len(part) > 1:
            return part[1:]
    return None


#: Objects a save creates under fixed names (create-only on object stores), relative
#: to its step: the step metadata, and per item one document (a pytree's or a JSON
#: item's). They are cloudckpt's format (docs/FORMAT.md); tests/test_protocol_orphans.py
#: checks these names against cloudckpt.format.
STEP_DOCUMENTS = frozenset({"_CHECKPOINT_METADATA"})
ITEM_DOCUMENTS = frozenset({"pytree.json", "data.json"})


def is_document(relative: str) -> bool:
    """Whether an object path relative to its step is one of a save's fixed-name documents.

    A fenced writer's late create of such a document carries no attempt tag:
    clean-up recognises a claimless, markerless step by these names (and by
    item tags) alone, and deletes them only on the version it read.
    """
    parts = relative.split("/")
    if len(parts) == 1:
        return parts[0] in STEP_DOCUMENTS
    item = parts[0]
    return (
        len(parts) == 2
        and parts[1] in ITEM_DOCUMENTS
        and item not in ("", ".", "..")
        and not item.startswith((ATTEMPT_TAG, "."))
    )


#: Every document a save writes is a checksummed JSON envelope (cloudckpt.format.jsonio):
#: how clean-up tells a save's lone document from someone else's file of the same name.
_DOCUMENT_HEAD = re.compile(rb'\{"crc32c":"[0-9a-f]{8}","data":')


def is_document_data(data: bytes) -> bool:
    """Whether ``data`` starts the way every document a save writes does."""
    return _DOCUMENT_HEAD.match(data) is not None


def is_item_tagged(relative: str) -> bool:
    """Whether a relative object path is ``<item>/@<attempt id>/...``: what handlers write."""
    parts = relative.split("/", 2)
    return (
        len(parts) == 3
        and parts[0] not in ("", ".", "..")
        and not parts[0].startswith(ATTEMPT_TAG)
        and parts[1].startswith(ATTEMPT_TAG)
        and bool(ATTEMPT_ID.fullmatch(parts[1][1:]))
    )


def final_name_of(path: str) -> str:
    """The final path a temporary path will be renamed to (identity for final paths)."""
    name = basename(path)
    if not is_temporary_name(name):
        return path.rstrip("/")
    return join(parent(path), name.split(TMP_INFIX, 1)[0])
