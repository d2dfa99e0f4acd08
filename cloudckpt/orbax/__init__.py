"""Reading checkpoints written by Orbax: discovery, restore, metadata and conversion.

The rest of cloudckpt reaches Orbax steps only through this package, at a few
marked hooks (manager listing, checkpointer restore, ``cloudckpt
ls/inspect/verify/cp``). Orbax steps are read, never written or deleted
implicitly: retention, clean-up and ``gc`` leave them alone. See
docs/FORMAT.md, "Orbax checkpoints", for the layouts read.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

from cloudckpt.format.step import StepMetadata
from cloudckpt.handlers.args import CheckpointArgs, Composite
from cloudckpt.handlers.base import CheckpointHandler
from cloudckpt.handlers.json import JsonCheckpointHandler, JsonRestore
from cloudckpt.handlers.pytree import StandardCheckpointHandler, StandardRestore
from cloudckpt.orbax import _pytree
from cloudckpt.orbax._layout import (
    COMMIT_FILE,
    JSON_ITEM_FILE,
    ORBAX_TMP_INFIX,
    STEP_METADATA,
    OrbaxItem,
    OrbaxStep,
    UnsupportedOrbaxLayoutError,
    classify,
    is_orbax_tmp_name,
    steps_from_listing,
)
from cloudckpt.orbax._pytree import OrbaxTree, open_tree
from cloudckpt.storage.path import StoragePath

__all__ = [
    "COMMIT_FILE",
    "JSON_ITEM_FILE",
    "ListingTap",
    "OrbaxItem",
    "OrbaxStep",
    "OrbaxTree",
    "UnsupportedOrbaxLayoutError",
    "delete_step",
    "is_orbax_tmp_name",
    "item_metadata",
    "list_steps",
    "open_tree",
    "probe",
    "restore_item",
    "restore_step",
    "step_metadata",
    "steps_among",
    "steps_from_listing",
]

#: The cloudckpt handler that reads each Orbax item kind (what ``metadata()`` reports).
TYPESTRS = {"pytree": StandardCheckpointHandler.typestr(), "json": JsonCheckpointHandler.typestr()}


class ListingTap:
    """Forwards to a store and keeps what its listings returned.

    Lets Orbax discovery share the one listing of a root that cloudckpt's own
    discovery (``atomicity.scan``) makes, instead of listing the root twice.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self.infos: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def list_prefix(self, prefix: str) -> AsyncIterator[Any]:
        async for info in self._store.list_prefix(prefix):
            self.infos.append(info)
            yield info


async def steps_among(
    tap: ListingTap, root: str, names: Iterable[str], *, atomic_rename: bool
) -> list[OrbaxStep]:
    """Orbax steps among the children ``names`` of ``root`` that cloudckpt's scan left out.

    After a recursive scan through ``tap`` its listing holds every object
    already; after a delimiter scan it holds none, and only the children
    named are listed (one listing each, a few at once). A root of cloudckpt
    steps alone then costs no object listing at all.
    """
    names = list(names)
    if names and not tap.infos:
        limit = asyncio.Semaphore(16)

        async def list_one(name: str) -> None:
            async with limit:
                async for _ in tap.list_prefix(f"{root.rstrip('/')}/{name}"):
                    pass

        await asyncio.gather(*(list_one(n) for n in names))
    return steps_from_listing(root, tap.infos, atomic_rename=atomic_rename)


async def _listing(location: StoragePath) -> list[Any]:
    return [info async for info in location.backend.list_prefix(location.path)]


async def list_steps(root: StoragePath) -> list[OrbaxStep]:
    """Orbax steps (committed or not) among the children of ``root`` (one listing)."""
    infos = await _listing(root)
    return steps_from_listing(root.path, infos, atomic_rename=root.backend.supports_atomic_rename)


async def probe(step: StoragePath) -> OrbaxStep | None:
    """The Orbax step (or Orbax Checkpointer directory) at ``step``; None if it is not one."""
    prefix = step.path.rstrip("/") + "/"
    rels = {i.path[len(prefix) :]: i for i in await _listing(step) if i.path.startswith(prefix)}
    return classify(step.name, step.path, rels, atomic_rename=step.backend.supports_atomic_rename)


def require_committed(step: StoragePath, info: OrbaxStep) -> None:
    if not info.committed:
        why = (
            "it still has Orbax's temporary name"
            if is_orbax_tmp_name(info.name)
            else f"its {COMMIT_FILE} is missing"
        )
        raise ValueError(
            f"{step} is an uncommitted Orbax save ({why}): the save did not finish or is "
            "still running; restore another step"
        )


def _check_supported(step: StoragePath, item: OrbaxItem) -> None:
    if item.kind == "unsupported":
        where = step / item.name if item.name else step
        raise UnsupportedOrbaxLayoutError(f"{where}: Orbax item not supported: {item.detail}")


async def restore_item(step: StoragePath, item: OrbaxItem, args: CheckpointArgs | None) -> Any:
    """Restores one Orbax item with cloudckpt restore args (StandardRestore / JsonRestore)."""
    _check_supported(step, item)
    where = step / item.name if item.name else step
    if item.kind == "pytree":
        if args is not None and not isinstance(args, StandardRestore):
            raise TypeError(
                f"{where} is an Orbax pytree item; restore it with StandardRestore, "
                f"not {type(args).__name__}"
            )
        return await _pytree.restore(where, args)
    if args is not None and not isinstance(args, JsonRestore):
        raise TypeError(
            f"{where} is an Orbax JSON item; restore it with JsonRestore, not {type(args).__name__}"
        )
    return await _pytree.read_json(where / JSON_ITEM_FILE, "the Orbax JSON item")


def _single(step: StoragePath, info: OrbaxStep, kind: str) -> OrbaxItem:
    """The one item a single-handler checkpointer reads: the step itself, or ``default``."""
    for item in info.items:
        if item.name in ("", "default") and item.kind == kind:
            return item
    raise ValueError(
        f"{step} is an Orbax step with items {[i.name for i in info.items]}, not a single "
        f"{kind} item; restore it with a CompositeCheckpointHandler (the manager's default)"
    )


async def restore_step(
    step: StoragePath, info: OrbaxStep, handler: CheckpointHandler, args: CheckpointArgs | None
) -> Any:
    """Restores a committed Orbax step the way ``handler`` would restore its own format."""
    from cloudckpt.handlers.composite import CompositeCheckpointHandler, validate_item_name

    require_committed(step, info)
    if isinstance(handler, StandardCheckpointHandler):
        return await restore_item(step, _single(step, info, "pytree"), args)
    if isinstance(handler, JsonCheckpointHandler):
        return await restore_item(step, _single(step, info, "json"), args)
    if not isinstance(handler, CompositeCheckpointHandler):
        raise TypeError(
            f"{step} is an Orbax step; {type(handler).__name__} cannot read it (use the "
            "manager's default CompositeCheckpointHandler, or StandardCheckpointHandler)"
        )
    items = {i.name: i for i in info.items if i.name}
    if not items:
        raise ValueError(
            f"{step} is a single-item Orbax Checkpointer directory; restore it with "
            "cloudckpt.Checkpointer(StandardCheckpointHandler())"
        )
    if args is not None and not isinstance(args, Composite):
        raise TypeError(f"restore args must be a Composite, got {type(args).__name__}")
    plan: dict[str, CheckpointArgs | None] = {}
    if not args:
        plan = {name: None for name in items}
    else:
        for name, item_args in args.items():
            validate_item_name(name)
            if name not in items:
                raise KeyError(
                    f"item {name!r} is not in the Orbax step at {step}; it has: {sorted(items)}"
                )
            plan[name] = item_args
    results = await _pytree.gather_all([restore_item(step, items[n], a) for n, a in plan.items()])
    return Composite(**dict(zip(plan, results, strict=True)))


async def item_metadata(step: StoragePath, item: OrbaxItem) -> Any:
    where = step / item.name if item.name else step
    if item.kind == "pytree":
        return await _pytree.metadata(where)
    if item.kind == "json":
        return await _pytree.read_json(where / JSON_ITEM_FILE, "the Orbax JSON item")
    return None


async def step_metadata(step: StoragePath, info: OrbaxStep, *, with_items: bool) -> StepMetadata:
    """Orbax's ``_CHECKPOINT_METADATA`` as cloudckpt StepMetadata (items from the listing)."""
    require_committed(step, info)
    try:
        raw = await _pytree.read_json(step / STEP_METADATA, "the Orbax step metadata")
    except FileNotFoundError:  # Orbax before 0.6 wrote none
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    single = [i for i in info.items if i.name == ""]
    handlers: dict[str, str] | str = (
        TYPESTRS.get(single[0].kind, "unsupported")
        if single
        else {i.name: TYPESTRS.get(i.kind, "unsupported") for i in info.items}
    )
    meta = StepMetadata(
        item_handlers=handlers,
        metrics=raw.get("metrics") if isinstance(raw.get("metrics"), dict) else {},
        init_timestamp_nsecs=_int_or_none(raw.get("init_timestamp_nsecs")),
        commit_timestamp_nsecs=_int_or_none(raw.get("commit_timestamp_nsecs")),
        custom={"orbax": {"custom_metadata": raw.get("custom_metadata") or {}}},
    )
    if with_items:

        async def describe(item: OrbaxItem) -> Any:
            try:
                return await item_metadata(step, item)
            except Exception:  # an item that cannot be described is None, never fatal
                return None

        values = await asyncio.gather(*(describe(i) for i in info.items))
        meta.item_metadata = (
            values[0] if single else dict(zip([i.name for i in info.items], values, strict=True))
        )
    return meta


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def delete_step(step: StoragePath) -> None:
    """Deletes an Orbax step so that an interruption never leaves it looking committed.

    On object stores ``commit_success.txt`` goes first; on POSIX the step is
    first renamed to an Orbax temporary name. Only called when a user asked
    for this step's deletion explicitly.
    """
    backend = step.backend
    if backend.supports_atomic_rename:
        doomed = f"{step.path.rstrip('/')}{ORBAX_TMP_INFIX}-deleting-{uuid.uuid4().hex[:16]}"
        await backend.rename(step.path, doomed)
        await backend.delete_prefix(doomed)
        return
    await backend.delete((step / COMMIT_FILE).path)
    await backend.delete_prefix(step.path)
