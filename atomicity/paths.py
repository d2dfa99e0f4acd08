"""Temporary-path strategies: how a checkpoint becomes visible only when complete.

Contract (who calls what, in order):

1. Every process computes the same ``TemporaryPath`` with ``from_final``.
2. The primary process alone calls ``await create()``. It claims the path with
   a create-only put (a live claim held by someone else, or a committed
   checkpoint already at the final path, raises ``FileExistsError``) and
   removes stale leftovers of crashed attempts, so nothing stale survives into
   the new checkpoint. Other processes wait for it (a barrier) before writing.
3. All processes write their data under ``get()``.
4. After every process has finished writing, the primary alone calls
   ``await finalize()``. Nothing may be written under the path afterwards.

``validate`` checks that a path is an in-progress temporary path;
``validate_final`` that a path is a committed checkpoint. Both raise
:class:`ValidationError` (a ``ValueError``) naming the path and what is missing.
"""

from __future__ import annotations

import warnings
from typing import ClassVar, Protocol, Self

from atomicity.claims import DEFAULT_GRACE_S, Claim
from atomicity.errors import ClaimLostError, ValidationError
from atomicity.store import Store, basename, join, parent

#: Object written last, create-only; its presence makes a path a checkpoint.
MARKER_NAME = "_COMMITTED"
#: Object written first, create-only; names the attempt that owns the path.
CLAIM_NAME = "_CLAIM"
#: Infix of temporary sibling names used by :class:`AtomicRenamePath`.
TMP_INFIX = ".cloudckpt-tmp-"


def is_temporary_name(name: str) -> bool:
    return TMP_INFIX in name


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

    async def finalize(self) -> None:
        """Makes the checkpoint visible (primary process only, after all writes)."""
        ...

    @classmethod
    async def validate(cls, temporary_path: str, store: Store) -> None: ...

    @classmethod
    async def validate_final(cls, final_path: str, store: Store) -> None: ...


async def _read_claim(store: Store, path: str) -> Claim | None:
    data = await store.get(join(path, CLAIM_NAME))
    return None if data is None else Claim.from_bytes(data)


async def _check_still_owned(store: Store, path: str, claim: Claim) -> None:
    """Refuses to commit when this attempt's claim is gone, foreign or expired.

    Clean-up never touches a claim younger than its grace period, so while this
    holds, nothing this attempt wrote can have been deleted underneath it.
    """
    current = await _read_claim(store, path)
    if current is None or current.attempt != claim.attempt:
        raise ClaimLostError(
            f"not committing {path}: its claim was removed or replaced while the save "
            "was in progress (a clean-up or another writer took the path); write the "
            "step again"
        )
    if claim.age_s() > claim.grace_s:
        raise ClaimLostError(
            f"not committing {path}: the save took {claim.age_s():.0f}s, longer than "
            f"its {claim.grace_s:.0f}s grace period, so clean-up may have removed part "
            "of it; raise the grace period or the timeout and save again"
        )


async def delete_stale(store: Store, path: str) -> None:
    """Deletes an uncommitted path so that an interruption leaves it recognisable.

    The claim goes last, so a half-finished deletion still carries a claim
    and the next clean-up finds and finishes it.
    """
    keep = join(path, CLAIM_NAME)
    doomed = [info.path async for info in store.list_prefix(path) if info.path != keep]
    await store.delete_many(doomed)
    await store.delete(keep)
    await store.delete_prefix(path)


class _ClaimedPath:
    """What both strategies share: a final path, a store, this attempt's claim."""

    def __init__(self, final_path: str, store: Store, claim: Claim) -> None:
        self._final = final_path.rstrip("/")
        self._store = store
        self._claim = claim

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

    async def _refuse_if_committed(self) -> None:
        if await self._store.exists(join(self._final, MARKER_NAME)):
            raise FileExistsError(
                f"a committed checkpoint already exists at {self._final}; delete it first "
                "or save with force=True"
            )

    async def _put_marker(self, where: str) -> bool:
        return await self._store.put_if_absent(join(where, MARKER_NAME), _marker_bytes(self._claim))

    @staticmethod
    async def _require_claim(temporary_path: str, store: Store) -> None:
        if not await store.exists(join(temporary_path, CLAIM_NAME)):
            raise ValidationError(f"{temporary_path} has no {CLAIM_NAME}: no save started there")

    @staticmethod
    async def _require_marker(final_path: str, store: Store) -> None:
        if not await store.exists(join(final_path, MARKER_NAME)):
            raise ValidationError(
                f"incomplete checkpoint at {final_path}: its commit marker "
                f"{MARKER_NAME} is missing (the save did not finish or is still running)"
            )


class CommitMarkerPath(_ClaimedPath):
    """For object stores: write in place, commit with a create-only marker.

    The temporary path is the final path. ``create`` puts ``_CLAIM``
    create-only, so a second writer of the same step fails before its first
    byte. ``finalize`` checks the claim is still this attempt's and puts
    ``_COMMITTED`` create-only; a second finalize raises ``FileExistsError``.
    """

    async def create(self) -> str:
        store, path = self._store, self._final
        for _ in range(2):
            await self._refuse_if_committed()
            if await store.put_if_absent(join(path, CLAIM_NAME), self._claim.to_bytes()):
                await self._remove_unclaimed_leftovers()
                return path
            other = await _read_claim(store, path)
            if other is not None and not other.is_stale():
                raise FileExistsError(
                    f"another save is in progress at {path} ({other.describe()}); "
                    "only one writer may save a step. If that writer is gone, wait "
                    f"{other.grace_s:.0f}s for its claim to expire or delete the step"
                )
            await delete_stale(store, path)
        raise FileExistsError(f"could not claim {path}: another writer keeps claiming it")

    async def _remove_unclaimed_leftovers(self) -> None:
        # Objects without a claim can only be debris of an interrupted deletion
        # or crash; none of them may survive into this checkpoint.
        claim_path = join(self._final, CLAIM_NAME)
        doomed = [
            info.path
            async for info in self._store.list_prefix(self._final)
            if info.path != claim_path
        ]
        await self._store.delete_many(doomed)

    async def finalize(self) -> None:
        await _check_still_owned(self._store, self._final, self._claim)
        if not await self._put_marker(self._final):
            raise FileExistsError(f"{self._final} is already committed")

    @classmethod
    async def validate(cls, temporary_path: str, store: Store) -> None:
        if await store.exists(join(temporary_path, MARKER_NAME)):
            raise ValidationError(f"{temporary_path} is already committed, not temporary")
        await cls._require_claim(temporary_path, store)

    @classmethod
    async def validate_final(cls, final_path: str, store: Store) -> None:
        await cls._require_marker(final_path, store)


class AtomicRenamePath(_ClaimedPath):
    """For stores with atomic rename (POSIX): write a sibling, rename it at the end.

    The temporary path is ``<final>.cloudckpt-tmp-<attempt>``; ``finalize``
    puts the marker inside it and renames it onto the final name, which fails
    with ``FileExistsError`` when the final name is taken.
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
        self._tmp = f"{self._final}{TMP_INFIX}{claim.attempt[:16]}"

    def get(self) -> str:
        return self._tmp

    async def create(self) -> str:
        await self._refuse_if_committed()
        if not await self._store.put_if_absent(join(self._tmp, CLAIM_NAME), self._claim.to_bytes()):
            raise FileExistsError(f"temporary path {self._tmp} already exists")
        return self._tmp

    async def finalize(self) -> None:
        if await self._store.exists(join(self._final, MARKER_NAME)):
            raise FileExistsError(f"{self._final} is already committed")
        await _check_still_owned(self._store, self._tmp, self._claim)
        if not await self._put_marker(self._tmp):
            raise FileExistsError(f"{self._tmp} was already finalized")
        try:
            await self._store.rename(self._tmp, self._final)
        except FileExistsError:
            raise FileExistsError(
                f"{self._final} is already committed (another save finished first)"
            ) from None

    @classmethod
    async def validate(cls, temporary_path: str, store: Store) -> None:
        if not is_temporary_name(basename(temporary_path)):
            raise ValidationError(f"{temporary_path} is not a temporary path (no {TMP_INFIX})")
        await cls._require_claim(temporary_path, store)

    @classmethod
    async def validate_final(cls, final_path: str, store: Store) -> None:
        if is_temporary_name(basename(final_path)):
            raise ValidationError(
                f"incomplete checkpoint at {final_path}: it still has its temporary name"
            )
        await cls._require_marker(final_path, store)


def _marker_bytes(claim: Claim) -> bytes:
    return b'{"committed_attempt": "%s"}' % claim.attempt.encode()


def default_temporary_path_class(store: Store) -> type[CommitMarkerPath] | type[AtomicRenamePath]:
    """Atomic rename where the store has it, a commit marker everywhere else."""
    return AtomicRenamePath if store.supports_atomic_rename else CommitMarkerPath


def final_name_of(path: str) -> str:
    """The final path a temporary path will be renamed to (identity for final paths)."""
    name = basename(path)
    if not is_temporary_name(name):
        return path.rstrip("/")
    return join(parent(path), name.split(TMP_INFIX, 1)[0])
