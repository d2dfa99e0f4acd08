"""Which process writes each byte of a sharded pytree: shards, writers, chunk grids, packs.

Every process computes the same layout from global information (shapes and
shardings), so no process has to tell another where it wrote anything.

* A *shard* is one distinct region of an array, held by one or more
  processes (its replicas). Replicated data is written once. With replica-
  parallel writes (the default) a shard held by several processes is split
  into chunk-aligned *parts* (:func:`split_shards`) and each part goes to the
  least-loaded replica (:class:`WriterLoads`), so the bytes of a replicated
  state are spread over its processes. Without, a shard's writer is the
  process of the first device holding it in the sharding's device order (the
  device whose shard has ``replica_id == 0``).
* Arrays whose largest shard is at least the packing threshold
  (``pack_below_bytes``, by default :func:`pack_threshold` of the state) become
  zarr v3 arrays. The chunk grid divides every shard boundary, so a chunk never
  spans two writers; chunks (tensorstore "shards" of the sharding codec) are
  split until they fit ``max_object_bytes``, and are divided into inner
  chunks of about ``inner_chunk_bytes`` so a reader needing part of a chunk
  fetches only those inner chunks with ranged reads.
* Smaller arrays are *packed*: each process concatenates the shards it
  writes, each followed by its crc32c, into objects of at most
  ``max_object_bytes``. 10,000 small leaves become one object per process.

How those regions, arrays and pack entries lie in storage (what a reader
needs) is :mod:`cloudckpt.format.layout`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloudckpt.format.layout import (
    CRC_BYTES,
    Index,
    PackEntry,
    full_index,
    index_shape,
    normalize_index,
)


@dataclass(frozen=True)
class Shard:
    """One distinct region of an array, the process that writes it, and those holding it.

    ``replicas`` lists (sorted) every process with a device holding the
    region; empty means ``writer`` alone.
    """

    index: Index
    writer: int
    nbytes: int
    replicas: tuple[int, ...] = ()


def global_shards(shape: tuple[int, ...], itemsize: int, sharding: Any | None) -> list[Shard]:
    """Distinct shards of an array, each with its replica-0 process and replicas, by index.

    ``sharding`` None means a host (numpy) value, written by the primary
    process: the caller passes the primary as writer via a sharding-less call.
    """
    if sharding is None:
        index = full_index(shape)
        return [Shard(index, -1, math.prod(shape) * itemsize)]
    seen: dict[Index, tuple[int, set[int]]] = {}
    for device, idx in sharding.devices_indices_map(shape).items():
        key = normalize_index(idx, shape)
        held = seen.get(key)
        if held is None:
            seen[key] = (device.process_index, {device.process_index})
        else:
            held[1].add(device.process_index)
    return [
        Shard(index, writer, math.prod(index_shape(index)) * itemsize, tuple(sorted(procs)))
        for index, (writer, procs) in sorted(seen.items())
    ]


#: The smallest part a replicated shard is split into (smaller shards go whole).
MIN_PART_BYTES = 1 << 20
#: A replicated shard's parts may differ in size by at most this factor when
#: its dimension divides evenly enough (otherwise the most even split found).
PART_BALANCE = 1.1
#: Splitting a shard never makes more than this many chunks per part along
#: the split dimension: a part is a few large objects, not many small ones.
MAX_UNITS_PER_PART = 8


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _boundary_gcd(shape: tuple[int, ...], shards: list[Shard], d: int) -> int:
    g = shape[d]
    for shard in shards:
        start, stop = shard.index[d]
        g = math.gcd(g, math.gcd(start, stop))
    return max(g, 1)


def split_shards(
    shape: tuple[int, ...], shards: list[Shard], counts: list[int]
) -> list[list[Index]]:
    """Splits shard ``k`` into ``counts[k]`` contiguous parts, each a union of whole chunks.

    Parts are slabs along one dimension (the largest of the most-split
    shard, the next largest if that one cannot be divided), made of equal
    *units* that divide every shard boundary, so a regular chunk grid can put
    every part boundary on a chunk boundary (:func:`chunk_grid` of the parts).
    The unit is the largest that splits each shard into parts within
    :data:`PART_BALANCE` of each other, with at most
    :data:`MAX_UNITS_PER_PART` units per part. A shard that cannot be split
    (a dimension too short) keeps one part. Deterministic in its arguments.
    """
    whole = [[s.index] for s in shards]
    if all(c <= 1 for c in counts):
        return whole
    ref = max(range(len(shards)), key=lambda k: (counts[k], -k))
    extents = index_shape(shards[ref].index)
    for d in sorted(range(len(shape)), key=lambda d: (-extents[d], d)):
        g = _boundary_gcd(shape, shards, d)
        blocks = [(s.index[d][1] - s.index[d][0]) // g for s in shards]
        best: tuple[float, int] | None = None
        for m in _divisors(g):
            units = [b * m for b in blocks]
            split = [(u, c) for u, c in zip(units, counts, strict=True) if c > 1]
            if m > 1 and any(u > MAX_UNITS_PER_PART * c for u, c in split):
                break
            if any(u < c for u, c in split):
                continue
            worst = max(-(-u // c) * c / u for u, c in split)
            if best is None or worst < best[0]:
                best = (worst, m)
            if worst <= PART_BALANCE:
                break
        if best is None:
            continue
        unit = g // best[1]
        out = []
        for shard, c in zip(shards, counts, strict=True):
            if c <= 1:
                out.append([shard.index])
                continue
            start, stop = shard.index[d]
            n_units = (stop - start) // unit
            parts, at = [], start
            for j in range(c):
                size = (n_units // c + (j < n_units % c)) * unit
                region = list(shard.index)
                region[d] = (at, at + size)
                parts.append(tuple(region))
                at += size
            out.append(parts)
        return out
    return whole


class WriterLoads:
    """Bytes assigned to each process so far; hands new parts to the least loaded.

    Greedy by bytes: :meth:`assign` gives the largest part to the least-loaded
    candidate, the next to the next, ties to the lower process index. Every
    process runs the same assignments in the same order and gets the same
    answer. One lazily refreshed heap per candidate set keeps a pick at
    O(log processes) on large pods.
    """

    def __init__(self) -> None:
        self.loads: dict[int, int] = {}
        self._heaps: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        # id(candidates) -> (candidates, heap): skips hashing a pod-sized tuple per call;
        # holding the tuple keeps its id from being reused.
        self._seen: dict[int, tuple[tuple[int, ...], list[tuple[int, int]]]] = {}

    def add(self, process: int, nbytes: int) -> None:
        self.loads[process] = self.loads.get(process, 0) + nbytes

    def assign(self, candidates: tuple[int, ...], sizes: list[int]) -> list[int]:
        """Writers for parts of ``sizes`` bytes, distinct while there are candidates."""
        loads = self.loads
        seen = self._seen.get(id(candidates))
        if seen is not None and seen[0] is candidates:
            heap = seen[1]
        else:
            heap = self._heaps.get(candidates)
            if heap is None:
                heap = [(loads.get(p, 0), p) for p in candidates]
                heapq.heapify(heap)
                self._heaps[candidates] = heap
            self._seen[id(candidates)] = (candidates, heap)
        order = sorted(range(len(sizes)), key=lambda j: (-sizes[j], j))
        writers = [0] * len(sizes)
        taken: list[int] = []
        for j in order:
            if not heap:  # more parts than candidates: start another round
                for p in taken:
                    heapq.heappush(heap, (loads[p], p))
                taken = []
            while True:
                load, p = heapq.heappop(heap)
                current = loads.get(p, 0)
                if load == current:
                    break
                heapq.heappush(heap, (current, p))  # stale: another set's assignment moved it
            writers[j] = p
            loads[p] = current + sizes[j]
            taken.append(p)
        for p in taken:
            heapq.heappush(heap, (loads[p], p))
        return writers


#: The default packing threshold's floor (and its value for any state up to ~100 GB).
PACK_BELOW_BYTES = 2 << 20
#: The default threshold rises with the state so that arrays whose shards are objects of
#: their own make at most about this many objects per step: the request budget of one
#: step at GCS's initial 1,000 writes/s per bucket is 60,000 in a minute.
TARGET_OBJECTS = 50_000
#: ... up to this fraction of ``max_object_bytes``: larger shards make objects of their own.
MAX_THRESHOLD_FRACTION = 8


def pack_threshold(total_bytes: int, max_object_bytes: int) -> int:
    """The default ``pack_below_bytes`` for a state of ``total_bytes`` (global, every leaf).

    A zarr array makes at least one object per shard (a chunk never spans two
    writers), so shards of a few MiB on a pod make a step of hundreds of
    thousands of small objects, which no request rate serves in a minute.
    Packing writes them into objects of up to ``max_object_bytes`` instead.
    :data:`PACK_BELOW_BYTES` for states up to ``TARGET_OBJECTS`` times it
    (about 100 GB: nothing changes for them); above, the state's bytes over
    :data:`TARGET_OBJECTS`, capped at ``max_object_bytes / 8`` (32 MiB by
    default: a 1T-parameter training state on 4,096 devices packs its 3-6 MiB
    embedding shards). Every process computes it from global shapes alone.
    """
    scaled = min(-(-total_bytes // TARGET_OBJECTS), max_object_bytes // MAX_THRESHOLD_FRACTION)
    return max(PACK_BELOW_BYTES, scaled)


def _smallest_prime_factor(n: int) -> int:
    for p in range(2, math.isqrt(n) + 1):
        if n % p == 0:
            return p
    return n


def split_to_fit(chunk: list[int], itemsize: int, limit: int) -> list[int]:
    """Divides dimensions of ``chunk`` (exactly) until it holds at most ``limit`` bytes.

    Each step divides the dimension with the smallest prime factor (the
    largest dimension among equals), so the result stays as close to the limit
    as exact division allows; a dimension of prime length is split last,
    instead of collapsing it to 1 and multiplying the object count.
    """
    chunk = list(chunk)
    while math.prod(chunk) * itemsize > limit:
        candidates = [(_smallest_prime_factor(n), -n, d) for d, n in enumerate(chunk) if n > 1]
        if not candidates:
            break
        factor, _, d = min(candidates)
        chunk[d] //= factor
    return chunk


def chunk_grid(
    shape: tuple[int, ...], shards: list[Shard], itemsize: int, max_object_bytes: int
) -> list[int]:
    """A chunk shape dividing every shard boundary, split to fit one object."""
    chunk = []
    for d, n in enumerate(shape):
        g = n
        for shard in shards:
            start, stop = shard.index[d]
            g = math.gcd(g, math.gcd(start, stop))
        chunk.append(max(g, 1))
    return split_to_fit(chunk, itemsize, max_object_bytes)


def is_packed(shape: tuple[int, ...], largest_shard_bytes: int, pack_below_bytes: int) -> bool:
    """Whether an array is stored in packs rather than as a zarr array of its own.

    Arrays whose largest shard is under the threshold are packed, and so is every
    zero-dimensional array whatever its size: zarr storage is for arrays with axes
    (the reader refuses a zero-dimensional one).
    """
    return not shape or largest_shard_bytes < pack_below_bytes


def array_layout(
    shape: tuple[int, ...],
    itemsize: int,
    shards: list[Shard],
    *,
    pack_below_bytes: int,
    max_object_bytes: int,
    inner_chunk_bytes: int,
) -> tuple[list[int], list[int]] | None:
    """How one array is stored: None when packed, else its (chunk, inner chunk) shapes.

    Decided from the shape and the shards alone (no data, no devices), so a
    scale model can drive it for a mesh it does not have. ``plan_save``
    applies the same rule, with the chunk grid taken over the replica-split
    parts of each shard (identical to the shards when nothing is replicated).
    """
    if is_packed(shape, max(s.nbytes for s in shards), pack_below_bytes):
        return None
    chunk = chunk_grid(shape, shards, itemsize, max_object_bytes)
    return chunk, split_to_fit(chunk, itemsize, inner_chunk_bytes)


def pack_layout(
    shards: list[tuple[int, Shard]],
    max_object_bytes: int,
    whole: Callable[[int], bool] | None = None,
    prefix: str = "",
) -> list[PackEntry]:
    """Assigns packed shards (leaf id, shard) to objects ``<prefix>packs/<writer>.<n>``, in order.

    ``prefix`` is the attempt's own ``@<attempt>/`` (docs/FORMAT.md), or empty.

    With ``whole``, the shards of the leaves it names (leaves of one shard:
    replicated arrays, host values) come first, in objects of their own.
    Every process restoring such a leaf reads it: back to back, a reader
    fetches all of them with one ranged read per object instead of one read
    per leaf between its writer's other shards. Each object's entries still
    lie back to back in leaf order, as readers require (docs/FORMAT.md).
    """
    groups = [shards]
    if whole is not None:
        groups = [[t for t in shards if whole(t[0])], [t for t in shards if not whole(t[0])]]
    fill: dict[int, tuple[int, int]] = {}  # writer -> (object number, bytes used)
    out = []
    for g, group in enumerate(groups):
        if g:  # the rest starts an object of its own
            fill = {w: (n + 1, 0) if used else (n, 0) for w, (n, used) in fill.items()}
        for leaf, shard in group:
            number, used = fill.get(shard.writer, (0, 0))
            size = shard.nbytes + CRC_BYTES
            if used and used + size > max_object_bytes:
                number, used = number + 1, 0
            out.append(
                PackEntry(
                    leaf,
                    shard.index,
                    shard.writer,
                    f"{prefix}packs/{shard.writer}.{number}",
                    used,
                    shard.nbytes,
                )
            )
            fill[shard.writer] = (number, used + size)
    return out
