"""Which process writes each byte of a sharded pytree: shards, writers, chunk grids, packs.

Every process computes the same layout from global information (shapes and
shardings), so no process has to tell another where it wrote anything.

* A *shard* is one distinct region of an array. Its writer is the process of
  the first device holding it in the sharding's device order: the device
  whose shard has ``replica_id == 0``. Replicated data is written once.
* Arrays whose largest shard is at least ``pack_below_bytes`` become zarr v3
  arrays. The chunk grid divides every shard boundary, so a chunk never
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

import math
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
    """One distinct region of an array and the process that writes it."""

    index: Index
    writer: int
    nbytes: int


def global_shards(shape: tuple[int, ...], itemsize: int, sharding: Any | None) -> list[Shard]:
    """Distinct shards of an array, each with its writer process, sorted by index.

    ``sharding`` None means a host (numpy) value, written by the primary
    process: the caller passes the primary as writer via a sharding-less call.
    """
    if sharding is None:
        index = full_index(shape)
        return [Shard(index, -1, math.prod(shape) * itemsize)]
    seen: dict[Index, int] = {}
    for device, idx in sharding.devices_indices_map(shape).items():
        key = normalize_index(idx, shape)
        seen.setdefault(key, device.process_index)
    return [
        Shard(index, writer, math.prod(index_shape(index)) * itemsize)
        for index, writer in sorted(seen.items())
    ]


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


def pack_layout(shards: list[tuple[int, Shard]], max_object_bytes: int) -> list[PackEntry]:
    """Assigns packed shards (leaf id, shard) to objects ``packs/<writer>.<n>``, in order."""
    fill: dict[int, tuple[int, int]] = {}  # writer -> (object number, bytes used)
    out = []
    for leaf, shard in shards:
        number, used = fill.get(shard.writer, (0, 0))
        size = shard.nbytes + CRC_BYTES
        if used and used + size > max_object_bytes:
            number, used = number + 1, 0
        out.append(
            PackEntry(
                leaf,
                shard.index,
                shard.writer,
                f"packs/{shard.writer}.{number}",
                used,
                shard.nbytes,
            )
        )
        fill[shard.writer] = (number, used + size)
    return out
