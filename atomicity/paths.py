"""The temporary-path strategies: commit marker (object stores) and atomic rename.

Both implement :class:`atomicity.types.TemporaryPath`; its docstring states
the contract (who calls what, in order). See docs/FORMAT.md ("How a step
becomes visible") for the full protocol and the invariants it keeps.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from typing import ClassVar, Self

from atomicity.claims import COMMITTED, DEFAULT_GRACE_S, DELETING, REVOKED, WRITING, Claim
from atomicity.errors import ClaimLostError, OutcomeUnknownError, ValidationError
from atomicity.removal import (
    _delete_fenced,
    _delete_garbage,
    _garbage,
    delete_stale,
    remove_attempt_objects,
    remove_debris,
)
from atomicity.store import Store, Versioned, basename, join
from atomicity.types import (
    ATTEMPT_TAG,
    CLAIM_NAME,
    DELETING_TAG,
    MARKER_NAME,
    TMP_INFIX,
    TemporaryPath,
    attempt_dir,
    attempt_of,
    final_name_of,
    is_deletion_name,
    is_temporary_name,
    marker_attempt,
    marker_bytes,
)

logger = logging.getLogger(__name__)

#: Errors after which a request's outcome is unknown (it may have taken effect).
UNKNOWN_OUTCOME = (ConnectionError, TimeoutError, OSError)


async def read_versioned_claim(store: Store, path: str) -> tuple[Claim | None, Versioned | None]:
    """The claim of ``path`` and the stored version it came from (both None when absent)."""
    current = await store.get_versioned(join(path, CLAIM_NAME))
    if current is None:
        return None, None
    return Claim.from_bytes(current.data), current


class _ClaimedPath:
    """What both strategies share: a final path, a store, this attempt's claim and its version."""

    def __init__(self, final_path: str, store: Store, claim: Claim) -> None:
        self._final = final_path.rstrip("/")
        self._store = store
        self._claim = claim
        self._version: str | None = None
        #: Nonces of every claim version this attempt sent, landed or not.
        self._sent: set[str] = set()

    @classmethod
    def from_final(
        cls,
        final_path: str,
        store: Store,
        *,
        attempt: str | None = None,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> Self:
        return cls(final_path, store, Claim.new(grace_s, attempt))

    def get(self) -> str:
        return self._final

    def get_final(self) -> str:
        return self._final

    @property
    def claim(self) -> Claim:
        return self._claim

    def _claim_path(self) -> str:
        return join(self.get(), CLAIM_NAME)

    async def _refuse_if_committed(self) -> None:
        if await self._store.exists(join(self._final, MARKER_NAME)):
            raise FileExistsError(
                f"a committed checkpoint already exists at {self._final}; delete it first "
                "or save with force=True"
            )

    async def _put_claim(self, new: Claim, if_version: str | None) -> str | None:
        """One conditional write of ``new``; on a lost answer, reads back whether it landed."""
        self._sent.add(new.nonce)
        try:
            version = await self._store.put_versioned(
                self._claim_path(), new.to_bytes(), if_version=if_version
            )
        except UNKNOWN_OUTCOME:
            version = None
        if version is None:
            current = await self._store.get_versioned(self._claim_path())
            stored = None if current is None else Claim.from_bytes(current.data)
            if current is not None and stored is not None and stored.nonce == new.nonce:
                version = current.version  # our write landed; its answer was lost
        return version

    async def renew(self) -> None:
        if self._version is None:
            raise ClaimLostError(f"{self.get()} was never claimed by this attempt")
        renewed = self._claim.next()
        version = await self._put_claim(renewed, self._version)
        if version is None:
            raise ClaimLostError(
                f"the claim of {self.get()} was taken over or revoked (the save was judged "
                "abandoned); this attempt can no longer commit. Save the step again"
            )
        self._claim, self._version = renewed, version

    async def _write_marker(self, where: str) -> None:
        """Creates the marker for this attempt (create-only), reading back a lost answer."""
        path = join(where, MARKER_NAME)
        data = marker_bytes(self._claim.attempt)
        for _ in range(3):
            try:
                if await self._store.put_if_absent(path, data):
                    return
            except UNKNOWN_OUTCOME:
                pass
            found = await self._store.get(path)
            if found is not None:
                if marker_attempt(found) == self._claim.attempt:
                    return
                raise FileExistsError(
                    f"{where} carries another attempt's commit marker: another save committed "
                    "this step first. Check it with `cloudckpt inspect`, or delete it and save again"
                )
        raise ConnectionError(
            f"could not write the commit marker of {where}: the store kept failing. Its claim "
            "is committed, so `cloudckpt gc` on its root finishes the commit once the claim is "
            "stale; or save the step again"
        )

    @staticmethod
    async def _require_claim(temporary_path: str, store: Store) -> None:
        if not await store.exists(join(temporary_path, CLAIM_NAME)):
            raise ValidationError(f"{temporary_path} has no {CLAIM_NAME}: no save started there")

    @staticmethod
    async def _require_marker(final_path: str, store: Store) -> str | None:
        """The attempt the marker commits (None: unreadable); raises when there is none.

        One GET, the same round trip as asking whether it exists: readers check
        the documents they fetched beside it against the attempt it names.
        """
        found = await store.get(join(final_path, MARKER_NAME))
        if found is None:
            raise ValidationError(
                f"incomplete checkpoint at {final_path}: its commit marker "
                f"{MARKER_NAME} is missing (the save did not finish or is still running)"
            )
        return marker_attempt(found)


def judge(
    claim: Claim | None, current: Versioned, store_now: float, *, include_live: bool = False
) -> tuple[bool, str]:
    """(may the version ``current`` be revoked or taken over?, why) by the store's clock."""
    if claim is None:
        age = store_now - current.mtime if current.mtime is not None else float("inf")
        if age > DEFAULT_GRACE_S or include_live:
            return True, "unreadable claim, unchanged for longer than the default grace"
        return False, "unreadable claim, recently written: left alone for now"
    where = claim.describe(current.mtime, store_now)
    if claim.state == COMMITTED:
        return False, f"committed claim ({where}); only an explicit delete removes it"
    if claim.owner_gone():
        return True, f"abandoned: its writer is gone ({where})"
    if claim.store_age_s(current.mtime, store_now) > claim.grace_s:
        return True, f"abandoned: not renewed within its {claim.grace_s:.0f}s grace ({where})"
    if include_live:
        return True, f"live claim, revoked because of --include-live ({where})"
    return False, f"save may be in progress ({where}); --include-live deletes it"


class CommitMarkerPath(_ClaimedPath):
    """For object stores: write in place; the commit point is the claim's own update.

    The temporary path is the final path. ``create`` creates ``_CLAIM``
    (``If-None-Match: *``), or takes over a stale claim with a write
    conditional on the version judged stale, so of two writers exactly one
    gets the step and the other fails before its first byte. ``finalize``
    changes this attempt's claim to ``committed`` with a write conditional on
    its own version (the commit point), then creates ``_COMMITTED``.
    """

    async def create(self) -> str:
        store, path = self._store, self._final
        claim_path = self._claim_path()
        for _ in range(3):
            await self._refuse_if_committed()
            version = await self._put_claim(self._claim, None)
            if version is not None:
                self._version = version
                await self._remove_leftovers()
                return path
            other, current = await read_versioned_claim(store, path)
            if current is None:
                continue  # deleted in between: try to create again
            if other is not None and other.state == COMMITTED:
                raise FileExistsError(
                    f"{path} is committed by attempt {other.attempt[:18]} (its claim says so) but "
                    "its marker is missing; its writer may still be finishing. Run `cloudckpt gc`"
                )
            takeable, why = judge(other, current, await store.now(claim_path))
            if not takeable:
                raise FileExistsError(
                    f"another save is in progress at {path}: {why}. Only one writer may save a "
                    "step; if "
                    "that writer is gone, wait for its claim to expire or run `cloudckpt gc`"
                )
            version = await self._put_claim(self._claim, current.version)
            if version is not None:
                logger.info("took over %s from a stale claim: %s", path, why)
                self._version = version
                await self._remove_leftovers()
                return path
        raise FileExistsError(f"could not claim {path}: other writers keep claiming it")

    async def _remove_leftovers(self) -> None:
        # Whatever a stale attempt or an interrupted deletion left behind must
        # not survive into this checkpoint; the attempt that wrote it is fenced.
        assert self._version is not None
        await _delete_garbage(
            self._store,
            await _garbage(self._store, self._final, self._version, self._claim.attempt),
        )

    async def finalize(self) -> None:
        if self._version is None:
            raise ClaimLostError(f"not committing {self._final}: it was never claimed")
        if self._claim.state == COMMITTED:
            raise FileExistsError(f"{self._final} is already committed")
        committed = self._claim.next(COMMITTED)
        version = await self._put_claim(committed, self._version)  # the commit point
        if version is None:
            # A renewal cancelled in flight may have landed: its version is ours too.
            claim, current = await read_versioned_claim(self._store, self._final)
            if current is not None and claim is not None and claim.nonce in self._sent:
                if claim.state == COMMITTED:
                    version = current.version
                elif claim.state == WRITING:
                    version = await self._put_claim(committed, current.version)
        if version is None:
            raise ClaimLostError(
                f"not committing {self._final}: its claim was removed or replaced while the "
                "save was in progress (judged abandoned by clean-up or another writer); write "
                "the step again"
            )
        self._claim, self._version = committed, version
        await self._write_marker(self._final)

    async def abort(self) -> bool:
        try:
            return await self._abort()
        except OutcomeUnknownError:
            raise
        except Exception as exc:
            raise OutcomeUnknownError(
                f"the save of {self._final} failed and its outcome could not be read back "
                f"({type(exc).__name__}: {exc}); it is committed only if `cloudckpt ls` lists it"
            ) from exc

    async def _abort(self) -> bool:
        if self._version is None:
            return False
        store, path = self._store, self._final
        for _ in range(5):
            claim, current = await read_versioned_claim(store, path)
            if current is None:
                # Cleaned up: this attempt can never commit. Whatever it wrote late
                # (after its fence) is removed the way clean-up removes claimless debris.
                await remove_debris(store, path, self._claim)
                return False
            if claim is None or claim.attempt != self._claim.attempt:
                # Taken over: what it wrote late sits under its own names only.
                await remove_attempt_objects(store, path, self._claim.attempt)
                return False
            if claim.state == COMMITTED:
                # The commit point was passed (an answer was lost); finish the commit.
                self._claim, self._version = claim, current.version
                await self._write_marker(path)
                return True
            if claim.state in (REVOKED, DELETING) and claim.nonce != self._claim.nonce:
                # Someone else fenced it and is deleting it; late writes of ours go too.
                await remove_attempt_objects(store, path, self._claim.attempt)
                return False
            tombstone = self._claim.next(REVOKED)
            version = await self._put_claim(tombstone, current.version)
            if version is not None:
                await _delete_fenced(store, path, version)
                return False
        raise OutcomeUnknownError(
            f"could not settle the failed save at {path}: its claim keeps changing"
        )

    @classmethod
    async def validate(cls, temporary_path: str, store: Store) -> None:
        if await store.exists(join(temporary_path, MARKER_NAME)):
            raise ValidationError(f"{temporary_path} is already committed, not temporary")
        await cls._require_claim(temporary_path, store)

    @classmethod
    async def validate_final(cls, final_path: str, store: Store) -> str | None:
        return await cls._require_marker(final_path, store)


class AtomicRenamePath(_ClaimedPath):
    """For stores with atomic rename (POSIX): write a sibling, rename it at the end.

    The temporary path is ``<final>.cloudckpt-tmp-<attempt>`` (the whole
    attempt id: each attempt has its own). ``finalize`` puts the marker
    inside, checks that the claim is still this attempt's own version, and
    renames the directory onto the final name: the commit point. Clean-up
    revokes an attempt by renaming its directory away first, so of the two
    renames of one directory exactly one succeeds.
    """

    _warned_stores: ClassVar[set[int]] = set()

    def __init__(self, final_path: str, store: Store, claim: Claim) -> None:
        if not store.supports_atomic_rename and id(store) not in self._warned_stores:
            self._warned_stores.add(id(store))
            warnings.warn(
                f"{type(store).__name__} has no atomic rename; AtomicRenamePath will fail at "
                "finalize. Use CommitMarkerPath (the default for this store).",
                stacklevel=3,
            )
        super().__init__(final_path, store, claim)
        self._tmp = f"{self._final}{TMP_INFIX}{claim.attempt}"

    def get(self) -> str:
        return self._tmp

    async def create(self) -> str:
        await self._refuse_if_committed()
        version = await self._put_claim(self._claim, None)
        if version is None:
            raise FileExistsError(f"temporary path {self._tmp} already exists")
        self._version = version
        return self._tmp

    async def finalize(self) -> None:
        if await self._store.exists(join(self._final, MARKER_NAME)):
            raise FileExistsError(f"{self._final} is already committed")
        # The marker first: if the directory was revoked, writing it re-creates
        # only a claimless directory, which the check below then refuses.
        await self._write_marker(self._tmp)
        claim, current = await read_versioned_claim(self._store, self._tmp)
        if current is None or claim is None or current.version != self._version:
            raise ClaimLostError(
                f"not committing {self._final}: its claim was removed or replaced (clean-up "
                "revoked its temporary directory) while the save was in progress; write the "
                "step again"
            )
        try:
            # The commit point, conditional on this attempt's own claim version.
            await self._store.rename(self._tmp, self._final, claim_version=self._version)
        except FileExistsError:
            raise FileExistsError(
                f"{self._final} is already committed (another save finished first)"
            ) from None
        except FileNotFoundError:
            raise ClaimLostError(
                f"not committing {self._final}: clean-up revoked its temporary directory at "
                "the last moment; write the step again"
            ) from None

    async def abort(self) -> bool:
        if self._version is None:
            return False
        claim, _ = await read_versioned_claim(self._store, self._final)
        if claim is not None and claim.attempt == self._claim.attempt:
            return True  # the rename happened; its answer was lost
        await revoke_by_rename(self._store, self._tmp)
        return False

    @classmethod
    async def validate(cls, temporary_path: str, store: Store) -> None:
        if not is_temporary_name(basename(temporary_path)):
            raise ValidationError(f"{temporary_path} is not a temporary path (no {TMP_INFIX})")
        await cls._require_claim(temporary_path, store)

    @classmethod
    async def validate_final(cls, final_path: str, store: Store) -> str | None:
        if is_temporary_name(basename(final_path)):
            raise ValidationError(
                f"incomplete checkpoint at {final_path}: it still has its temporary name"
            )
        return await cls._require_marker(final_path, store)


async def revoke_by_rename(store: Store, path: str, claim_version: str | None = None) -> bool:
    """Fences and deletes a directory on a rename store; False when it was already gone.

    With ``claim_version`` the rename (the fence) happens only while the
    directory's claim is still that version (the one judged): a claim renewed
    or changed since then wins, and nothing is renamed or deleted.
    """
    path = path.rstrip("/")
    name = basename(path)
    if is_deletion_name(name):
        doomed = path  # already renamed away by an earlier deletion
    else:
        doomed = f"{final_name_of(path)}{TMP_INFIX}{DELETING_TAG}{uuid.uuid4().hex}"
        try:
            if claim_version is None:
                await store.rename(path, doomed)
            else:
                await store.rename(path, doomed, claim_version=claim_version)
        except FileNotFoundError:
            return False
    await store.delete_prefix(doomed)
    return True


def default_temporary_path_class(store: Store) -> type[CommitMarkerPath] | type[AtomicRenamePath]:
    """Atomic rename where the store has it, a commit marker everywhere else."""
    return AtomicRenamePath if store.supports_atomic_rename else CommitMarkerPath


__all__ = [
    "ATTEMPT_TAG",
    "CLAIM_NAME",
    "MARKER_NAME",
    "TMP_INFIX",
    "UNKNOWN_OUTCOME",
    "AtomicRenamePath",
    "CommitMarkerPath",
    "TemporaryPath",
    "attempt_dir",
    "attempt_of",
    "default_temporary_path_class",
    "delete_stale",
    "final_name_of",
    "is_temporary_name",
    "judge",
    "marker_attempt",
    "marker_bytes",
    "read_versioned_claim",
    "revoke_by_rename",
]
