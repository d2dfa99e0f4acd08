"""Reading checkpoints without restoring them: listing, describing and verifying steps.

The ``cloudckpt`` command line is built on these coroutines; they print
nothing. A root is listed with one listing (``atomicity.scan``) plus one small
read per step for its metadata. ``describe_step`` reads only JSON (step
metadata, ``pytree.json``, JSON items), never array data. Verification lives
in :mod:`cloudckpt.tools.verify`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import atomicity
from atomicity import MARKER_NAME, ObjectInfo
from cloudckpt import orbax
from cloudckpt.format.json_item import DATA_NAME, read_json_item
from cloudckpt.format.pytree import METADATA_NAME as PYTREE_NAME
from cloudckpt.format.pytree import (
    EmptyStorage,
    Leaf,
    PackedStorage,
    PytreeDocument,
    ZarrStorage,
    read_pytree,
)
from cloudckpt.format.step import (
    JSON_TYPESTR,
    PYTREE_TYPESTR,
    StepMetadata,
    read_step_metadata,
    validate_item_name,
)
from cloudckpt.handlers.pytree import keys
from cloudckpt.handlers.pytree.budget import ByteBudget
from cloudckpt.storage.path import StoragePath

#: Bytes read or copied at once (objects are at most a few hundred MiB each).
INFLIGHT_BYTES = 512 << 20
#: Requests in flight at once.
INFLIGHT_REQUESTS = 32


# ------------------------------------------------------------------------------ progress
class Progress(Protocol):
    """Byte-level progress of one long operation."""

    def advance(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


#: Makes a progress reporter: (label, total bytes) -> Progress.
ProgressFactory = Callable[[str, int], Progress]


class NoProgress:
    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(label: str, total: int) -> Progress:
    return NoProgress()


class Limiter:
    """Bounds bytes and requests in flight."""

    def __init__(self, nbytes: int = INFLIGHT_BYTES, requests: int = INFLIGHT_REQUESTS) -> None:
        self._budget = ByteBudget(nbytes)
        self._requests = asyncio.Semaphore(requests)

    async def run(self, nbytes: int, make: Callable[[], Awaitable[Any]]) -> Any:
        async with self._requests, self._budget.hold(max(nbytes, 1)):
            return await make()


# ------------------------------------------------------------------------------- objects
async def list_objects(location: StoragePath) -> dict[str, ObjectInfo]:
    """Every object under ``location``, keyed by its path relative to it (one listing)."""
    prefix = location.path.rstrip("/") + "/"
    return {
        info.path[len(prefix) :]: info
        async for info in location.backend.list_prefix(location.path)
        if info.path.startswith(prefix)
    }


def step_sort_key(name: str) -> tuple[int, int, str]:
    """Numbers in numeric order, then other names (``ckpt_12`` sorts by its number).

    Only ASCII digits count as a number (``str.isdigit`` accepts ``²``, which
    ``int`` refuses); a name is never an error, whatever a bucket holds.
    """
    digits = name.rsplit("_", 1)[-1]
    if re.fullmatch(r"[0-9]{1,40}", digits):
        return (0, int(digits), name)
    return (1, 0, name)


def _committed_children(objects: Iterable[str]) -> list[str]:
    names = {
        rel.split("/", 1)[0]
        for rel in objects
        if rel.count("/") == 1 and rel.endswith("/" + MARKER_NAME)
    }
    return sorted((n for n in names if not atomicity.is_temporary_name(n)), key=step_sort_key)


async def require_committed(step: StoragePath) -> dict[str, ObjectInfo]:
    """The objects of the committed checkpoint at ``step`` (one listing).

    Raises:
        FileNotFoundError: nothing is stored at ``step``.
        ValueError: ``step`` is a root of checkpoints, or an uncommitted save.
    """
    return _require_committed(step, await list_objects(step))


async def committed_or_orbax(step: StoragePath) -> tuple[dict[str, ObjectInfo], Any]:
    """The objects of ``step`` and, when Orbax wrote it, its :class:`OrbaxStep` (else None).

    One listing serves both: a step without cloudckpt's marker is classified
    as Orbax from it (Orbax hook). Raises as :func:`require_committed` when
    it is neither.
    """
    objects = await list_objects(step)
    try:
        return _require_committed(step, objects), None
    except ValueError:
        from cloudckpt import orbax

        found = orbax.classify(
            step.name, step.path, objects, atomic_rename=step.backend.supports_atomic_rename
        )
        if found is None:
            raise
        return objects, found


def _require_committed(step: StoragePath, objects: dict[str, ObjectInfo]) -> dict[str, ObjectInfo]:
    if not objects:
        raise FileNotFoundError(
            f"no checkpoint at {step}: nothing is stored there; `cloudckpt ls` on its parent "
            "lists the steps"
        )
    if MARKER_NAME in objects and not atomicity.is_temporary_name(step.name):
        return objects
    children = _committed_children(objects)
    if children:
        shown = ", ".join(children[-3:])
        raise ValueError(
            f"{step} holds {len(children)} checkpoints, it is not one itself; give a step "
            f"such as {step / children[-1]} (latest steps: {shown})"
        )
    raise ValueError(
        f"{step} is not a committed checkpoint: its commit marker {MARKER_NAME} is missing "
        "(the save did not finish or is still running); `cloudckpt ls --all` on its parent "
        "shows it and `cloudckpt gc` removes abandoned saves"
    )


# ----------------------------------------------------------------------------------- ls
@dataclass
class StepSummary:
    """One row of ``cloudckpt ls``."""

    name: str
    url: str
    committed: bool
    nbytes: int | None  # None: not listed (``ls`` without ``--sizes``)
    n_objects: int | None
    mtime: float | None
    commit_time: float | None = None
    items: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    claim: dict[str, Any] | None = None
    problem: str | None = None
    format: str = "cloudckpt"  # or "orbax": a step Orbax wrote, read-only to cloudckpt

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _items_of(metadata: StepMetadata) -> list[str]:
    handlers = metadata.item_handlers
    if isinstance(handlers, dict):
        return list(handlers)
    return []


def _claim_json(claim: atomicity.Claim | None) -> dict[str, Any] | None:
    if claim is None:
        return None
    return {
        "attempt": claim.attempt,
        "host": claim.host,
        "pid": claim.pid,
        "age_s": round(claim.age_s(), 1),
        "grace_s": claim.grace_s,
        "live": not claim.is_stale(),
    }


async def is_committed_step(location: StoragePath) -> bool:
    """Whether ``location`` holds a commit marker of its own: a step, not a root of steps.

    ``cloudckpt ls`` asks when it finds no steps under ``location``, to point at
    ``inspect``. One existence check; an Orbax step (no marker) answers False.
    """
    return await location.backend.exists((location / MARKER_NAME).path)


async def list_steps(
    root: StoragePath, *, read_claims: bool, sizes: bool = False
) -> list[StepSummary]:
    """Committed and uncommitted steps under ``root``, in step order.

    One delimiter listing of the root and a marker check per child
    (``atomicity.scan``), then one small read per committed step (its
    metrics) and, with ``read_claims``, one per uncommitted step (its claim):
    the cost grows with steps, not with objects. ``sizes`` lists every
    object of the root instead, to report each step's size and object count.
    Children that are not cloudckpt's are listed to recognise Orbax steps.
    """
    backend = root.backend
    tap = orbax.ListingTap(backend)  # Orbax hook: Orbax steps reuse any object listing
    every = await atomicity.scan(tap, root.path, sizes=sizes, keep_foreign=True)
    children = [c for c in every if c.ours]
    foreign = [c.name for c in every if not c.ours]
    rows = [
        StepSummary(
            name=c.name,
            url=backend.url(c.path),
            committed=c.committed,
            nbytes=c.nbytes,
            n_objects=c.n_objects,
            mtime=c.mtime,
        )
        for c in children
    ]
    limit = asyncio.Semaphore(16)

    async def fill(row: StepSummary, child: atomicity.ChildInfo) -> None:
        async with limit:
            if child.committed:
                try:
                    metadata = await read_step_metadata(StoragePath(backend, child.path))
                except (OSError, ValueError) as exc:
                    row.problem = f"unreadable step metadata: {exc}"
                    return
                row.items = _items_of(metadata)
                row.metrics = dict(metadata.metrics or {})
                if metadata.commit_timestamp_nsecs:
                    row.commit_time = metadata.commit_timestamp_nsecs / 1e9
            elif read_claims and child.has_claim:
                row.claim = _claim_json(await atomicity.read_claim(backend, child.path))

    await asyncio.gather(*(fill(r, c) for r, c in zip(rows, children, strict=True)))
    rows += await _orbax_rows(root, tap, foreign)  # Orbax hook
    return sorted(rows, key=lambda r: step_sort_key(r.name))


async def _orbax_rows(
    root: StoragePath, tap: orbax.ListingTap, foreign: list[str]
) -> list[StepSummary]:
    """Steps Orbax wrote among the ``foreign`` children of ``root``, marked as such; one
    read each, concurrently (as for cloudckpt's own steps)."""
    atomic_rename = root.backend.supports_atomic_rename
    limit = asyncio.Semaphore(16)

    async def row_of(found: Any) -> StepSummary:
        row = StepSummary(
            name=found.name,
            url=root.backend.url(found.path),
            committed=found.committed,
            nbytes=found.nbytes,
            n_objects=found.n_objects,
            mtime=found.mtime,
            items=[i.name or "(the whole step)" for i in found.items],
            format="orbax",
        )
        if found.committed:
            try:
                async with limit:
                    meta = await orbax.step_metadata(
                        StoragePath(root.backend, found.path), found, with_items=False
                    )
                row.metrics = dict(meta.metrics or {})
                if meta.commit_timestamp_nsecs:
                    row.commit_time = meta.commit_timestamp_nsecs / 1e9
            except (OSError, ValueError) as exc:
                row.problem = f"unreadable Orbax step metadata: {exc}"
        return row

    found = await orbax.steps_among(tap, root.path, foreign, atomic_rename=atomic_rename)
    return list(await asyncio.gather(*(row_of(f) for f in found)))


# ------------------------------------------------------------------------------ inspect
@dataclass
class Item:
    """One item of a step: its name, handler and kind (pytree, json or other)."""

    name: str
    typestr: str | None
    kind: str
    location: StoragePath


def items_of_step(
    step: StoragePath, metadata: StepMetadata, objects: dict[str, ObjectInfo]
) -> list[Item]:
    """The items of a step, from its metadata (or, failing that, from its listing)."""
    handlers = metadata.item_handlers
    if isinstance(handlers, str):  # a single-handler checkpoint: the step is the item
        pairs: list[tuple[str, str | None]] = [("", handlers)]
    elif isinstance(handlers, dict):
        pairs = list(handlers.items())
    else:
        names = sorted({rel.split("/", 1)[0] for rel in objects if "/" in rel})
        pairs = [(n, None) for n in names if _plain_name(n)]
    items = []
    for name, typestr in pairs:
        prefix = f"{name}/" if name else ""
        if typestr == PYTREE_TYPESTR or (typestr is None and prefix + PYTREE_NAME in objects):
            kind = "pytree"
        elif typestr == JSON_TYPESTR or (typestr is None and prefix + DATA_NAME in objects):
            kind = "json"
        else:
            kind = "other"
        items.append(Item(name, typestr, kind, step / name if name else step))
    return items


def _plain_name(name: str) -> bool:
    try:
        validate_item_name(name)
    except ValueError:
        return False
    return True


def prefix_of(item: Item) -> str:
    return f"{item.name}/" if item.name else ""


def describe_sharding(sharding: dict[str, Any] | None) -> str:
    """A short human description of a saved sharding."""
    if not sharding:
        return "host"
    if sharding.get("type") == "NamedSharding":
        mesh = ",".join(f"{k}={v}" for k, v in sharding.get("mesh", {}).items())
        spec = ", ".join(
            "None" if p is None else ("(" + ",".join(p) + ")" if isinstance(p, list) else str(p))
            for p in sharding.get("spec", [])
        )
        return f"mesh({mesh}) P({spec})"
    return f"{sharding.get('type', '?')}({sharding.get('num_devices', '?')} devices)"


def _sharding_of(leaf: Leaf, table: list[Any]) -> dict[str, Any] | None:
    """A leaf's saved sharding, from the document's table."""
    return None if leaf.sharding is None else table[leaf.sharding]


def _key_row(leaf: Leaf) -> dict[str, Any]:
    """How typed PRNG keys show: jax's key dtype and the keys' own shape."""
    try:
        name, _, _ = keys.impl_facts(leaf)
        return {"dtype": keys.dtype_label(name), "shape": list(keys.key_shape_of(leaf))}
    except ValueError:  # unknown to this jax, or inconsistent: show what is stored
        return {"dtype": f"{keys.dtype_label(str(leaf.prng_impl))}?"}


def describe_leaves(document: PytreeDocument) -> list[dict[str, Any]]:
    """Per-leaf rows of a validated ``pytree.json`` document (no array data)."""
    rows = []
    for leaf in document.leaves:
        row: dict[str, Any] = {"path": leaf.path, "kind": leaf.kind}
        storage = leaf.storage
        if storage is None:
            row.update(dtype="str", shape=None, sharding=None, storage="inline")
            row["value"] = leaf.value
        else:
            row.update(
                dtype=leaf.dtype_name,
                shape=list(leaf.shape),
                sharding=_sharding_of(leaf, document.shardings),
                storage={ZarrStorage: "zarr", PackedStorage: "packed", EmptyStorage: "empty"}[
                    type(storage)
                ],
            )
            if keys.is_key_leaf(leaf):
                row.update(_key_row(leaf))
                row["sharding"] = keys.logical_sharding(row["sharding"], len(row["shape"]))
            if isinstance(storage, ZarrStorage):
                row["key"] = storage.key
                row["chunk_shape"] = list(storage.chunk)
        row["nbytes"] = leaf.nbytes
        rows.append(row)
    return rows


async def describe_step(step: StoragePath) -> dict[str, Any]:
    """What ``cloudckpt inspect`` shows, as JSON-able data; reads no array data."""
    objects, found = await committed_or_orbax(step)
    if found is not None:  # Orbax hook: a step Orbax wrote has no cloudckpt marker
        from cloudckpt.tools import orbax as orbax_tools

        return await orbax_tools.describe(step, found, objects)
    metadata = await read_step_metadata(step)
    out: dict[str, Any] = {
        "url": step.url,
        "committed": True,
        "n_objects": len(objects),
        "nbytes": sum(o.size for o in objects.values()),
        "metadata": metadata.to_json(),
        "items": [],
    }
    for item in items_of_step(step, metadata, objects):
        prefix = prefix_of(item)
        entry: dict[str, Any] = {
            "name": item.name,
            "handler": item.typestr,
            "kind": item.kind,
            "n_objects": sum(1 for rel in objects if rel.startswith(prefix)) if prefix else None,
            "stored_bytes": sum(o.size for rel, o in objects.items() if rel.startswith(prefix))
            if prefix
            else None,
        }
        if item.kind == "pytree":
            document = await read_pytree(item.location)
            entry["leaves"] = describe_leaves(document)
            entry["nbytes"] = sum(leaf["nbytes"] for leaf in entry["leaves"])
        elif item.kind == "json":
            entry["value"] = await read_json_item(item.location)
        else:
            entry["objects"] = sorted(
                rel[len(prefix) :] for rel in objects if rel.startswith(prefix)
            )
        out["items"].append(entry)
    return out
