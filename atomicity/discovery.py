"""Finding committed and uncommitted checkpoints under a root, and cleaning up.

Discovery costs requests that grow with the children of a root, never with
the objects under them: one delimiter listing of the root's children (where
the store offers it: :class:`~atomicity.store.ChildLister`), then exact-key
existence checks of ``_COMMITTED`` (and, for children without it,
``_CLAIM``), a bounded number in flight at once. Sizes need every object and
are read only when asked for (``sizes=True``: one recursive listing of the
root), as on stores without a delimiter listing. A child ``<root>/<name>`` is

* committed when ``<name>/_COMMITTED`` exists and ``<name>`` is not a
  temporary (``.cloudckpt-tmp-``) name;
* uncommitted when it is not committed but carries a claim or a temporary
  name: an attempt that crashed, failed, or is still in flight;
* foreign otherwise (someone else's files): never listed, never deleted.

Clean-up never deletes on the strength of a judgement alone: it first fences
the attempt it judged abandoned with a conditional request on the exact claim
version it judged (or, on POSIX, a rename of the attempt's own directory),
and deletes only once that succeeded. See docs/FORMAT.md ("Clean-up").
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from atomicity.claims import COMMITTED, DELETING, REVOKED, Claim
from atomicity.paths import (
    CLAIM_NAME,
    MARKER_NAME,
    TMP_INFIX,
    is_temporary_name,
    judge,
    marker_bytes,
    read_versioned_claim,
    revoke_by_rename,
)
from atomicity.removal import _delete_fenced
from atomicity.store import ChildLister, Store, Versioned, basename, join
from atomicity.types import (
    ATTEMPT_ID,
    ATTEMPT_TAG,
    DELETING_TAG,
    STEP_DOCUMENTS,
    attempt_of,
    is_deletion_name,
    is_document,
    is_document_data,
    is_item_tagged,
)

logger = logging.getLogger(__name__)

#: Existence checks in flight at once while scanning a root (one or two per child).
CHECKS_IN_FLIGHT = 32
#: Items of one child whose attempt tags a delimiter scan looks for (``tags=True``);
#: cloudckpt's steps hold a few items, and a child with more is listed no further.
MAX_TAGGED_ITEMS = 64


@dataclass
class ChildInfo:
    """What one listing says about a child of a root.

    Attributes:
        name: The child's name (last path component).
        path: Its full path.
        committed: Whether it is a committed checkpoint.
        has_claim: Whether it carries a ``_CLAIM`` object (not checked, and
            False, for a committed child found without a recursive listing).
        n_objects: Objects under it; None unless the scan listed its objects.
        nbytes: Total bytes under it; None unless the scan listed its objects.
        mtime: Newest modification time seen under it (store clock), if the
            scan listed its objects and the store reports times.
    """

    name: str
    path: str
    committed: bool = False
    has_claim: bool = False
    n_objects: int | None = None
    nbytes: int | None = None
    mtime: float | None = None
    _has_marker: bool = field(default=False, repr=False)
    #: Attempt tags (``@<attempt>``) of the objects under it.
    attempts: set[str] = field(default_factory=set, repr=False)
    _debris: bool = field(default=False, repr=False)
    #: Seen while listing: a fixed-name document, and an object that is none of ours.
    _documents: bool = field(default=False, repr=False)
    _unknown: bool = field(default=False, repr=False)

    @property
    def ours(self) -> bool:
        # Objects under an item's attempt-id tag alone (late writes that landed after
        # an explicit delete) make a child ours too; other ``@`` names are someone else's.
        # So does a claimless, markerless child holding nothing but a save's fixed-name
        # documents (and tagged objects): a fenced writer's late creates.
        return (
            self._has_marker
            or self.has_claim
            or is_temporary_name(self.name)
            or self._debris
            or self._orphaned_documents()
        )

    def _orphaned_documents(self) -> bool:
        return (
            self._documents
            and not self._unknown
            and not self._has_marker
            and not self.has_claim
            and not is_temporary_name(self.name)
        )


async def scan(
    store: Store,
    root: str,
    *,
    sizes: bool = False,
    keep_foreign: bool = False,
    tags: bool = False,
) -> list[ChildInfo]:
    """The checkpoint-like children of ``root``, sorted by name.

    Without ``sizes``, on a :class:`ChildLister` store: one delimiter listing
    plus one or two exact-key existence checks per child, however many
    objects each holds; ``n_objects``/``nbytes``/``mtime`` are None. With
    ``sizes``, or on a store without a delimiter listing: one recursive
    listing of the root, which fills them in. ``keep_foreign`` also returns
    children that are not cloudckpt's (``ours`` is False), for callers that
    recognise other writers' steps (Orbax). ``tags`` (clean-up) also finds the
    attempt tags under each child (``ChildInfo.attempts``, and children that
    hold nothing but a fenced attempt's late writes): a recursive listing
    has them anyway; a delimiter scan adds one delimiter listing per child
    and one per item of it (per item, never per object).
    """
    root = root.rstrip("/")
    if not sizes and isinstance(store, ChildLister):
        return await _scan_children(store, root, keep_foreign=keep_foreign, tags=tags)
    children: dict[str, ChildInfo] = {}
    prefix_len = len(root) + 1
    async for info in store.list_prefix(root):
        rel = info.path[prefix_len:]
        name, _, rest = rel.partition("/")
        if not rest:
            continue  # an object directly under the root is not a checkpoint
        if name in ("", ".", ".."):
            # A key such as ``root//_CLAIM`` names no child: joined back onto the root
            # it would address the root itself (or its parent), never a checkpoint.
            continue
        child = children.get(name)
        if child is None:
            child = children[name] = ChildInfo(
                name=name, path=join(root, name), n_objects=0, nbytes=0
            )
        child.n_objects = (child.n_objects or 0) + 1
        child.nbytes = (child.nbytes or 0) + info.size
        if info.mtime is not None:
            child.mtime = info.mtime if child.mtime is None else max(child.mtime, info.mtime)
        if rest == MARKER_NAME:
            child._has_marker = True
        elif rest == CLAIM_NAME:
            child.has_claim = True
        elif is_document(rest):
            child._documents = True
        elif not is_item_tagged(rest):
            child._unknown = True
        if ATTEMPT_TAG in rest:
            tag = attempt_of(rest)
            if tag is not None:
                child.attempts.add(tag)
                # ``<child>/<item>/@<attempt id>/...`` is what handlers write: a child
                # holding only such objects is a save's debris. (One level up, a step
                # scanned as if it were a root, ``<item>/@<id>/...`` is not a step.)
                parts = rest.split("/", 2)
                if len(parts) == 3 and parts[1] == f"{ATTEMPT_TAG}{tag}":
                    child._debris = child._debris or _is_item_tag(parts[0], tag)
    out = []
    for child in children.values():
        child.committed = child._has_marker and not is_temporary_name(child.name)
        if child.ours or keep_foreign:
            out.append(child)
    return sorted(out, key=lambda c: c.name)


def _is_item_tag(item: str, tag: str) -> bool:
    """Whether ``<item>/@<tag>/`` is what cloudckpt's handlers write (an attempt id under an item)."""
    return not item.startswith(ATTEMPT_TAG) and bool(ATTEMPT_ID.fullmatch(tag))


async def _scan_children(
    store: Store, root: str, *, keep_foreign: bool, tags: bool = False
) -> list[ChildInfo]:
    """``scan`` from a delimiter listing and exact-key checks (see ``scan``)."""
    assert isinstance(store, ChildLister)
    names = await store.list_children(root)
    limit = asyncio.Semaphore(CHECKS_IN_FLIGHT)
    # Where a step is committed by rename, a fenced attempt writes only under its own
    # temporary name (recognised by name): no tags to look for.
    tags = tags and not store.supports_atomic_rename

    async def find_tags(child: ChildInfo) -> list[str] | None:
        """Fills in ``child.attempts``; returns its items when its shape is a step's (items
        holding nothing deeper than attempt tags: it may hold a save's documents alone)."""
        # ``<child>/@<attempt>/`` and ``<child>/<item>/@<attempt>/``: where attempt_of looks.
        items = await store.list_children(child.path)
        shaped = len(items) <= MAX_TAGGED_ITEMS
        for item in items[:MAX_TAGGED_ITEMS]:
            if item.startswith(ATTEMPT_TAG):
                shaped = False  # cloudckpt tags data under items only
                if len(item) > 1:
                    child.attempts.add(item[1:])
                continue
            for sub in await store.list_children(join(child.path, item)):
                if sub.startswith(ATTEMPT_TAG) and len(sub) > 1:
                    child.attempts.add(sub[1:])
                    child._debris = child._debris or _is_item_tag(item, sub[1:])
                else:
                    shaped = False
        return items if shaped else None

    async def holds_documents(child: ChildInfo, items: list[str]) -> bool:
        """Whether a claimless, markerless child of a step's shape holds nothing but a
        fenced writer's late documents (and tags): one listing of a few objects."""
        if not items and not any(
            [await store.exists(join(child.path, name)) for name in STEP_DOCUMENTS]
        ):
            return False  # a flat directory without step metadata: not a step's
        start = len(child.path) + 1
        async for info in store.list_prefix(child.path):
            rel = info.path[start:]
            if is_document(rel):
                child._documents = True
            elif not is_item_tagged(rel):
                child._unknown = True
        return child._orphaned_documents()

    async def check(name: str) -> ChildInfo:
        child = ChildInfo(name=name, path=join(root, name))
        async with limit:
            # A temporary name is never committed, whatever it holds: no request.
            if not is_temporary_name(name):
                child._has_marker = await store.exists(join(child.path, MARKER_NAME))
            if not child._has_marker:
                child.has_claim = await store.exists(join(child.path, CLAIM_NAME))
            if tags and (child._has_marker or not child.has_claim) and not is_temporary_name(name):
                # Committed (late writes to sweep) or neither (a fenced attempt's debris?).
                items = await find_tags(child)
                if items is not None and not (child._has_marker or child._debris):
                    await holds_documents(child, items)
        child.committed = child._has_marker and not is_temporary_name(name)
        return child

    found = await asyncio.gather(*(check(n) for n in names if n not in ("", ".", "..")))
    return sorted((c for c in found if c.ours or keep_foreign), key=lambda c: c.name)


async def is_committed(store: Store, path: str) -> bool:
    """Whether ``path`` is a committed checkpoint (one existence check)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return not is_temporary_name(name) and await store.exists(join(path, MARKER_NAME))


async def list_committed(store: Store, root: str, *, sizes: bool = False) -> list[ChildInfo]:
    """Committed children of ``root`` (see ``scan`` for what it costs)."""
    return [c for c in await scan(store, root, sizes=sizes) if c.committed]


async def list_uncommitted(store: Store, root: str, *, sizes: bool = False) -> list[ChildInfo]:
    """Uncommitted children of ``root``: claimed or temporarily named (see ``scan``)."""
    return [c for c in await scan(store, root, sizes=sizes) if not c.committed]


async def read_claim(store: Store, path: str) -> Claim | None:
    data = await store.get(join(path, CLAIM_NAME))
    return None if data is None else Claim.from_bytes(data)


@dataclass
class Settlement:
    """What clean-up decided (and did) about one uncommitted child.

    Attributes:
        deleted: Whether the child was fenced and deleted (or would be, on a dry run).
        reason: Why, for logs and ``cloudckpt gc``.
        claim: The claim judged, if readable.
    """

    deleted: bool
    reason: str
    claim: Claim | None = None
    rolled_forward: bool = False


async def settle(
    store: Store,
    child: ChildInfo,
    *,
    include_live: bool = False,
    dry_run: bool = False,
    store_now: float | None = None,
) -> Settlement:
    """Judges one uncommitted child and, unless ``dry_run``, fences and deletes it if abandoned.

    The judgement reads the claim's exact version; the deletion happens only
    after a request conditional on that version fenced the attempt off (a
    revoked tombstone, or a rename of its own directory on POSIX). A claim
    that changed in between (renewed, taken over, committed) wins: nothing is
    deleted.
    """
    if child.committed:
        return Settlement(False, "committed")
    if store.supports_atomic_rename and is_deletion_name(basename(child.path)):
        # A deletion cut short (maybe only emptied directories are left); no writer
        # ever writes under such a name, so finishing it needs no judgement.
        why = "an interrupted deletion, renamed away: its removal finished"
        if not dry_run:
            await revoke_by_rename(store, child.path)
        return Settlement(True, why)
    claim, current = await read_versioned_claim(store, child.path)
    now = store_now if store_now is not None else await store.now(join(child.path, CLAIM_NAME))
    if claim is not None and current is not None and claim.state == COMMITTED:
        return await _roll_forward(store, child, claim, current, now, dry_run=dry_run)
    if current is None and not await _holds_objects(store, child):
        # SeaweedFS keeps emptied directories, which delimiter listings still show.
        return Settlement(False, "no claim and no objects: nothing to delete")
    if current is None and child._orphaned_documents():
        foreign = await _foreign_document(store, child.path)
        if foreign is not None:
            return Settlement(False, f"{foreign} is not a save's document: someone else's, left")
        doomed = True
        why = "no claim and no marker, only a save's documents: a fenced writer's late creates"
    elif current is None:
        doomed, why = True, "no claim: debris of a crashed save or an interrupted deletion"
    else:
        doomed, why = judge(claim, current, now, include_live=include_live)
    if not doomed or dry_run:
        return Settlement(doomed, why, claim)
    if store.supports_atomic_rename:
        # Every attempt has its own directory: renaming it away is the fence
        # (its writer's final rename of the same directory then fails).
        version = current.version if current is not None else None
        if not await revoke_by_rename(store, child.path, claim_version=version):
            # Gone before the rename (its writer committed it, or another clean-up
            # removed it), or its claim changed since it was judged (renewed): either
            # way nothing was renamed or deleted here.
            return Settlement(False, "renewed, gone or committed meanwhile: left alone", claim)
        return Settlement(True, why, claim)
    fence = Claim.new(claim.grace_s if claim else 60.0, claim.attempt if claim else None).next(
        REVOKED
    )
    if current is None:
        # Claimless debris: claim it for deletion first, so that a writer
        # claiming the step meanwhile wins and its objects are left alone.
        version = await store.put_versioned(
            join(child.path, CLAIM_NAME), fence.to_bytes(), if_version=None
        )
    else:
        if claim is not None and claim.state in (REVOKED, DELETING):
            fence = Claim.new(claim.grace_s, claim.attempt).next(claim.state)
        version = await store.put_versioned(
            join(child.path, CLAIM_NAME), fence.to_bytes(), if_version=current.version
        )
    if version is None:
        return Settlement(False, "the claim changed since it was judged: left alone", claim)
    await _delete_fenced(store, child.path, version)
    return Settlement(True, why, claim)


async def _holds_objects(store: Store, child: ChildInfo) -> bool:
    if child.n_objects is not None:
        return child.n_objects > 0
    async for _ in store.list_prefix(child.path):
        return True
    return False


async def _foreign_document(store: Store, path: str) -> str | None:
    """The first object under ``path`` named like a save's document but not one, if any.

    Names alone do not prove a lone ``data.json`` is ours: every document a save
    writes is a checksummed JSON envelope, and a file that is not stays.
    """
    start = len(path.rstrip("/")) + 1
    for info in [i async for i in store.list_prefix(path)]:
        if is_document(info.path[start:]):
            data = await store.get(info.path)
            if data is not None and not is_document_data(data):
                return info.path
    return None


async def _roll_forward(
    store: Store, child: ChildInfo, claim: Claim, current: Versioned, now: float, *, dry_run: bool
) -> Settlement:
    """A committed claim without its marker: its writer died between the commit point and
    the marker. Once the claim is stale, clean-up writes the marker it would have written."""
    where = claim.describe(current.mtime, now)
    if not claim.owner_gone() and claim.store_age_s(current.mtime, now) <= claim.grace_s:
        return Settlement(False, f"committed, marker not yet written ({where})", claim)
    why = f"committed by its claim but its writer died before the marker: rolled forward ({where})"
    if dry_run:
        return Settlement(False, why, claim, rolled_forward=True)
    await store.put_if_absent(join(child.path, MARKER_NAME), marker_bytes(claim.attempt))
    after = await store.get_versioned(join(child.path, CLAIM_NAME))
    if after is None or after.version != current.version:
        # Possible only if this clean-up paused for longer than a whole delete and a new
        # claim took (see docs/FORMAT.md, "Clean-up"); say so loudly rather than guess.
        logger.error("the claim of %s changed while rolling its commit forward", child.path)
    return Settlement(False, why, claim, rolled_forward=True)


async def sweep_fenced(store: Store, child: ChildInfo, *, dry_run: bool = False) -> list[str]:
    """Deletes what fenced attempts wrote late into the committed step ``child``.

    A writer paused past its fence may still put objects after another
    attempt committed the step; they carry their own attempt's tag, never
    the committed one's, and are never referenced. Only steps whose listing
    shows more than one tag are read (their claim names the committed
    attempt). The claim is read, the step listed, the claim read again: an
    explicit delete and a new save in between change its version, and then
    nothing is deleted. Exactly the listed keys of other attempts go.
    Returns the deleted paths (with ``dry_run``, those that would be).
    """
    if not child.committed or len(child.attempts) < 2:
        return []
    claim, current = await read_versioned_claim(store, child.path)
    if claim is None or current is None or claim.state != COMMITTED:
        return []
    owner = claim.attempt
    if owner not in child.attempts:
        return []  # not written with tags (an older format): nothing to tell apart
    start = len(child.path) + 1
    doomed = []
    async for info in store.list_prefix(child.path):
        tag = attempt_of(info.path[start:])
        if tag is not None and tag != owner:
            doomed.append(info.path)
    if not doomed or dry_run:
        return doomed
    again = await store.get_versioned(join(child.path, CLAIM_NAME))
    if again is None or again.version != current.version:
        return []
    await store.delete_many(doomed)
    logger.info("removed %d late object(s) of fenced attempts from %s", len(doomed), child.path)
    return doomed


async def is_abandoned(store: Store, child: ChildInfo, now_ns: int | None = None) -> bool:
    """Whether an uncommitted child can be deleted without harming a live writer (no action)."""
    return (await settle(store, child, dry_run=True)).deleted


async def cleanup_uncommitted(store: Store, root: str, *, include_live: bool = False) -> list[str]:
    """Fences and deletes abandoned uncommitted children of ``root``; returns the deleted paths.

    Children whose claim is still live (renewed within its grace period by the
    store's clock, owner not known gone) are spared unless ``include_live``;
    committed children and committed claims are never touched, except that
    late objects of fenced attempts are swept out of them (:func:`sweep_fenced`).
    """
    deleted = []
    everything = await scan(store, root, tags=True)
    for child in everything:
        if child.committed:
            await sweep_fenced(store, child)
    children = [c for c in everything if not c.committed]
    if not children:
        return deleted
    now = await store.now(join(root, CLAIM_NAME))
    for child in children:
        outcome = await settle(store, child, include_live=include_live, store_now=now)
        if outcome.deleted:
            logger.info("deleted uncommitted checkpoint %s: %s", child.path, outcome.reason)
            deleted.append(child.path)
        else:
            logger.info("sparing %s: %s", child.path, outcome.reason)
    return deleted


async def delete_checkpoint(store: Store, path: str) -> None:
    """Deletes a checkpoint so that an interruption never leaves it listed or resurrected.

    Where the store can rename, the checkpoint is first renamed to a temporary
    name (one atomic step). Otherwise its claim first becomes ``deleting``
    (conditional on the version read, so that no clean-up or writer acts on
    the old state), then the marker goes, then the data, then the claim.
    A deletion cut short is finished by the next clean-up.
    """
    path = path.rstrip("/")
    if store.supports_atomic_rename:
        doomed = f"{path}{TMP_INFIX}{DELETING_TAG}{uuid.uuid4().hex[:12]}"
        await store.rename(path, doomed)
        await store.delete_prefix(doomed)
        return
    for _ in range(5):
        claim, current = await read_versioned_claim(store, path)
        fence = Claim.new(claim.grace_s if claim else 60.0, claim.attempt if claim else None).next(
            DELETING
        )
        # A checkpoint without a claim (copied in, or written by an old version) is
        # fenced by creating one, create-only: a writer claiming it meanwhile wins.
        version = await store.put_versioned(
            join(path, CLAIM_NAME),
            fence.to_bytes(),
            if_version=None if current is None else current.version,
        )
        if version is not None:
            break
    else:
        raise FileExistsError(
            f"could not delete {path}: its claim kept changing (another writer or clean-up is "
            "acting on it); wait for it to finish, check `cloudckpt ls --all`, and delete again"
        )
    await store.delete(join(path, MARKER_NAME))
    await _delete_fenced(store, path, version)
