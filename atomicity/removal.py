"""Deleting what a fenced claim holder owns: by exact listed keys, documents conditionally.

Every function here runs only after its caller fenced off the attempts that
could still write or commit under the path (a tombstone claim it holds, a
rename, or a committed claim naming another attempt); see docs/FORMAT.md
(I2, I5) for why each deletion cannot take a live attempt's objects.
"""

from __future__ import annotations

from atomicity.claims import REVOKED, Claim
from atomicity.store import Store, join
from atomicity.types import CLAIM_NAME, MARKER_NAME, attempt_of, is_document


async def _garbage(
    store: Store, path: str, version: str, keep_attempt: str | None
) -> tuple[list[str], dict[str, str]]:
    """Objects under ``path`` to delete, for the holder of claim ``version``.

    Listed first, then the claim is read back: if it is no longer ``version``
    (a writer took over this caller's tombstone), nothing is deleted, since
    everything there may be the new holder's. Otherwise every listed object
    goes except the claim and the objects of ``keep_attempt`` (a writer
    clearing its step keeps its own). An object written after the listing is
    never deleted. Objects under an attempt's tag are never written again by
    anyone else, so their listed keys are deleted as they are. The documents
    whose names stay fixed (step metadata, ``pytree.json``, ``data.json``:
    :func:`atomicity.types.is_document`), and in a step with tagged objects
    every untagged object, are read with their version before the claim is
    read back, and returned in the second value: the caller deletes them
    conditionally on that version, so that a later holder's document of the
    same name (written after this caller's tombstone went stale) is kept
    where the store honours conditional deletes (see docs/FORMAT.md, I5).
    Other untagged objects of steps without any tagged object (format 1
    array chunks) keep plain deletes.
    """
    keep = join(path, CLAIM_NAME)
    start = len(path.rstrip("/")) + 1
    listed = [info.path async for info in store.list_prefix(path) if info.path != keep]
    if not listed:
        return [], {}
    tags = {p: attempt_of(p[start:]) for p in listed}
    doomed = [p for p in listed if keep_attempt is None or tags[p] != keep_attempt]
    versions: dict[str, str] = {}
    tagged = any(tag is not None for tag in tags.values())
    fixed = [p for p in doomed if tags[p] is None and (tagged or is_document(p[start:]))]
    # One by one: a step holds a few documents (step metadata, one per item).
    for p in fixed:
        found = await store.get_versioned(p)
        if found is not None:
            versions[p] = found.version
    doomed = [p for p in doomed if p not in fixed or p in versions]
    current = await store.get_versioned(keep)
    if current is None or current.version != version:
        return [], {}
    return [p for p in doomed if p not in versions], versions


async def _delete_garbage(store: Store, garbage: tuple[list[str], dict[str, str]]) -> None:
    plain, versioned = garbage
    await store.delete_many(plain)
    for path, version in versioned.items():
        await store.delete_versioned(path, version)


async def remove_attempt_objects(store: Store, path: str, attempt: str) -> int:
    """Deletes the objects under ``path`` tagged with ``attempt`` (exact listed keys).

    Only for an attempt that can no longer commit ``path`` (fenced, or another
    attempt committed it): its names are its own, so nothing another attempt
    wrote or will write is touched. Returns how many were deleted.
    """
    start = len(path.rstrip("/")) + 1
    mine = [
        info.path
        async for info in store.list_prefix(path)
        if attempt_of(info.path[start:]) == attempt
    ]
    await store.delete_many(mine)
    return len(mine)


async def remove_debris(store: Store, path: str, claim: Claim) -> bool:
    """Fences and deletes whatever sits under the claimless ``path`` (a fenced attempt's
    late writes, an interrupted deletion), unless a writer claims it meanwhile.

    The fence is a ``revoked`` claim created create-only: a writer that claimed
    the step first wins and nothing is deleted. Returns whether it deleted.
    """
    listed = [info.path async for info in store.list_prefix(path)]
    if not listed or join(path, MARKER_NAME) in listed:
        return False  # nothing there, or a committed step (one without a claim): left alone
    tombstone = Claim.new(claim.grace_s, claim.attempt).next(REVOKED)
    version = await store.put_versioned(
        join(path, CLAIM_NAME), tombstone.to_bytes(), if_version=None
    )
    if version is None:
        return False
    await _delete_fenced(store, path, version)
    return True


async def delete_stale(store: Store, path: str) -> None:
    """Deletes the objects under ``path``, the claim last (so an interruption stays recognisable).

    Callers must first have fenced off every attempt that could still write
    or commit there (a revoked or ``deleting`` claim they hold, or a rename).
    """
    keep = join(path, CLAIM_NAME)
    doomed = [info.path async for info in store.list_prefix(path) if info.path != keep]
    await store.delete_many(doomed)
    await store.delete(keep)


async def _delete_fenced(store: Store, path: str, version: str) -> None:
    """Deletes ``path`` whose claim is the tombstone ``version`` this caller wrote."""
    await _delete_garbage(store, await _garbage(store, path, version, None))
    # Conditional where the store can: a writer that took over the tombstone keeps its claim.
    await store.delete_versioned(join(path, CLAIM_NAME), version)
