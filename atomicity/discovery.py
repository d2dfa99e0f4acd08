"""Finding committed and uncommitted checkpoints under a root, and cleaning up.

Everything here works from one recursive listing of the root, never one
request per child: a child ``<root>/<name>`` is

* committed when ``<name>/_COMMITTED`` exists and ``<name>`` is not a
  temporary (``.cloudckpt-tmp-``) name;
* uncommitted when it is not committed but carries a claim or a temporary
  name: an attempt that crashed, failed, or is still in flight;
* foreign otherwise (someone else's files): never listed, never deleted.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from atomicity.claims import Claim
from atomicity.paths import (
    CLAIM_NAME,
    MARKER_NAME,
    TMP_INFIX,
    delete_stale,
    is_temporary_name,
)
from atomicity.store import Store, join

logger = logging.getLogger(__name__)


@dataclass
class ChildInfo:
    """What one listing says about a child of a root.

    Attributes:
        name: The child's name (last path component).
        path: Its full path.
        committed: Whether it is a committed checkpoint.
        has_claim: Whether it carries a ``_CLAIM`` object.
        n_objects: Objects under it.
        nbytes: Total bytes under it.
        mtime: Newest modification time seen under it (store clock), if known.
    """

    name: str
    path: str
    committed: bool = False
    has_claim: bool = False
    n_objects: int = 0
    nbytes: int = 0
    mtime: float | None = None
    _has_marker: bool = field(default=False, repr=False)

    @property
    def ours(self) -> bool:
        return self._has_marker or self.has_claim or is_temporary_name(self.name)


async def scan(store: Store, root: str) -> list[ChildInfo]:
    """Lists the checkpoint-like children of ``root`` from one listing, sorted by name."""
    root = root.rstrip("/")
    children: dict[str, ChildInfo] = {}
    prefix_len = len(root) + 1
    async for info in store.list_prefix(root):
        rel = info.path[prefix_len:]
        name, _, rest = rel.partition("/")
        if not rest:
            continue  # an object directly under the root is not a checkpoint
        child = children.get(name)
        if child is None:
            child = children[name] = ChildInfo(name=name, path=join(root, name))
        child.n_objects += 1
        child.nbytes += info.size
        if info.mtime is not None:
            child.mtime = info.mtime if child.mtime is None else max(child.mtime, info.mtime)
        if rest == MARKER_NAME:
            child._has_marker = True
        elif rest == CLAIM_NAME:
            child.has_claim = True
    out = []
    for child in children.values():
        child.committed = child._has_marker and not is_temporary_name(child.name)
        if child.ours:
            out.append(child)
    return sorted(out, key=lambda c: c.name)


async def is_committed(store: Store, path: str) -> bool:
    """Whether ``path`` is a committed checkpoint (one existence check)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return not is_temporary_name(name) and await store.exists(join(path, MARKER_NAME))


async def list_committed(store: Store, root: str) -> list[ChildInfo]:
    return [c for c in await scan(store, root) if c.committed]


async def list_uncommitted(store: Store, root: str) -> list[ChildInfo]:
    return [c for c in await scan(store, root) if not c.committed]


async def read_claim(store: Store, path: str) -> Claim | None:
    data = await store.get(join(path, CLAIM_NAME))
    return None if data is None else Claim.from_bytes(data)


async def is_abandoned(store: Store, child: ChildInfo, now_ns: int | None = None) -> bool:
    """Whether an uncommitted child can be deleted without harming a live writer."""
    if child.committed:
        return False
    claim = await read_claim(store, child.path)
    # A save writes its claim before anything else, so an uncommitted child
    # without a readable claim is debris of an interrupted deletion.
    return claim is None or claim.is_stale(now_ns)


async def cleanup_uncommitted(store: Store, root: str, *, include_live: bool = False) -> list[str]:
    """Deletes uncommitted children of ``root``; returns the deleted paths.

    Children whose claim is still live (owner running, within its grace
    period) are spared unless ``include_live`` is set. Committed children are
    never touched.
    """
    deleted = []
    for child in await list_uncommitted(store, root):
        if include_live or await is_abandoned(store, child):
            logger.info("deleting uncommitted checkpoint %s", child.path)
            await delete_stale(store, child.path)
            deleted.append(child.path)
        else:
            logger.info("sparing %s: its save may still be in progress", child.path)
    return deleted


async def delete_checkpoint(store: Store, path: str) -> None:
    """Deletes a checkpoint so that an interruption never leaves it listed.

    Where the store can rename, the checkpoint is first renamed to a temporary
    name (one atomic step); otherwise the marker goes first. Either way the path
    stops being committed before any data goes, and a deletion cut short is
    finished by the next clean-up (the claim goes last).
    """
    path = path.rstrip("/")
    if store.supports_atomic_rename:
        doomed = f"{path}{TMP_INFIX}deleting-{uuid.uuid4().hex[:12]}"
        await store.rename(path, doomed)
        await store.delete_prefix(doomed)
        return
    await store.delete(join(path, MARKER_NAME))
    await delete_stale(store, path)
