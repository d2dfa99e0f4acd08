"""The commit phase of a save: writes of the planned regions and packs.

Where the backend writes caller buffers directly (S3's ``put_buffers``),
chunk objects wholly inside a region are encoded here
(:mod:`cloudckpt.handlers.pytree.encode`) and packs are sent as they lie in
memory; everything else (partial chunks, other backends) goes through
tensorstore. Either way the zarr metadata is created through tensorstore.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, cast

import jax
import numpy as np
import tensorstore as ts

from cloudckpt.format import layout
from cloudckpt.format.pytree import write_pytree
from cloudckpt.handlers.pytree import encode, tail
from cloudckpt.handlers.pytree.budget import ByteBudget
from cloudckpt.handlers.pytree.plan import Region, SavePlan
from cloudckpt.handlers.pytree.read import ts_open
from cloudckpt.storage.path import StoragePath


class _DirectWrites(Protocol):
    """A backend whose ``supports_put_buffers`` is True (``S3Backend.put_buffers``)."""

    async def put_buffers(
        self,
        path: str,
        buffers: Sequence[memoryview],
        *,
        hedge: bool = False,
        crc32c: int | None = None,
    ) -> None: ...


async def write_plan(
    directory: StoragePath, plan: SavePlan, *, primary_host: int, max_inflight_bytes: int
) -> None:
    """Writes what ``plan`` gives this process; the primary also writes ``pytree.json``.

    Runs on the background loop. Every process writes its regions and packs; the
    primary creates each zarr array's metadata and, after its own writes, the
    pytree document (step-level ordering across processes is the caller's).
    """
    backend = directory.backend
    context = backend.tensorstore_context()
    # Hedges of chunk writes go through a cache of their own: through the same
    # cache a second write of a chunk would join the stalled one's writeback.
    hedge_context = tail.hedge_context(context)
    primary = jax.process_index() == primary_host
    direct = backend.supports_put_buffers
    budget = ByteBudget(max_inflight_bytes)
    stores: dict[tuple[int, bool], asyncio.Future[Any]] = {}
    deadlines = backend.deadlines
    written = backend.latencies(tail.WRITES)
    # Requests wait for a slot here, not in tensorstore's admission queue, so
    # that the answer times the hedges are judged by are the store's, not the
    # queue's (tensorstore admits 64 at a time: a request issued behind a wave
    # would look late for its wait).
    slots = tail.request_slots(deadlines)

    def array_spec(leaf: int) -> dict[str, Any]:
        return {
            "driver": "zarr3",
            "kvstore": (directory / plan.leaves_json[leaf]["storage"]["key"]).kvstore_spec(),
            "metadata": plan.zarr_specs[leaf],
            "store_data_equal_to_fill_value": True,
        }

    def open_array(leaf: int, hedge: bool = False) -> Awaitable[Any]:
        # Chunks are written through arrays opened on the planned metadata
        # (no request): writing a chunk does not wait for ``zarr.json``, which
        # the primary creates alongside (``create_metadata``).
        if (leaf, hedge) not in stores:
            spec = {**array_spec(leaf), "assume_metadata": True}
            opened = ts_open(spec, hedge_context if hedge else context)
            stores[(leaf, hedge)] = asyncio.ensure_future(opened)
        return stores[(leaf, hedge)]

    def where(leaf: int) -> str:
        return str(directory / plan.leaves_json[leaf]["storage"]["key"])

    async def write_region(region: Region) -> None:
        assert region.data is not None
        nbytes = region.data.nbytes
        data = region.data
        stored = np.dtype(plan.zarr_specs[region.leaf]["data_type"])
        if data.dtype != stored:
            data = data.view(stored)
        if direct and encode.covers_whole_chunks(region.index, plan.zarr_specs[region.leaf]):
            await write_chunks(region.leaf, region.index, data)
            region.data = None
            return
        target = layout.index_slices(region.index)

        async def write(hedge: bool) -> None:
            store = await open_array(region.leaf, hedge)
            await store[target].write(data, can_reference_source_data_indefinitely=True)

        async with budget.hold(nbytes), slots:
            try:
                # The chunk objects are under this attempt's own prefix: a hedge
                # writes the same bytes to the same keys, whichever lands last.
                await tail.hedge(
                    lambda: write(False), lambda: write(True), nbytes, deadlines, written
                )
            except Exception as exc:
                tail.raise_if_stalled(exc, where(region.leaf), "write")
                raise
        region.data = None  # free the host copy as soon as it is stored

    async def write_chunks(leaf: int, index: layout.Index, data: np.ndarray) -> None:
        # Each chunk object is encoded when it has a request slot, and only the
        # pieces not lying contiguously in ``data`` are copied (``staged``, held
        # in the budget until its PUT is answered).
        meta = plan.zarr_specs[leaf]
        chunk = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        inner = encode.inner_shape(meta)
        staged = encode.staged_bytes(index, data, chunk, inner)
        array = directory / plan.leaves_json[leaf]["storage"]["key"]
        put_buffers = cast(_DirectWrites, backend).put_buffers

        async def one(position: tuple[int, ...]) -> None:
            async with budget.hold(staged) if staged else contextlib.nullcontext(), slots:
                encoded = await asyncio.to_thread(
                    encode.encode_chunk, data, index, position, chunk, inner
                )
                # Under this attempt's own prefix: a hedge writes the same bytes
                # to the same key, whichever lands last.
                await put_buffers(
                    (array / "/".join(["c", *map(str, position)])).path,
                    encoded.buffers,
                    hedge=True,
                    crc32c=encoded.crc32c,
                )

        await asyncio.gather(*(one(p) for p in encode.chunk_positions(index, chunk)))

    async def create_metadata(leaf: int) -> None:
        # ``zarr.json`` is created (conditionally: it must not exist yet); a
        # hedge opens-or-creates it, in a context of its own, and checks that
        # what it finds is this metadata.
        try:
            async with slots:
                await tail.hedge(
                    lambda: ts_open({**array_spec(leaf), "create": True}, context),
                    lambda: ts_open(
                        {**array_spec(leaf), "create": True, "open": True},
                        tail.hedge_context(context),
                    ),
                    0,
                    deadlines,
                    written,
                )
        except Exception as exc:
            tail.raise_if_stalled(exc, where(leaf), "create")
            raise

    # Packs first: the largest objects, and written with peers still to come
    # (a hedge is judged by the requests that start after it).
    tasks: list[Awaitable[None]] = [_write_packs(directory, plan, context, slots, direct)]
    tasks += [write_region(r) for r in plan.regions]
    if primary:
        tasks += [create_metadata(leaf) for leaf in plan.zarr_specs]
    # The packed leaves' records for pytree.json, left out of the blocking part of the
    # save (plan_save), are made on a worker thread while the data is written.
    describe, plan.describe = plan.describe, None  # once per plan
    described = asyncio.ensure_future(asyncio.to_thread(describe)) if describe else None
    failed: BaseException | None = None
    try:
        await asyncio.gather(*tasks)
    finally:
        if described is not None:
            # Its thread runs on regardless: waited for, its error taken, either way.
            await asyncio.wait([described])
            failed = described.exception()
    if failed is not None:
        raise failed
    if primary:
        await write_pytree(
            directory,
            plan.skeleton,
            plan.shardings,
            plan.leaves_json,
            attempt=plan.attempt,
            placements=plan.placements,
        )


async def _write_packs(
    directory: StoragePath,
    plan: SavePlan,
    context: ts.Context,
    slots: contextlib.AbstractAsyncContextManager[Any],
    direct: bool,
) -> None:
    if not plan.packs:
        return
    me = jax.process_index()
    for e in plan.pack_entries:
        if e.writer == me:
            buffer = plan.packs[e.obj]
            data = buffer[e.offset : e.offset + e.nbytes]
            data.flags.writeable = False
            end = e.offset + e.nbytes
            buffer[end : end + layout.CRC_BYTES] = np.frombuffer(layout.entry_crc(data), np.uint8)
    packs, plan.packs = plan.packs, {}
    backend = directory.backend
    if direct:
        # Sent from the buffers they were copied into: no second copy. Under
        # this attempt's own prefix, so a hedge writes the same bytes to the same key.
        put_buffers = cast(_DirectWrites, backend).put_buffers

        async def put(name: str, buf: np.ndarray) -> None:
            async with slots:
                await put_buffers((directory / name).path, [memoryview(buf)], hedge=True)

        await asyncio.gather(*(put(name, buf) for name, buf in packs.items()))
        return
    kvstore = await ts.KvStore.open(directory.kvstore_spec(), context=context)
    written = backend.latencies(tail.WRITES)

    async def write(name: str, data: bytes) -> None:
        try:
            # Pack objects are under this attempt's own prefix: a hedge writes
            # the same bytes to the same key.
            async with slots:
                await tail.hedge(
                    lambda: kvstore.write(name, data),
                    lambda: kvstore.write(name, data),
                    len(data),
                    backend.deadlines,
                    written,
                )
        except Exception as exc:
            tail.raise_if_stalled(exc, str(directory / name), "write")
            raise

    await asyncio.gather(*(write(name, buf.tobytes()) for name, buf in packs.items()))
