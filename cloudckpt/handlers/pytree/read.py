"""The restore side: matching a target to the saved leaves, and reading regions.

Each process reads only the regions its target shardings address; packed
entries are fetched in runs, one ranged read per run of adjacent entries, and
every entry's crc32c is checked. Nothing is allocated from a size read off
storage until :mod:`cloudckpt.format.backing` has checked it
against a listing (the caller's job, before reading).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format import layout
from cloudckpt.format import pytree as _document
from cloudckpt.format.pytree import Leaf
from cloudckpt.handlers.pytree import chunks, keys, tail
from cloudckpt.handlers.pytree.budget import ByteBudget
from cloudckpt.handlers.pytree.host import PageSizes, empty_aligned, prefault
from cloudckpt.storage.path import StoragePath


@dataclass(frozen=True)
class ArrayMetadata:
    """What a saved array is, without its data (a ``jax.ShapeDtypeStruct`` look-alike).

    Attributes:
        shape: Global shape.
        dtype: numpy dtype, or jax's key dtype (``key<fry>``) for typed PRNG keys.
        sharding: How it was sharded when saved (mesh axes and partition
            spec for a ``NamedSharding``), or None for host values.
        kind: ``jax``, ``ndarray``, ``np_scalar`` or ``py`` (Python scalar).
        nbytes: Size in bytes.
    """

    shape: tuple[int, ...]
    dtype: Any  # np.dtype, or a jax PRNG key dtype
    sharding: dict[str, Any] | None = None
    kind: str = "jax"
    nbytes: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def leaf_metadata(leaf: Leaf, shardings: list[Any]) -> Any:
    if leaf.dtype is None:
        return leaf.value
    if keys.is_key_leaf(leaf):
        return _key_metadata(leaf, shardings)
    return ArrayMetadata(
        shape=leaf.shape,
        dtype=leaf.dtype,
        sharding=None if leaf.sharding is None else shardings[leaf.sharding],
        kind=leaf.kind,
        nbytes=leaf.nbytes,
    )


def _key_metadata(leaf: Leaf, shardings: list[Any]) -> ArrayMetadata:
    _, dtype, _ = keys.impl_facts(leaf)
    shape = keys.key_shape_of(leaf)
    sharding = None if leaf.sharding is None else shardings[leaf.sharding]
    return ArrayMetadata(
        shape=shape,
        dtype=dtype,
        sharding=keys.logical_sharding(sharding, len(shape)),
        kind=leaf.kind,
        nbytes=leaf.nbytes,  # the uint32 key data
    )


async def ts_open(spec: dict[str, Any], context: ts.Context) -> Any:
    try:
        return await ts.open(spec, context=context)
    except Exception as exc:
        raise storage_error(exc, spec) from exc


def storage_error(exc: Exception, spec: dict[str, Any]) -> Exception:
    text = str(exc)
    where = json_location(spec)
    if "DATA_LOSS" in text or "checksum" in text.lower() or "digest" in text.lower():
        return CorruptCheckpointError(f"corrupt data in {where}: {text.splitlines()[0]}")
    if "NOT_FOUND" in text:
        return CorruptCheckpointError(f"missing data in {where}: {text.splitlines()[0]}")
    return exc


def json_location(spec: dict[str, Any]) -> str:
    kv = spec.get("kvstore", spec)
    bucket = kv.get("bucket")
    return f"{kv['driver']}://{bucket + '/' if bucket else ''}{kv.get('path', '')}"


# ------------------------------------------------------------------------------- reading
async def _new_buffers(shapes: list[tuple[int, ...]], dtype: np.dtype) -> list[np.ndarray]:
    """Aligned buffers for regions about to be read, made on a worker thread.

    Mapping new memory takes the process's memory-map lock for writing, which
    waits while prefaults and reads fault pages in. On the event loop that wait
    stalled every read (1 GiB from GCS, median of 8: 0.698 s onto 2x4 and 0.632 s
    onto the saved mesh, against 0.615 s and 0.58 s made on a worker; from files
    0.415 s against 0.261 s, np.fromfile 0.192 s).
    """
    return await asyncio.to_thread(lambda: [empty_aligned(s, dtype) for s in shapes])


class Reader:
    """Reads saved leaves, region by region, within a byte budget."""

    def __init__(self, directory: StoragePath, saved: Sequence[Leaf], budget: ByteBudget) -> None:
        self.directory = directory
        self.saved = saved
        self.budget = budget
        self.context = directory.backend.tensorstore_context()
        self._stores: dict[int, asyncio.Future[Any]] = {}
        #: The same arrays opened again in a context of their own, for hedged reads.
        self._hedge_stores: dict[int, asyncio.Future[Any]] = {}
        self._kvstore: asyncio.Future[Any] | None = None
        self._packed: dict[tuple[int, layout.Index], np.ndarray] = {}
        #: The packed entries' reads started by ``start_packed``, which packed leaves await.
        self._pack_reads: asyncio.Future[None] | None = None
        #: The pack entries each (leaf, region) needs, found once per restore.
        self._overlaps: dict[tuple[int, layout.Index], list[layout.PackEntry]] = {}
        #: The regions of each (sharding, shape) on this process's devices (``_addressable``).
        self._regions: dict[tuple[Any, tuple[int, ...]], list[layout.Index]] = {}
        # Hedged reads wait for a slot here, not in tensorstore's admission queue
        # (their answer times must measure the store; see tail.REQUESTS_IN_FLIGHT).
        self._slots = tail.request_slots(directory.backend.deadlines)
        # Ranged reads in flight on the direct chunk path (their temporaries).
        self._scratch = ByteBudget(min(budget.limit, chunks.SCRATCH_BYTES))
        self._requests = asyncio.Semaphore(chunks.REQUESTS_IN_FLIGHT)
        #: Requests (and bytes asked for) of the direct chunk reads, for the benchmarks.
        self.direct_reads: Counter[str] = Counter()
        # One measure of the page sizes for all of this restore's new memory: measured per
        # read group, every group mapped its first step with huge pages and its second
        # with small ones, whichever was slow at the time.
        self._pages = PageSizes()

    def regions_for(self, leaf: int, target: Any) -> list[layout.Index]:
        """The regions of ``leaf`` this process reads for ``target`` (None: all of it)."""
        info = self.saved[leaf]
        if info.kind == "str":
            return []
        if keys.is_key_leaf(info):
            return keys.regions(info, target)
        shape = info.shape
        sharding = getattr(target, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding):
            return [layout.full_index(shape)]
        return self._addressable(sharding, shape)

    def _addressable(
        self, sharding: jax.sharding.Sharding, shape: tuple[int, ...]
    ) -> list[layout.Index]:
        """The distinct regions of ``shape`` that ``sharding`` puts on this process's devices.

        Found once per (sharding, shape) in a restore: a state's many leaves share a few
        (jax's shardings are hashable; one that is not is looked up every time).
        """
        try:
            found = self._regions.get((sharding, shape))
        except TypeError:  # unhashable
            return _addressable_regions(sharding, shape)
        if found is None:
            found = self._regions[(sharding, shape)] = _addressable_regions(sharding, shape)
        return list(found)

    def start_packed(self, requests: Any) -> asyncio.Future[None]:
        """Starts :meth:`prefetch_packed` of ``requests`` and returns its task, without waiting.

        The arrays' reads go on meanwhile, so the packs cost no round trip of
        their own before the arrays' bytes flow; a packed leaf's regions wait
        for this task before they read what the task has not. The caller awaits
        the task with the leaves (its failure is theirs) and cancels it with them.
        """
        task = asyncio.ensure_future(self.prefetch_packed(list(requests)))
        self._pack_reads = task
        return task

    async def prefetch_packed(self, requests: Any) -> None:
        """Reads the packed entries these (leaf, regions) need: one ranged read per run.

        Entries of one object that lie back to back are fetched together, in
        ranged reads of at most ``chunks.RUN_BYTES`` (an entry may be larger)
        issued at once, so a full restore reads each pack once, over several
        connections where it is large (a pack object may be ``max_object_bytes``,
        and one cloud stream carries a fraction of a host's network), while a
        partial one reads only the entries it needs.
        """
        wanted: dict[str, list[layout.PackEntry]] = {}
        for leaf, regions in requests:
            storage = self.saved[leaf].storage
            if not isinstance(storage, _document.PackedStorage):
                continue
            seen: set[layout.Index] = set()
            for region in regions:
                for entry in self._overlapping(leaf, storage, region):
                    if (leaf, entry.index) in self._packed or entry.index in seen:
                        continue
                    seen.add(entry.index)
                    wanted.setdefault(entry.obj, []).append(dataclasses.replace(entry, leaf=leaf))
        runs = [
            run
            for entries in wanted.values()
            for run in chunks.runs(entries, chunks.RUN_BYTES, _entry_bytes)
        ]
        if runs:
            kvstore = await self._packs()
            await asyncio.gather(*(self._read_run(kvstore, run) for run in runs))

    def _overlapping(
        self, leaf: int, storage: _document.PackedStorage, region: layout.Index
    ) -> list[layout.PackEntry]:
        """``storage.overlapping(region)``, found once per (leaf, region) in this restore."""
        key = (leaf, region)
        found = self._overlaps.get(key)
        if found is None:
            found = self._overlaps[key] = storage.overlapping(region)
        return found

    async def _read_run(self, kvstore: Any, run: list[layout.PackEntry]) -> None:
        start = run[0].offset
        end = run[-1].offset + run[-1].nbytes + layout.CRC_BYTES
        async with self.budget.hold(end - start), self._slots:
            try:
                result = await tail.hedge(
                    lambda: kvstore.read(run[0].obj, byte_range=slice(start, end)),
                    lambda: kvstore.read(run[0].obj, byte_range=slice(start, end)),
                    end - start,
                    self.directory.backend.deadlines,
                    self.directory.backend.latencies(tail.READS),
                )
            except ValueError as exc:
                tail.raise_if_stalled(exc, str(self.directory / run[0].obj), "read")
                if "OUT_OF_RANGE" not in str(exc):
                    raise
                raise CorruptCheckpointError(
                    f"truncated data: {self.directory / run[0].obj} ends before bytes "
                    f"{start}-{end} that its pack entries need; the checkpoint is corrupt, "
                    "restore another step"
                ) from exc
            except Exception as exc:
                tail.raise_if_stalled(exc, str(self.directory / run[0].obj), "read")
                raise
        if result.state == "missing":
            raise CorruptCheckpointError(
                f"missing data: {self.directory / run[0].obj} does not exist"
            )
        # One read-only view of the run: each entry's crc32c is checked over a slice of it
        # and the entry kept as that slice, so the run is copied once, into its region.
        blob = np.frombuffer(result.value, np.uint8)
        if blob.size != end - start:
            raise CorruptCheckpointError(
                f"checksum mismatch in {self.directory / run[0].obj} bytes {start}-{end}: "
                "the pack object is shorter than its entries"
            )
        for entry in run:
            lo = entry.offset - start
            data = blob[lo : lo + entry.nbytes]
            stored = blob[lo + entry.nbytes : lo + entry.nbytes + layout.CRC_BYTES].tobytes()
            if layout.entry_crc(data) != stored:
                raise CorruptCheckpointError(
                    f"checksum mismatch in {self.directory / entry.obj} bytes {entry.offset}-"
                    f"{entry.offset + entry.nbytes + layout.CRC_BYTES}: the packed data is corrupt"
                )
            self._packed[(entry.leaf, entry.index)] = data

    def _open(self, leaf: int, hedge: bool = False) -> Awaitable[Any]:
        stores = self._hedge_stores if hedge else self._stores
        if leaf not in stores:
            storage = self.saved[leaf].storage
            assert isinstance(storage, _document.ZarrStorage)
            spec = {
                "driver": "zarr3",
                "kvstore": (self.directory / storage.key).kvstore_spec(),
                "metadata": storage.metadata,
                "assume_metadata": True,
                "fill_missing_data_reads": False,
                "recheck_cached_data": False,
            }
            context = tail.hedge_context(self.context) if hedge else self.context
            stores[leaf] = asyncio.ensure_future(ts_open(spec, context))
        return stores[leaf]

    def _packs(self) -> Awaitable[Any]:
        if self._kvstore is None:
            self._kvstore = asyncio.ensure_future(
                ts.KvStore.open(self.directory.kvstore_spec(), context=self.context)
            )
        return self._kvstore

    async def region(self, leaf: int, index: layout.Index) -> np.ndarray:
        """The saved values of ``leaf`` over ``index``, as a host array of the saved dtype."""
        return (await self.regions(leaf, [index]))[0]

    async def regions(self, leaf: int, indices: Sequence[layout.Index]) -> list[np.ndarray]:
        """The saved values of ``leaf`` over each of ``indices`` (host arrays, saved dtype).

        Array regions are read in tensorstore batches of up to the byte budget,
        so regions cutting through the same chunk object (a restore onto
        another sharding) share its requests: one read of its shard index and
        one of each run of inner chunks, instead of one each per region.
        """
        info = self.saved[leaf]
        dtype = info.dtype
        assert dtype is not None
        storage = info.storage
        shapes = [layout.index_shape(index) for index in indices]
        if isinstance(storage, _document.EmptyStorage):
            return [np.zeros(shape, dtype) for shape in shapes]
        if isinstance(storage, _document.PackedStorage):
            if self._pack_reads is not None:  # shared with other leaves: never cancelled here
                await asyncio.shield(self._pack_reads)
            await self.prefetch_packed([(leaf, indices)])  # no request for entries already read
            return [self._packed_region(leaf, i, dtype) for i in indices]
        out: list[np.ndarray | None] = [None] * len(shapes)
        group: list[int] = []
        group_bytes = 0
        groups: list[tuple[list[int], int]] = []
        for k, shape in enumerate(shapes):
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes == 0:
                out[k] = np.zeros(shape, dtype)
                continue
            if group and group_bytes + nbytes > self.budget.limit:
                groups.append((group, group_bytes))
                group, group_bytes = [], 0
            group.append(k)
            group_bytes += nbytes
        if group:
            groups.append((group, group_bytes))

        # Direct chunk reads where the backend reads into our buffers (``read_into``: the
        # file system's preadv, GCS's and S3's streamed ranged GETs): one request per whole chunk
        # object, bytes placed once, crc32c vectorised; 5-20x faster than tensorstore's
        # zarr path on file, at the raw GET's pace on GCS and S3.
        direct = isinstance(storage, _document.ZarrStorage) and chunks.supported(
            self.directory, storage
        )

        async def read_direct(members: list[int], nbytes: int) -> None:
            assert isinstance(storage, _document.ZarrStorage)
            async with self.budget.hold(nbytes):
                buffers = await _new_buffers([shapes[k] for k in members], storage.stored)
                # The pages are mapped by a worker while the first requests are in flight
                # (host.prefault): fewer faults as the bodies land, contents untouched.
                mapped = asyncio.ensure_future(asyncio.to_thread(prefault, buffers, self._pages))
                try:
                    await chunks.read_into(
                        self.directory,
                        storage,
                        [indices[k] for k in members],
                        buffers,
                        self._scratch,
                        self._requests,
                        self.direct_reads,
                    )
                finally:
                    await mapped  # its thread holds the buffers: it finishes either way
            for k, buffer in zip(members, buffers, strict=True):
                out[k] = buffer if buffer.dtype == dtype else buffer.view(dtype)

        async def read_group(members: list[int], nbytes: int) -> None:
            if direct:
                return await read_direct(members, nbytes)
            store = await self._open(leaf)
            stored = np.dtype(store.dtype.numpy_dtype)

            async def into(source: Any) -> list[np.ndarray]:
                # tensorstore copies the decoded chunks straight into buffers of ours,
                # aligned so that CPU devices adopt them: one copy from storage to device.
                buffers = await _new_buffers([shapes[k] for k in members], stored)
                with ts.Batch() as batch:
                    writes = [
                        ts.array(buffer).write(source[layout.index_slices(indices[k])], batch=batch)
                        for k, buffer in zip(members, buffers, strict=True)
                    ]
                await asyncio.gather(*writes)
                return buffers

            async def again() -> list[np.ndarray]:
                # A hedge reads into buffers of its own: the slow request may still land.
                return await into(await self._open(leaf, hedge=True))

            async with self.budget.hold(nbytes), self._slots:
                try:
                    backend = self.directory.backend
                    buffers = await tail.hedge(
                        lambda: into(store),
                        again,
                        nbytes,
                        backend.deadlines,
                        backend.latencies(tail.READS),
                    )
                except Exception as exc:
                    where = self._array_location(leaf)
                    tail.raise_if_stalled(exc, str(where), "read")
                    raise storage_error(exc, {"kvstore": where.kvstore_spec()}) from exc
            for k, buffer in zip(members, buffers, strict=True):
                out[k] = buffer if buffer.dtype == dtype else buffer.view(dtype)

        # A failing group cancels the others: nothing of this leaf is left running.
        await chunks.all_or_cancel([read_group(members, nbytes) for members, nbytes in groups])
        pieces = [piece for piece in out if piece is not None]
        assert len(pieces) == len(out)  # every region was read or is empty
        return pieces

    def _array_location(self, leaf: int) -> StoragePath:
        """Where the array of ``leaf`` is stored (named in errors)."""
        storage = self.saved[leaf].storage
        assert isinstance(storage, _document.ZarrStorage)
        return self.directory / storage.key

    def _packed_region(self, leaf: int, index: layout.Index, dtype: np.dtype) -> np.ndarray:
        """``leaf`` over ``index`` from its pack entries, all read already (``prefetch_packed``)."""
        out = empty_aligned(layout.index_shape(index), dtype)
        covered = 0
        storage = self.saved[leaf].storage
        assert isinstance(storage, _document.PackedStorage)
        # They tile the leaf (parse_pytree checks).
        for entry in self._overlapping(leaf, storage, index):
            overlap = layout.overlap(entry.index, index)
            assert overlap is not None
            data = self._packed[(leaf, entry.index)]
            piece = np.frombuffer(data, dtype).reshape(layout.index_shape(entry.index))
            src = tuple(
                slice(a - s, b - s) for (a, b), (s, _) in zip(overlap, entry.index, strict=True)
            )
            dst = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(overlap, index, strict=True))
            out[dst] = piece[src]
            covered += math.prod(layout.index_shape(overlap))
        if covered != out.size:
            raise CorruptCheckpointError(
                f"packed data of leaf {self.saved[leaf].path} in {self.directory} does not cover "
                "the requested region; the pytree metadata is corrupt"
            )
        return out

    async def leaf_to_host(self, leaf: int) -> Any:
        """A leaf as saved, on the host (numpy array, numpy scalar, Python scalar, str)."""
        info = self.saved[leaf]
        if info.kind == "str":
            return info.value
        value = await self.region(leaf, layout.full_index(info.shape))
        if keys.is_key_leaf(info):
            return keys.wrap_host(info, value)
        return _as_kind(info, value)

    async def leaf_like(self, leaf: int, target: Any) -> Any:
        """A leaf shaped, typed and placed like ``target``."""
        info = self.saved[leaf]
        if info.kind == "str":
            return info.value
        if keys.is_key_leaf(info):
            return await keys.read_like(info, target, lambda index: self.region(leaf, index))
        shape = info.shape
        dtype = np.dtype(target.dtype) if hasattr(target, "dtype") else info.dtype
        sharding = getattr(target, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding):
            value = await self.region(leaf, layout.full_index(shape))
            return _as_kind(info, value.astype(dtype, copy=False))
        indices = self._addressable(sharding, shape)
        pieces = await self.regions(leaf, indices)
        by_index = {
            idx: piece.astype(dtype, copy=False) for idx, piece in zip(indices, pieces, strict=True)
        }
        return jax.make_array_from_callback(
            shape, sharding, lambda idx: by_index[layout.normalize_index(idx, shape)]
        )


def _addressable_regions(sharding: Any, shape: tuple[int, ...]) -> list[layout.Index]:
    return sorted(
        {
            layout.normalize_index(idx, shape)
            for idx in sharding.addressable_devices_indices_map(shape).values()
        }
    )


def _entry_bytes(entry: layout.PackEntry) -> int:
    """A pack entry's bytes in its object: its data and the crc32c after it."""
    return entry.nbytes + layout.CRC_BYTES


def _as_kind(info: Leaf, value: np.ndarray) -> Any:
    kind = info.kind
    if kind == "py":
        return {"bool": bool, "int": int, "float": float, "complex": complex}[str(info.py_type)](
            value.item()
        )
    if kind == "np_scalar":
        return value[()]
    return value
