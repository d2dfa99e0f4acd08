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
backend has ``read_into`` (the file system's preadv, GCS's streamed ranged
GET), inner chunks that land whole in a contiguous stretch of a destination
are read straight into it: no temporary and no extra copy. Inner chunks cut
between destinations (a restore onto another mesh), or landing in a strided
stretch of one, are scattered into place as their bytes arrive, crc32c
computed on the way (:mod:`cloudckpt.handlers.pytree.scatter`, any rank but
0); only what a scatter cannot take (rank 0) goes through a temporary, within
the ``scratch`` budget. A chunk object needed whole is read as the layout
cloudckpt's writer gives it says (inner chunks back to back, in C order, the
index last), before its index has been seen: one request up to
``RUN_BYTES``, a larger object in that many ranged reads at once, split
between inner chunks (a single object-store stream carries a fraction of a
host's network); the index, crc-checked, must confirm that layout, or the
object is read again by its index. The reader uses this module only on such
backends (see ``Reader.regions``); any other layout (an Orbax array, another
codec) stays on tensorstore's path.

Every byte is verified: a mismatch, a missing or short object, or a shard
index that points outside its object raises :class:`CorruptCheckpointError`
naming the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import crc32c
import numpy as np

from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format import layout
from cloudckpt.format.pytree import ZarrStorage
from cloudckpt.handlers.pytree.budget import ByteBudget
from cloudckpt.handlers.pytree.scatter import Scatter, supports
from cloudckpt.storage.path import StoragePath

#: Largest single ranged read (one inner chunk may be larger): bounds the temporary each
#: in-flight run costs, and splits a large object over several connections. On a
#: loopback emulator one stream is as fast as several; on S3 and GCS one stream carries a
#: fraction of a host's network, and AWS's performance guide suggests ranged GETs of
#: 8-16 MB. Measured here through a relay holding each connection to 25 MB/s (the
#: ``capped_streams`` benchmark), restoring a 256 MiB array saved as two 128 MiB objects
#: took 5.4 s with one GET per object, 0.58-0.84 s (GCS) and 0.92-1.15 s (S3) in spans
#: (two runs, five repetitions).
RUN_BYTES = 16 * 1024 * 1024
#: Default bound on those reads in flight per restore (a few runs at once).
SCRATCH_BYTES = 64 * 1024 * 1024
#: Requests in flight per restore, as tensorstore's request concurrency and the raw channel:
#: a request waits for its turn before its deadline starts, not after.
REQUESTS_IN_FLIGHT = 64
_MISSING = 2**64 - 1  # a shard index entry of an absent inner chunk


class _AtOffset(Protocol):
    """Something read from an object at a byte offset (an inner chunk, a pack entry)."""

    @property
    def offset(self) -> int: ...


T = TypeVar("T", bound=_AtOffset)


def supported(directory: StoragePath, storage: ZarrStorage) -> bool:
    """Whether this module reads ``storage`` under ``directory``: our layout, a ``read_into``.

    A backend whose ``read_into`` depends on its configuration (S3's, on a
    known region) says so with ``supports_read_into``.
    """
    backend = directory.backend
    usable = getattr(backend, "supports_read_into", True)
    return hasattr(backend, "read_into") and usable and handles(storage)


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
    storage: ZarrStorage,
    indices: Sequence[layout.Index],
    buffers: Sequence[np.ndarray],
    scratch: ByteBudget,
    gate: asyncio.Semaphore,
    counts: Counter[str] | None = None,
) -> None:
    """Fills ``buffers[k]`` with the stored values over ``indices[k]`` (stored dtype, C order).

    ``directory``'s backend must have ``read_into`` (see :func:`supported`);
    ``scratch`` bounds the bytes of ranged reads in flight (the only temporaries),
    ``gate`` the requests in flight (shared by all the reads of a restore);
    ``counts``, where given, gains the ``requests`` made and the ``bytes`` they asked for.
    """
    tally: Counter[str] = Counter() if counts is None else counts
    backend_read = directory.backend.read_into  # type: ignore[attr-defined]

    async def direct_io(path: str, offset: int, iov: list[memoryview]) -> int | None:
        async with gate:
            return await backend_read(path, offset, iov)  # type: ignore[no-any-return]

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
        where = directory / storage.chunk_key(chunk_pos)
        if not sharded:
            (slot,) = wanted.values()
            slot.offset, slot.nbytes = 0, object_bytes
        elif len(wanted) == n_inner:  # the whole object, index included, before the index
            index = await whole_object(where, wanted)
            if index is None:
                return
            locate(index, where, wanted)  # not laid out as written: follow its index
        else:
            index = np.empty(index_bytes, np.uint8)
            await _read_direct(
                direct_io,
                where,
                object_bytes - index_bytes,
                object_bytes,
                [memoryview(index)],
                tally,
            )
            locate(index, where, wanted)
        # Inner chunks are read straight into their destinations (whole into one
        # contiguous stretch, or scattered as they arrive); only what no scatter takes
        # (rank 0) goes through temporaries.
        slots = list(wanted.values())
        targets = {id(slot): _destination(slot) for slot in slots}
        direct = [slot for slot in slots if targets[id(slot)] is not None]
        spare = [slot for slot in slots if targets[id(slot)] is None]
        await asyncio.gather(
            *(read_direct(where, run, targets) for run in runs(direct, RUN_BYTES, _slot_bytes)),
            *(one_run(where, run) for run in runs(spare, RUN_BYTES, _slot_bytes)),
        )

    async def whole_object(where: StoragePath, wanted: dict[tuple[int, ...], _Inner]) -> Any:
        """Reads a whole sharded object straight into the destinations, index included.

        cloudckpt's writer stores inner chunks back to back in C order with the
        index last, so the object is read as that layout says before the index
        has been seen: in spans of whole inner chunks of at most ``RUN_BYTES``
        (one span for most objects), read at once. Returns None when the index
        (crc-checked) confirms that layout and every inner chunk verified;
        otherwise the index, for the caller to read by (whatever was placed is
        overwritten).
        """
        piece = inner_data + layout.CRC_BYTES
        order = [wanted[w] for w in itertools.product(*(range(r) for r in ratio))]
        for j, slot in enumerate(order):
            slot.offset, slot.nbytes = j * piece, piece
        targets = {id(slot): _destination(slot) for slot in order}
        spare = [slot for slot in order if targets[id(slot)] is None]
        index = np.empty(index_bytes, np.uint8)
        async with scratch.hold(len(spare) * piece):
            blobs = {id(slot): np.empty(piece, np.uint8) for slot in spare}
            crcs = np.empty((len(order), layout.CRC_BYTES), np.uint8)

            async def span(first: int, stop: int) -> None:
                """Inner chunks ``first:stop`` in one ranged read (the last one: the index too)."""
                iov: list[memoryview] = []
                for slot, crc in zip(order[first:stop], crcs[first:stop], strict=True):
                    target = targets[id(slot)]
                    if target is None:
                        iov.append(memoryview(blobs[id(slot)]))
                    else:
                        iov += [_into(target), memoryview(crc)]
                end = stop * piece
                if stop == len(order):
                    iov.append(memoryview(index))
                    end = object_bytes
                read = _read_direct(direct_io, where, first * piece, end, iov, tally)
                await _settled_read(read, order[first:stop], targets)

            # Nothing lands after this (nor on a re-read by the index): every span has
            # returned, or been cancelled and awaited.
            await all_or_cancel([span(a, b) for a, b in _spans(len(order), piece, RUN_BYTES)])
            _check_crc(index, where, object_bytes - index_bytes)
            table = np.frombuffer(index, "<u8", count=2 * n_inner).reshape(n_inner, 2)
            canonical = np.arange(n_inner, dtype=np.uint64) * piece
            if not (np.array_equal(table[:, 0], canonical) and bool(np.all(table[:, 1] == piece))):
                return index

            def verify() -> None:
                for slot in spare:
                    _place(blobs[id(slot)], slot.offset, [slot], where)
                _verify(where, order, targets, crcs)

            await _run_verify(verify, order, targets)
        return None

    def _destination(slot: _Inner) -> np.ndarray | Scatter | None:
        """Where ``slot``'s data is read to: one contiguous stretch, a scatter, or a temporary."""
        target = _target(slot)
        if target is not None or not supports(inner):
            return target
        parts = []
        box = tuple((o, o + i) for o, i in zip(slot.origin, inner, strict=True))
        for k in slot.regions:
            overlap = layout.overlap(box, indices[k])
            if overlap is None:
                continue
            dst = tuple(
                slice(a - s, b - s) for (a, b), (s, _) in zip(overlap, indices[k], strict=True)
            )
            within = tuple((a - o, b - o) for (a, b), o in zip(overlap, slot.origin, strict=True))
            parts.append((buffers[k][dst], within if len(within) >= 2 else (within[0], (0, 1))))
        return Scatter(inner, storage.stored, parts)

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

    async def read_direct(where: StoragePath, run: list[_Inner], targets: dict[int, Any]) -> None:
        start, end = run[0].offset, run[-1].offset + run[-1].nbytes
        crcs = np.empty((len(run), layout.CRC_BYTES), np.uint8)
        iov: list[Any] = []
        for slot, crc in zip(run, crcs, strict=True):
            iov += [_into(targets[id(slot)]), memoryview(crc)]
        await _settled_read(_read_direct(direct_io, where, start, end, iov, tally), run, targets)
        await _run_verify(lambda: _verify(where, run, targets, crcs), run, targets)

    async def one_run(where: StoragePath, run: list[_Inner]) -> None:
        start, end = run[0].offset, run[-1].offset + run[-1].nbytes
        async with scratch.hold(end - start):
            blob = np.empty(end - start, np.uint8)
            await _read_direct(direct_io, where, start, end, [memoryview(blob)], tally)
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

    await all_or_cancel([one_object(pos, wanted) for pos, wanted in needed.items()])


async def all_or_cancel(coros: list[Any]) -> list[Any]:
    """Runs ``coros`` concurrently, returns their results; on the first error cancels the rest,
    awaits them, raises.

    A corrupt object ends the restore at once, and no sibling read is left
    running (or starting a thread) after the caller's event loop has moved on.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except GeneratorExit:
        raise  # the loop is closing this coroutine: nothing can be scheduled or awaited
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _read_direct(
    direct_io: Any,
    where: StoragePath,
    start: int,
    end: int,
    iov: list[memoryview],
    tally: Counter[str],
) -> None:
    """Bytes ``start:end`` of ``where`` read by the backend straight into ``iov``."""
    tally.update(requests=1, bytes=end - start)
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


def _into(target: np.ndarray | Scatter) -> Any:
    """What a read is handed for ``target``: a flat byte view, or the scatter itself (a sink)."""
    return target if isinstance(target, Scatter) else memoryview(_flat_bytes(target))


def _verify(where: StoragePath, slots: list[_Inner], targets: dict[int, Any], crcs: Any) -> None:
    """Checks each read-in slot against its stored crc32c (``crcs``, a row per slot).

    A contiguous destination is checksummed where it lies; a scatter has
    computed its crc32c as the bytes went by. Slots read to temporaries
    (no target) were checked when placed.
    """
    for slot, crc in zip(slots, crcs, strict=True):
        target = targets[id(slot)]
        if target is None:
            continue
        stored = int.from_bytes(crc.tobytes(), "little")
        if isinstance(target, Scatter):
            good = target.failed is None and target.written == target.nbytes
            good = good and target.crc == stored
        else:
            good = crc32c.crc32c(memoryview(_flat_bytes(target))) == stored
        if not good:
            raise CorruptCheckpointError(
                f"checksum mismatch in {where} bytes {slot.offset}-"
                f"{slot.offset + slot.nbytes}: the chunk data is corrupt, "
                "restore another step"
            )


async def _settled_read(read: Any, slots: list[_Inner], targets: dict[int, Any]) -> None:
    """Awaits ``read``, then (also when it fails) the scatters it fed: no byte lands later."""
    try:
        await read
    except GeneratorExit:
        raise  # the loop is closing this coroutine: nothing can be awaited
    except BaseException:
        await _settle(slots, targets)
        raise
    await _settle(slots, targets)


async def _settle(slots: list[_Inner], targets: dict[int, Any]) -> None:
    """Waits until the scatters among ``targets`` have placed every piece handed over.

    Their failures are kept for ``_verify`` (which then refuses the slot); here
    only the waiting matters: no byte of a finished (or failed) read lands later.
    """
    for slot in slots:
        target = targets[id(slot)]
        last = target.pending if isinstance(target, Scatter) else None
        if last is not None:  # a future, not a coroutine: nothing left unawaited if cancelled
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wrap_future(last))


async def _run_verify(verify: Any, slots: list[_Inner], targets: dict[int, Any]) -> None:
    """Runs ``verify`` off the event loop where it has checksums to compute, else inline."""
    if all(isinstance(targets[id(slot)], Scatter) for slot in slots):
        verify()  # comparisons only: no thread hand-off
    else:
        await asyncio.to_thread(verify)


def _flat_bytes(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array's bytes as a flat uint8 view (any dtype, bfloat16 included)."""
    return array.reshape(-1).view(np.uint8)


def _spans(count: int, piece: int, limit: int) -> list[tuple[int, int]]:
    """``count`` back-to-back pieces of ``piece`` bytes in even spans of at most ``limit`` bytes.

    Each span is one ranged read: a large object is fetched over several
    connections at once instead of one (a single stream of an object store
    carries far less than a host's network; AWS's performance guide suggests
    ranged GETs of 8-16 MB). A piece larger than ``limit`` is a span of its own.
    """
    per = max(1, limit // piece)
    n = -(-count // per)  # as few spans as the limit allows, of even sizes
    return [(count * k // n, count * (k + 1) // n) for k in range(n)]


def runs(items: Sequence[T], limit: int, size: Callable[[T], int]) -> list[list[T]]:
    """``items`` (anything with an ``offset``; ``size(item)`` bytes from it) by offset, in
    runs of back-to-back items of at most ``limit`` bytes: one ranged read each.

    An item larger than ``limit`` is a run of its own. Inner chunks (their
    ``nbytes`` include the crc32c) and pack entries (``nbytes`` plus it) both.
    """
    out: list[list[T]] = []
    for item in sorted(items, key=lambda i: i.offset):
        last = out[-1] if out else None
        if (
            last is not None
            and item.offset == last[-1].offset + size(last[-1])
            and item.offset + size(item) - last[0].offset <= limit
        ):
            last.append(item)
        else:
            out.append([item])
    return out


def _slot_bytes(slot: _Inner) -> int:
    return slot.nbytes
