"""The commit phase of a save: tensorstore writes of the planned regions and packs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from cloudckpt.format import layout
from cloudckpt.format.pytree import write_pytree
from cloudckpt.handlers.pytree import tail
from cloudckpt.handlers.pytree.budget import ByteBudget
from cloudckpt.handlers.pytree.plan import Region, SavePlan
from cloudckpt.handlers.pytree.read import ts_open
from cloudckpt.storage.path import StoragePath


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
    primary = jax.process_index() == primary_host
    budget = ByteBudget(max_inflight_bytes)
    stores: dict[int, asyncio.Future[Any]] = {}

    def open_array(leaf: int) -> Awaitable[Any]:
        if leaf not in stores:
            spec = {
                "driver": "zarr3",
                "kvstore": (directory / plan.leaves_json[leaf]["storage"]["key"]).kvstore_spec(),
                "metadata": plan.zarr_specs[leaf],
                "store_data_equal_to_fill_value": True,
            }
            if primary:
                spec["create"] = True
            else:
                spec["assume_metadata"] = True
            stores[leaf] = asyncio.ensure_future(ts_open(spec, context))
        return stores[leaf]

    async def write_region(region: Region) -> None:
        assert region.data is not None
        nbytes = region.data.nbytes
        store = await open_array(region.leaf)
        data = region.data
        stored = np.dtype(plan.zarr_specs[region.leaf]["data_type"])
        if data.dtype != stored:
            data = data.view(stored)
        async with budget.hold(nbytes):
            try:
                await store[layout.index_slices(region.index)].write(
                    data, can_reference_source_data_indefinitely=True
                )
            except Exception as exc:
                tail.raise_if_stalled(
                    exc, str(directory / plan.leaves_json[region.leaf]["storage"]["key"]), "write"
                )
                raise
        region.data = None  # free the host copy as soon as it is stored

    async def create_metadata_only(leaf: int) -> None:
        await open_array(leaf)

    tasks: list[Awaitable[None]] = [write_region(r) for r in plan.regions]
    if primary:
        tasks += [create_metadata_only(leaf) for leaf in plan.zarr_specs]
    tasks += [_write_packs(directory, plan, context)]
    await asyncio.gather(*tasks)
    if primary:
        await write_pytree(
            directory,
            plan.skeleton,
            plan.shardings,
            plan.leaves_json,
            attempt=plan.attempt,
            placements=plan.placements,
        )


async def _write_packs(directory: StoragePath, plan: SavePlan, context: ts.Context) -> None:
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
    kvstore = await ts.KvStore.open(directory.kvstore_spec(), context=context)
    packs, plan.packs = plan.packs, {}

    async def write(name: str, data: bytes) -> None:
        try:
            await kvstore.write(name, data)
        except Exception as exc:
            tail.raise_if_stalled(exc, str(directory / name), "write")
            raise

    await asyncio.gather(*(write(name, buf.tobytes()) for name, buf in packs.items()))
