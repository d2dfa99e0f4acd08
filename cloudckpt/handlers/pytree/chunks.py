"""Reading cloudckpt's own zarr chunks directly: ranged reads, vectorised crc32c, one copy.

tensorstore's zarr3 driver verifies crc32c at a few hundred MiB/s on small
hosts, far below the channel, so arrays laid out exactly as
:func:`cloudckpt.format.layout.zarr_metadata` writes them (uncompressed,
``bytes`` + ``crc32c``, optionally inside ``sharding_indexed`` with the index
at the end) are read here instead: per chunk object, its shard index (one
small ranged read, crc-checked and validated before it addresses anything),
then one ranged read per run of adjacent needed inner chunks, each inner
chunk's crc32c checked with the hardware ``crc32c`` package (several GB/s)
and its overlap copied once into the caller's destination buffers. Where the
backend has ``read_into`` (the file system), inner chunks that land whole in
a contiguous stretch of a destination are read by the kernel straight into
it: no temporary and no copy. The reader uses this module only on such
backends (see ``Reader.regions``); any other layout (an Orbax array, another
codec) stays on tensorstore's path.

Every byte is verified: a mismatch, a missing or short object, or a shard
index that points outside its object raises :class:`CorruptCheckpointError`
naming the object.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np

from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format import layout
from cloudckpt.format.pytree import ZarrStorage
from cloudckpt.handlers.pytree import tail
from cloudckpt.handlers.pytree.budget import ByteBudget
from cloudckpt.storage.path import StoragePath

#: Largest single ranged read: bounds the temporary each in-flight run costs.
RUN_BYTES = 16 * 1024 * 1024
#: Default bound on those reads in flight per restore (a few runs at once).
SCRATCH_BYTES = 64 * 1024 * 1024
_MISSING = 2**64 - 1  # a shard index entry of an absent inner chunk


def handles(storage: ZarrStorage) -> bool:
    """Whether ``storage`` is laid out exactly as cloudckpt writes arrays (this reader's job)."""
    meta = storage.metadata
    if meta.get("chunk_key_encoding") != {"name": "default"}:
        return False
    try:
        expected = layout.zarr_metadata(
            tuple(meta["shape"]), storage.stored, list(storage.chunk), list(storage.inner)
        )
    except (KeyError, TypeError, ValueError):
        return False
    return meta.get("codecs") == expected["codecs"] and all(
        c % i == 0 for c, i in zip(storage.chunk, storage.inner, strict=True)
    )


@dataclass
class _Inner:
    """One needed inner chunk: where its bytes are and which regions want them."""

    origin: tuple[int, ...]  # global element coordinates of its first element
    offset: int = 0
    nbytes: int = 0
    regions: list[int] = field(default_factory=list)


async def read_into(
    directory: StoragePath,
    kvstore: Any,
    storage: ZarrStorage,
    indices: Sequence[layout.Index],
    buffers: Sequence[np.ndarray],
    scratch: ByteBudget,
) -> None:
    """Fills ``buffers[k]`` with the stored values over ``indices[k]`` (stored dtype, C order).

    ``scratch`` bounds the bytes of ranged reads in flight (the only temporaries).
    """
    inner = storage.inner
    ratio = tuple(c // i for c, i in zip(storage.chunk, inner, strict=True))
    sharded = storage.inner != storage.chunk
    itemsize = storage.stored.itemsize
    inner_data = math.prod(inner) * itemsize
    # Needed inner chunks per chunk object, keyed by their position inside the chunk.
    needed: dict[tuple[int, ...], dict[tuple[int, ...], _Inner]] = {}
    for k, index in enumerate(indices):
        ranges = [range(a // i, -(-b // i)) for (a, b), i in zip(index, inner, strict=True)]
        for g in itertools.product(*ranges):
            chunk_pos = tuple(x // r for x, r in zip(g, ratio, strict=True))
            within = tuple(x % r for x, r in zip(g, ratio, strict=True))
            slot = needed.setdefault(chunk_pos, {}).get(within)
            if slot is None:
                origin = tuple(x * i for x, i in zip(g, inner, strict=True))
                slot = needed[chunk_pos][within] = _Inner(origin)
            slot.regions.append(k)

    object_bytes = storage.object_bytes
    n_inner = math.prod(ratio)
    index_bytes = n_inner * layout.SHARD_INDEX_ENTRY_BYTES + layout.CRC_BYTES

    def locate(blob: Any, where: StoragePath, wanted: dict[tuple[int, ...], _Inner]) -> None:
        """Sets each wanted slot's place from a shard index (``blob``: index and its crc32c)."""
        _check_crc(blob, where, object_bytes - index_bytes)
        table = np.frombuffer(blob, "<u8", count=(index_bytes - layout.CRC_BYTES) // 8)
        table = table.reshape((*ratio, 2))
        for within, slot in wanted.items():
            offset, nbytes = (int(v) for v in table[within])
            if offset == _MISSING and nbytes == _MISSING:
                raise CorruptCheckpointError(
                    f"missing data in {where}: its shard index has no inner chunk {within}; "
                    "the checkpoint is corrupt, restore another step"
                )
            if nbytes != inner_data + layout.CRC_BYTES or offset + nbytes > (
                object_bytes - index_bytes
            ):
                raise CorruptCheckpointError(
                    f"corrupt shard index in {where}: inner chunk {within} at bytes "
                    f"{offset}+{nbytes} is not a {inner_data + layout.CRC_BYTES}-byte piece "
                    "of the object's data; the checkpoint is corrupt, restore another step"
                )
            slot.offset, slot.nbytes = offset, nbytes

    async def one_object(chunk_pos: tuple[int, ...], wanted: dict[tuple[int, ...], _Inner]) -> None:
        key = storage.chunk_key(chunk_pos)
        where = directory / key
        direct_io = getattr(directory.backend, "read_into", None)
        if not sharded:
            (slot,) = wanted.values()
            slot.offset, slot.nbytes = 0, object_bytes
        elif len(wanted) == n_inner and direct_io is None:
            # The whole object is needed: one request, as the raw channel would make.
            async with scratch.hold(object_bytes):
                blob = await _read(kvstore, key, where, 0, object_bytes)
                locate(memoryview(blob)[object_bytes - index_bytes :], where, wanted)
                await asyncio.to_thread(_place, blob, 0, list(wanted.values()), where)
            return
        else:
            async with scratch.hold(index_bytes):
                blob = await _read(kvstore, key, where, object_bytes - index_bytes, object_bytes)
            locate(blob, where, wanted)
        slots = list(wanted.values())
        if direct_io is not None:
            # Inner chunks landing whole in one contiguous stretch of a destination are
            # read by the kernel straight into it; only the rest go through temporaries.
            targets = {id(slot): _target(slot) for slot in slots}
            direct = [slot for slot in slots if targets[id(slot)] is not None]
            slots = [slot for slot in slots if targets[id(slot)] is None]
            await asyncio.gather(
                *(read_direct(direct_io, where, run, targets) for run in _runs(direct, RUN_BYTES))
            )
        await asyncio.gather(
            *(one_run(key, where, run, direct_io) for run in _runs(slots, RUN_BYTES))
        )

    def _target(slot: _Inner) -> np.ndarray | None:
        """The destination stretch ``slot`` fills whole and contiguously, if there is one."""
        if len(slot.regions) != 1:
            return None
        k = slot.regions[0]
        box = tuple((o, o + i) for o, i in zip(slot.origin, inner, strict=True))
        if layout.overlap(box, indices[k]) != box:
            return None
        dst = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(box, indices[k], strict=True))
        view = buffers[k][dst]
        return view if view.flags.c_contiguous else None

    async def read_direct(
        direct_io: Any, where: StoragePath, run: list[_Inner], targets: dict[int, Any]
    ) -> None:
        start, end = run[0].offset, run[-1].offset + run[-1].nbytes
        crcs = np.empty((len(run), layout.CRC_BYTES), np.uint8)
        iov: list[memoryview] = []
        for slot, crc in zip(run, crcs, strict=True):
            iov += [memoryview(_flat_bytes(targets[id(slot)])), memoryview(crc)]
        await _read_direct(direct_io, where, start, end, iov)

        def verify() -> None:
            for slot, crc in zip(run, crcs, strict=True):
                data = memoryview(_flat_bytes(targets[id(slot)]))
                if crc32c.crc32c(data) != int.from_bytes(crc.tobytes(), "little"):
                    raise CorruptCheckpointError(
                        f"checksum mismatch in {where} bytes {slot.offset}-"
                        f"{slot.offset + slot.nbytes}: the chunk data is corrupt, "
                        "restore another step"
                    )

        await asyncio.to_thread(verify)

    async def one_run(key: str, where: StoragePath, run: list[_Inner], direct_io: Any) -> None:
        start, end = run[0].offset, run[-1].offset + run[-1].nbytes
        async with scratch.hold(end - start):
            blob: Any
            if direct_io is not None:  # the kernel fills a scratch buffer: one copy fewer
                blob = np.empty(end - start, np.uint8)
                await _read_direct(direct_io, where, start, end, [memoryview(blob)])
            else:
                blob = await _read(kvstore, key, where, start, end)
            # crc32c and numpy's copy release the GIL: verify and place off the event loop.
            await asyncio.to_thread(_place, blob, start, run, where)

    def _place(blob: Any, start: int, run: list[_Inner], where: StoragePath) -> None:
        for slot in run:
            lo = slot.offset - start
            piece = memoryview(blob)[lo : lo + slot.nbytes]
            _check_crc(piece, where, slot.offset)
            data = np.frombuffer(piece, storage.stored, count=math.prod(inner)).reshape(inner)
            box = tuple((o, o + i) for o, i in zip(slot.origin, inner, strict=True))
            for k in slot.regions:
                overlap = layout.overlap(box, indices[k])
                if overlap is None:
                    continue
                src = tuple(
                    slice(a - o, b - o) for (a, b), o in zip(overlap, slot.origin, strict=True)
                )
                dst = tuple(
                    slice(a - s, b - s) for (a, b), (s, _) in zip(overlap, indices[k], strict=True)
                )
                buffers[k][dst] = data[src]

    await asyncio.gather(*(one_object(pos, wanted) for pos, wanted in needed.items()))


async def _read(kvstore: Any, key: str, where: StoragePath, start: int, end: int) -> bytes:
    backend = where.backend
    try:
        # Hedged when late, as every read of the pytree handler (see tail).
        result = await tail.hedge(
            lambda: kvstore.read(key, byte_range=slice(start, end)),
            lambda: kvstore.read(key, byte_range=slice(start, end)),
            end - start,
            backend.deadlines,
            backend.latencies(tail.READS),
        )
    except ValueError as exc:
        if "OUT_OF_RANGE" not in str(exc):
            raise
        raise CorruptCheckpointError(
            f"truncated data: {where} ends before bytes {start}-{end}; "
            "the checkpoint is corrupt, restore another step"
        ) from exc
    if result.state == "missing":
        raise CorruptCheckpointError(
            f"missing data: {where} does not exist; the checkpoint is corrupt, restore another step"
        )
    value = result.value
    if len(value) != end - start:
        raise CorruptCheckpointError(
            f"truncated data: {where} ends before bytes {start}-{end}; "
            "the checkpoint is corrupt, restore another step"
        )
    return value


async def _read_direct(
    direct_io: Any, where: StoragePath, start: int, end: int, iov: list[memoryview]
) -> None:
    """Bytes ``start:end`` of ``where`` read by the backend straight into ``iov``."""
    got = await direct_io(where.path, start, iov)
    if got is None:
        raise CorruptCheckpointError(
            f"missing data: {where} does not exist; the checkpoint is corrupt, restore another step"
        )
    if got != end - start:
        raise CorruptCheckpointError(
            f"truncated data: {where} ends before bytes {start}-{end}; "
            "the checkpoint is corrupt, restore another step"
        )


def _check_crc(piece: Any, where: StoragePath, offset: int) -> None:
    """Checks the crc32c (little-endian, last 4 bytes) of ``piece``, read at ``offset``."""
    view = memoryview(piece)
    n = len(view) - layout.CRC_BYTES
    if crc32c.crc32c(view[:n]) != int.from_bytes(view[n:], "little"):
        raise CorruptCheckpointError(
            f"checksum mismatch in {where} bytes {offset}-{offset + len(view)}: "
            "the chunk data is corrupt, restore another step"
        )


def _flat_bytes(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array's bytes as a flat uint8 view (any dtype, bfloat16 included)."""
    return array.reshape(-1).view(np.uint8)


def _runs(slots: list[_Inner], limit: int) -> list[list[_Inner]]:
    """``slots`` in runs of back-to-back pieces of at most ``limit`` bytes (one read each)."""
    runs: list[list[_Inner]] = []
    for slot in sorted(slots, key=lambda s: s.offset):
        last = runs[-1] if runs else None
        if (
            last is not None
            and slot.offset == last[-1].offset + last[-1].nbytes
            and slot.offset + slot.nbytes - last[0].offset <= limit
        ):
            last.append(slot)
        else:
            runs.append([slot])
    return runs
