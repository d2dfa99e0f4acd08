"""Sharded ``jax.Array`` pytrees, written straight to storage through tensorstore.

Save: on the caller's thread each process copies the parts it writes to host
memory (replicated shards are split among the processes holding them); in the background tensorstore writes
them as zarr v3 arrays (crc32c on every chunk) or, for small arrays, as packed
objects, with a bounded number of bytes in flight. The primary process writes
``pytree.json``: the tree's skeleton, and per leaf its dtype, shape, sharding
and where its bytes are. See docs/FORMAT.md.

Restore: each array is read straight into the target's sharding; each process
reads only the regions its devices need, and a region needed by several
processes is read by one of them and shared over the interconnect
(:mod:`.share`). Arrays the target does not name are never read.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import jax

from cloudckpt.format import backing as _backing
from cloudckpt.format import pytree as _document
from cloudckpt.format.pytree import METADATA_NAME, PytreeDocument
from cloudckpt.format.step import PYTREE_TYPESTR
from cloudckpt.handlers.args import CheckpointArgs
from cloudckpt.handlers.base import AsyncCheckpointHandler, save_attempt
from cloudckpt.handlers.pytree import chunks
from cloudckpt.handlers.pytree.budget import ByteBudget
from cloudckpt.handlers.pytree.host import collector_paused
from cloudckpt.handlers.pytree.match import match_targets
from cloudckpt.handlers.pytree.plan import PlanOptions, plan_save
from cloudckpt.handlers.pytree.read import ArrayMetadata, Reader, leaf_metadata
from cloudckpt.handlers.pytree.share import SharedReads
from cloudckpt.handlers.pytree.tree import flatten, rebuild, unflatten_like
from cloudckpt.handlers.pytree.write import write_plan
from cloudckpt.handlers.registry import register_with_handler
from cloudckpt.storage.path import StoragePath

__all__ = [
    "METADATA_NAME",
    "ArrayMetadata",
    "StandardCheckpointHandler",
    "StandardRestore",
    "StandardSave",
]

logger = logging.getLogger(__name__)

_MiB = 1 << 20


class StandardCheckpointHandler(AsyncCheckpointHandler):
    """Saves and restores pytrees of sharded arrays, scalars and strings.

    Args:
        pack_below_bytes: Arrays whose largest shard is smaller are packed
            with other small shards into a few objects instead of getting
            objects of their own. None (the default) chooses from the state:
            2 MiB for states up to about 100 GB, rising with the state's bytes
            (up to ``max_object_bytes / 8``) so that a pod-sized state is not
            hundreds of thousands of small objects
            (``cloudckpt.handlers.pytree.layout.pack_threshold``).
        max_object_bytes: Largest object written (chunks and packs are split
            to fit), bounding object size for upload and request rate.
        inner_chunk_bytes: Target size of the independently readable pieces
            inside a chunk, which a restore onto another sharding can fetch
            alone with ranged reads.
        max_inflight_bytes: Bytes being encoded, written or read at once;
            host memory during a save stays near the data being saved plus
            this.
        replica_parallel: When True (the default), data held by several
            processes (replicated over a data-parallel axis) is written by
            all of them, each a disjoint part (whole chunks of an array,
            whole entries of the packs), balanced by bytes; each process also
            copies only its parts to host memory. When False, the process of
            each shard's first device (``replica_id == 0``) writes all of it.
            Either way the checkpoint reads back on any topology.
    """

    TYPESTR = PYTREE_TYPESTR  # on disk: never change
    RESTORE_DOCUMENTS = (_document.METADATA_NAME,)

    def __init__(
        self,
        *,
        pack_below_bytes: int | None = None,
        max_object_bytes: int = 256 * _MiB,
        inner_chunk_bytes: int = 8 * _MiB,
        max_inflight_bytes: int = 256 * _MiB,
        replica_parallel: bool = True,
    ) -> None:
        for name, value in (
            ("pack_below_bytes", 1 if pack_below_bytes is None else pack_below_bytes),
            ("max_object_bytes", max_object_bytes),
            ("inner_chunk_bytes", inner_chunk_bytes),
            ("max_inflight_bytes", max_inflight_bytes),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.pack_below_bytes = pack_below_bytes
        self.max_object_bytes = max_object_bytes
        self.inner_chunk_bytes = min(inner_chunk_bytes, max_object_bytes)
        self.max_inflight_bytes = max_inflight_bytes
        self.replica_parallel = bool(replica_parallel)
        self._primary_host = 0
        self._members: tuple[int, ...] = ()

    def bind_process_group(self, primary_host: int, members: Sequence[int]) -> None:
        self._primary_host = primary_host
        self._members = tuple(members)

    def _plan_options(self) -> PlanOptions:
        return PlanOptions(
            pack_below_bytes=self.pack_below_bytes,
            max_object_bytes=self.max_object_bytes,
            inner_chunk_bytes=self.inner_chunk_bytes,
            primary_host=self._primary_host,
            members=self._members,
            replica_parallel=self.replica_parallel,
            attempt=save_attempt(),
        )

    def async_save(self, directory: StoragePath, args: CheckpointArgs) -> Sequence[Awaitable[None]]:
        if not isinstance(args, StandardSave):
            raise TypeError(
                f"StandardCheckpointHandler saves StandardSave args, got {type(args).__name__}"
            )
        # Planning allocates a few objects per leaf; with large trees the cyclic
        # collector's passes over them dominate, and nothing here makes cycles.
        collecting = gc.isenabled()
        gc.disable()
        try:
            plan = plan_save(args.item, self._plan_options())
        finally:
            if collecting:
                gc.enable()
        return [
            write_plan(
                directory,
                plan,
                primary_host=self._primary_host,
                max_inflight_bytes=self.max_inflight_bytes,
            )
        ]

    # ---------------------------------------------------------------------- restore
    async def _read_document(self, directory: StoragePath) -> PytreeDocument:
        return await _document.read_pytree(directory)

    async def metadata(self, directory: StoragePath) -> Any:
        document = await self._read_document(directory)
        values = [leaf_metadata(leaf, document.shardings) for leaf in document.leaves]
        return rebuild(document.skeleton, values)

    async def restore(self, directory: StoragePath, args: CheckpointArgs | None = None) -> Any:
        if args is None:
            args = StandardRestore()
        if not isinstance(args, StandardRestore):
            raise TypeError(
                f"StandardCheckpointHandler restores with StandardRestore args, got {type(args).__name__}"
            )
        with collector_paused():  # a restore of many leaves otherwise pays for full collections
            return await self._restore(directory, args)

    async def _restore(self, directory: StoragePath, args: StandardRestore) -> Any:
        document = await self._read_document(directory)
        saved = document.leaves
        reader = Reader(directory, saved, ByteBudget(self.max_inflight_bytes))
        if args.target is None:
            await _backing.check_stored(directory, document, range(len(saved)))
            # Packed entries are read beside the arrays (start_packed). A failing leaf
            # cancels the others: nothing of this restore runs (or places bytes) after
            # it has raised.
            packs = reader.start_packed((i, reader.regions_for(i, None)) for i in range(len(saved)))
            leaves = [reader.leaf_to_host(i) for i in range(len(saved))]
            values = (await chunks.all_or_cancel([packs, *leaves]))[1:]
            return rebuild(document.skeleton, list(values))
        by_path = {leaf.path: i for i, leaf in enumerate(saved)}
        targets, _ = flatten(args.target)
        plan = match_targets(directory, targets, saved, by_path, strict=args.strict)
        # A target's own shape bounds what is allocated for it; a shape taken from the
        # checkpoint (no shape, or its own ArrayMetadata) must first be backed by storage.
        await _backing.check_stored(
            directory,
            document,
            (i for i, t in plan.reads if isinstance(t, ArrayMetadata) or not hasattr(t, "shape")),
        )
        # Regions several processes need are read by one of them and shared (share.py).
        active = not self._members or len(self._members) == jax.process_count()
        shared = SharedReads(reader, plan.reads, enabled=args.share_reads and active)
        packs = reader.start_packed((i, shared.regions_for(i, t)) for i, t in plan.reads)
        leaves = [shared.leaf_like(i, t) for i, t in plan.reads]
        results = (await chunks.all_or_cancel([packs, *leaves]))[1:]
        values = {path: value for (path, _), value in zip(plan.paths, results, strict=True)}
        values.update(plan.untouched)
        return unflatten_like(args.target, values)


# ---------------------------------------------------------------------------------- args
@register_with_handler(StandardCheckpointHandler, for_save=True)
@dataclass(frozen=True)
class StandardSave(CheckpointArgs):
    """Save a pytree of arrays (any sharding), numpy values, scalars and strings."""

    item: Any


@register_with_handler(StandardCheckpointHandler, for_restore=True)
@dataclass(frozen=True)
class StandardRestore(CheckpointArgs):
    """Restore a pytree.

    Attributes:
        target: None restores every leaf to host numpy values with the saved
            structure. A pytree of ``jax.ShapeDtypeStruct`` (with shardings)
            or arrays restores those leaves only, each straight into its
            sharding.
        strict: When True, a target leaf missing from the checkpoint, or with
            another shape or dtype, raises ``ValueError``. When False, dtypes
            are cast and missing leaves are left as given, with a warning.
        share_reads: When True (the default) and the job has several
            processes, a region the target places on several processes is
            read from storage by one of them and sent to the others over the
            interconnect (JAX collectives), so the bucket serves each byte
            once. Every process must restore the same target (as with any
            multi-process restore). False: each process reads every region
            its devices need, as when collectives are unavailable.
    """

    target: Any = None
    strict: bool = True
    share_reads: bool = True


StandardCheckpointHandler.default_restore_args = StandardRestore
