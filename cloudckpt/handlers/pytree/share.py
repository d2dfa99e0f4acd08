"""Read once, share: each stored byte of a replicated restore is fetched by one process.

When a restore target places the same region of an array on devices of
several processes (a state replicated over a data-parallel axis), every
process reading it would make the bucket serve that region once per process.
Instead, from the target shardings alone (identically on every process, no
coordinator), each such region gets one *reader*: the process holding it with
the fewest bytes assigned so far, largest regions first (the same greedy rule
as replica-parallel save, :class:`~cloudckpt.handlers.pytree.layout.WriterLoads`).
The reader reads it (checking crc32c as every read does) and the others
receive it over the interconnect with one JAX collective per leaf:

* a stacked array of shape ``(k, *shape)`` is built, ``k`` being the number
  of devices holding each region (the mesh axes the target's spec leaves
  out); device ``j`` of a region's replicas holds slice ``j``, which is the
  region's data on one device of its reader and zeros everywhere else;
* a ``shard_map`` sums the stack over those axes (``psum``) with the values
  bit-cast to unsigned integers, so ``x + 0`` is exact (no ``-0.0 + 0.0``),
  and bit-casts the sum back: every device gets its region bit for bit.

Only leaves restored into a ``NamedSharding`` over every device of the job,
with the saved dtype, and with at least one region on several processes are
shared; everything else (one process, keys, strings, host values, casts,
subsets of the job, other sharding types) reads directly, as before.

Collectives must be issued in the same order by every process: reads run
concurrently, but each leaf's collective waits for the previous leaf's turn
(leaf order of the restore, the same on every process).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format import layout as _format
from cloudckpt.format.layout import Index
from cloudckpt.handlers.pytree import keys, layout
from cloudckpt.handlers.pytree.read import Reader

logger = logging.getLogger(__name__)

__all__ = ["SharedReads"]


@dataclass
class _Leaf:
    """How one leaf is shared: its turn, its stacked layout, and what this process reads."""

    turn: int
    sharding: NamedSharding
    stacked: NamedSharding  # (k, *shape), the left-out axes over the first dimension
    k: int
    # (stack position, region) -> the parts of it this process reads, placed there
    placed: dict[tuple[int, Index], list[Index]]
    mine: list[Index]  # parts this process reads (its share of the bucket)


def _uint_for(dtype: np.dtype) -> np.dtype | None:
    """The unsigned integer a dtype is bit-cast to for the sum, or None if it cannot be."""
    # ml_dtypes floats (bfloat16, float8_*) have kind "V": ask jax what they are.
    if dtype == np.bool_:
        bits = 8
    elif jnp.issubdtype(dtype, jnp.integer):
        bits = jnp.iinfo(dtype).bits
    elif jnp.issubdtype(dtype, jnp.floating):
        bits = jnp.finfo(dtype).bits
    else:  # complex: no bit-cast to one integer
        return None
    if bits != 8 * dtype.itemsize or dtype.itemsize not in (1, 2, 4, 8):
        return None  # sub-byte types (int4, float4) are packed: no exact bit-cast
    if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        return None
    return np.dtype(f"uint{8 * dtype.itemsize}")


def _spec_axes(spec: P, ndim: int) -> list[Any]:
    entries = list(spec) + [None] * (ndim - len(spec))
    return entries[:ndim]


def _used_axes(entries: list[Any]) -> set[str]:
    used: set[str] = set()
    for e in entries:
        if e is None:
            continue
        used.update(e if isinstance(e, tuple) else (e,))
    return used


class SharedReads:
    """Decides, per restore, which leaves are shared and who reads each region.

    Call order (every process, the same targets): construct, then
    :meth:`regions_for` for each read (to prefetch packed entries), then
    :meth:`leaf_like` for each read, concurrently. Leaves not shared are
    delegated to the :class:`Reader` unchanged.
    """

    def __init__(self, reader: Reader, reads: Sequence[tuple[int, Any]], *, enabled: bool) -> None:
        self.reader = reader
        self.leaves: dict[int, _Leaf] = {}
        self._turns: list[asyncio.Event] = []
        if enabled and jax.process_count() > 1:
            self._plan(reads)

    # ---------------------------------------------------------------------- planning
    def _eligible(self, leaf: int, target: Any) -> NamedSharding | None:
        info = self.reader.saved[leaf]
        if info.kind == "str" or info.dtype is None or keys.is_key_leaf(info):
            return None
        sharding = getattr(target, "sharding", None)
        if not isinstance(sharding, NamedSharding) or not hasattr(target, "dtype"):
            return None
        if np.dtype(target.dtype) != info.dtype or _uint_for(info.dtype) is None:
            return None
        if math.prod(info.shape) == 0:
            return None
        # The collective runs on the target's mesh: every process must take part.
        if len(sharding.device_set) != jax.device_count():
            return None
        return sharding

    def _plan(self, reads: Sequence[tuple[int, Any]]) -> None:
        candidates: list[tuple[int, NamedSharding, list[layout.Shard]]] = []
        for leaf, target in reads:
            sharding = self._eligible(leaf, target)
            if sharding is None:
                continue
            info = self.reader.saved[leaf]
            assert info.dtype is not None
            shards = _shards(sharding, info.shape, info.dtype.itemsize)
            if any(len(s.replicas) > 1 for s in shards):
                candidates.append((leaf, sharding, shards))
        # Regions held by one process are read by it; the rest, largest first, by
        # the least-loaded of their processes (ties to the lower index): the same
        # answer on every process.
        # A region on several processes is split along the stored chunks (whole inner
        # chunks: no stored byte is fetched twice) into up to one part per process.
        loads = layout.WriterLoads()
        spread: list[tuple[int, int, int]] = []
        splits: dict[tuple[int, int], tuple[list[Index], list[int]]] = {}
        for n, (leaf, _, shards) in enumerate(candidates):
            info = self.reader.saved[leaf]
            assert info.dtype is not None
            unit = getattr(info.storage, "inner", None)  # packed entries stay whole
            for k, s in enumerate(shards):
                if len(s.replicas) <= 1:
                    loads.add(s.writer, s.nbytes)
                    continue
                parts = _split(s.index, unit, len(s.replicas))
                sizes = [math.prod(_format.index_shape(p)) * info.dtype.itemsize for p in parts]
                splits[(n, k)] = (parts, sizes)
                spread.append((-s.nbytes, n, k))
        spread.sort()
        chosen: dict[tuple[int, int], list[int]] = {}
        for _, n, k in spread:
            s = candidates[n][2][k]
            chosen[(n, k)] = loads.assign(s.replicas, splits[(n, k)][1])
        me = jax.process_index()
        for n, (leaf, sharding, shards) in enumerate(candidates):
            shape = self.reader.saved[leaf].shape
            stacked, k = _stacked(sharding, len(shape))
            holders = _holders(stacked, (k, *shape))
            placed: dict[tuple[int, Index], list[Index]] = {}
            mine: list[Index] = []
            for j, s in enumerate(shards):
                parts = splits[(n, j)][0] if (n, j) in splits else [s.index]
                readers = chosen.get((n, j), [s.writer])
                for part, reader in zip(parts, readers, strict=True):
                    if reader != me:
                        continue
                    # One device of the reader holding the region gets the part: the
                    # first in the mesh's order, so every process names the same one.
                    position = next(pos for pos, proc in holders[s.index] if proc == reader)
                    placed.setdefault((position, s.index), []).append(part)
                    mine.append(part)
            self.leaves[leaf] = _Leaf(len(self._turns), sharding, stacked, k, placed, mine)
            self._turns.append(asyncio.Event())
        if self._turns:
            self._turns[0].set()
            logger.debug(
                "restore shares %d leaves; this process reads %d regions",
                len(self.leaves),
                sum(len(s.mine) for s in self.leaves.values()),
            )

    # ----------------------------------------------------------------------- reading
    def regions_for(self, leaf: int, target: Any) -> list[Index]:
        """The regions of ``leaf`` this process reads from storage for ``target``."""
        shared = self.leaves.get(leaf)
        if shared is None:
            return self.reader.regions_for(leaf, target)
        return list(shared.mine)

    async def leaf_like(self, leaf: int, target: Any) -> Any:
        """A leaf placed like ``target``: read here, or read once and shared."""
        shared = self.leaves.get(leaf)
        if shared is None:
            return await self.reader.leaf_like(leaf, target)
        failure: BaseException | None = None
        pieces: dict[Index, np.ndarray] = {}
        try:
            try:
                read = await self.reader.regions(leaf, shared.mine)  # one batch
                pieces = dict(zip(shared.mine, read, strict=True))
            except Exception as exc:  # the peers still wait in this leaf's collective
                failure = exc
            await self._turns[shared.turn].wait()
            value, failed = self._share(leaf, shared, pieces, failed=failure is not None)
        finally:
            # Even on failure, so this process's later leaves are not left waiting.
            if shared.turn + 1 < len(self._turns):
                self._turns[shared.turn + 1].set()
        if failure is not None:
            raise failure
        if failed:
            raise CorruptCheckpointError(
                f"leaf {self.reader.saved[leaf].path} in {self.reader.directory}: "
                f"{failed} process(es) could not read their part of it, which this process "
                "shares; their own error says why (see their logs)"
            )
        return value

    def _share(
        self, leaf: int, shared: _Leaf, pieces: dict[Index, np.ndarray], *, failed: bool
    ) -> tuple[jax.Array, int]:
        """The leaf, summed over its holders, and how many processes failed to read their parts.

        A process whose reads failed still takes part (with zeros), so that no
        peer waits forever in the collective; the count tells every process.
        """
        info = self.reader.saved[leaf]
        dtype = info.dtype
        assert dtype is not None
        uint = _uint_for(dtype)
        assert uint is not None
        shape = info.shape

        def piece(index: tuple[slice, ...]) -> np.ndarray:
            position = index[0].indices(shared.k)[0]
            region = _format.normalize_index(index[1:], shape)
            block = np.zeros(_format.index_shape(region), uint)
            for part in shared.placed.get((position, region), ()):
                at = tuple(slice(a - r, b - r) for (a, b), (r, _) in zip(part, region, strict=True))
                if part in pieces:
                    block[at] = pieces[part].view(uint)  # bits as read: crc32c-checked
            return block.reshape((1, *block.shape))

        stack = jax.make_array_from_callback((shared.k, *shape), shared.stacked, piece)
        # One failure flag per device; a process whose reads failed sets its first one.
        mesh = shared.sharding.mesh
        flags = _flags(mesh)
        me = jax.process_index()
        first = next(d for d in mesh.devices.flat if d.process_index == me)
        flagged = _format.normalize_index(
            flags.devices_indices_map((mesh.size,))[first], (mesh.size,)
        )

        def flag(index: tuple[slice, ...]) -> np.ndarray:
            mark = failed and _format.normalize_index(index, (mesh.size,)) == flagged
            return np.array([int(mark)], np.int32)

        value, count = _summed(shared.sharding, shared.stacked, np.dtype(dtype))(
            stack, jax.make_array_from_callback((mesh.size,), flags, flag)
        )
        return value, int(np.asarray(count.addressable_data(0))[0])


def _split(region: Index, unit: tuple[int, ...] | None, count: int) -> list[Index]:
    """``region`` in up to ``count`` slabs along whole ``unit`` blocks (stored inner chunks).

    The slabs run along the dimension crossing the most blocks; their edges lie on
    block boundaries, so each stored block a slab covers is read by one process.
    """
    if unit is None or count <= 1 or not region:
        return [region]
    blocks = [
        (b - 1) // u - a // u + 1 if b > a else 0 for (a, b), u in zip(region, unit, strict=True)
    ]
    d = max(range(len(region)), key=lambda i: (blocks[i], -i))
    n = min(count, blocks[d])
    if n <= 1:
        return [region]
    a, b = region[d]
    u = unit[d]
    first = a // u
    edges = [a] + [(first + (blocks[d] * j) // n) * u for j in range(1, n)] + [b]
    out = []
    for lo, hi in itertools.pairwise(edges):
        part = list(region)
        part[d] = (lo, hi)
        out.append(tuple(part))
    return out


def _shards(sharding: NamedSharding, shape: tuple[int, ...], itemsize: int) -> list[layout.Shard]:
    return layout.global_shards(shape, itemsize, sharding)


def _stacked(sharding: NamedSharding, ndim: int) -> tuple[NamedSharding, int]:
    """The stack's sharding: the axes the spec leaves out, over a new first dimension."""
    mesh = sharding.mesh
    entries = _spec_axes(sharding.spec, ndim)
    used = _used_axes(entries)
    left = tuple(a for a in mesh.axis_names if a not in used)
    k = math.prod(mesh.shape[a] for a in left)
    return NamedSharding(mesh, P(left if left else None, *entries)), k


def _holders(stacked: NamedSharding, shape: tuple[int, ...]) -> dict[Index, list[tuple[int, int]]]:
    """Per region: (stack position, process) of each device holding it, in mesh order."""
    by_device = stacked.devices_indices_map(shape)
    out: dict[Index, list[tuple[int, int]]] = {}
    for device in stacked.mesh.devices.flat:
        index = _format.normalize_index(by_device[device], shape)
        out.setdefault(index[1:], []).append((index[0][0], device.process_index))
    return out


def _flags(mesh: Any) -> NamedSharding:
    """One int32 per device of ``mesh``: the failure flags summed with each leaf."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


@lru_cache(maxsize=256)
def _summed(target: NamedSharding, stacked: NamedSharding, dtype: np.dtype) -> Any:
    """Jitted: a ``(k, *shape)`` unsigned stack and the failure flags -> (the stack's sum
    over its first dimension, as ``dtype``; the flags' total)."""
    left = stacked.spec[0]
    axes = () if left is None else left
    every = tuple(target.mesh.axis_names)

    def body(block: jax.Array, flags: jax.Array) -> tuple[jax.Array, jax.Array]:
        total = jax.lax.psum(block, axes) if axes else block
        total = total[0]
        failed = jax.lax.psum(flags, every)
        if dtype == np.bool_:
            return total != 0, failed
        return jax.lax.bitcast_convert_type(total, dtype), failed

    fn = jax.shard_map(
        body,
        mesh=target.mesh,
        in_specs=(stacked.spec, _flags(target.mesh).spec),
        out_specs=(target.spec, P()),
        check_vma=False,
    )
    return jax.jit(fn, out_shardings=(target, NamedSharding(target.mesh, P())))
