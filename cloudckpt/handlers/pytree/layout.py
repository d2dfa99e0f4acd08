"""Where each byte of a sharded pytree goes: shards, writers, chunk grids, packs.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

Index = tuple[tuple[int, int], ...]  # (start, stop) per dimension

#: zarr v3 data types tensorstore stores natively; others are stored as raw bytes.
ZARR_DTYPES = frozenset(
    [
        "bool",
        "int2",
        "int4",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex64",
        "complex128",
        "float4_e2m1fn",
        "float8_e3m4",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e4m3b11fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    ]
)


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype an array is stored as: itself, or an unsigned int of its width."""
    if dtype.name in ZARR_DTYPES:
        return dtype
    return np.dtype(f"uint{8 * dtype.itemsize}")


CRC_BYTES = 4


def entry_crc(data: bytes | np.ndarray) -> bytes:
    """The 4 bytes stored after a packed entry: crc32c of its data, little-endian.

    ``data`` must be ``bytes`` or a read-only array (what the crc32c extension takes).
    """
    return google_crc32c.value(data).to_bytes(CRC_BYTES, "little")


def entry_data(blob: bytes, start: int, nbytes: int) -> bytes | None:
    """The entry at ``blob[start:]`` if it is whole and its crc32c matches, else None."""
    end = start + nbytes
    if end + CRC_BYTES > len(blob):
        return None
    data = blob[start:end]
    return data if entry_crc(data) == blob[end : end + CRC_BYTES] else None


def normalize_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> Index:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {index} is not supported")
        out.append((start, stop))
    return tuple(out)


def index_slices(index: Index) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in index)


def index_shape(index: Index) -> tuple[int, ...]:
    return tuple(b - a for a, b in index)


def full_index(shape: tuple[int, ...]) -> Index:
    return tuple((0, n) for n in shape)


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


def zarr_metadata(
    shape: tuple[int, ...], dtype: np.dtype, chunk: list[int], inner: list[int]
) -> dict[str, Any]:
    """zarr v3 metadata with crc32c on every chunk (and on the shard index)."""
    leaf_codecs = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    if inner == chunk:
        codecs: list[dict[str, Any]] = leaf_codecs
    else:
        codecs = [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": inner,
                    "codecs": leaf_codecs,
                    "index_codecs": leaf_codecs,
                    "index_location": "end",
                },
            }
        ]
    return {
        "shape": list(shape),
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": codecs,
    }


@dataclass(frozen=True)
class PackEntry:
    """Where one packed shard lives: object, offset, length (crc32c follows)."""

    leaf: int
    index: Index
    writer: int
    obj: str
    offset: int
    nbytes: int

    def to_json(self) -> list[Any]:
        return [self.obj, self.offset, self.nbytes, [list(r) for r in self.index]]


def pack_layout(
    shards: list[tuple[int, Shard]], max_object_bytes: int, prefix: str = ""
) -> list[PackEntry]:
    """Assigns packed shards (leaf id, shard) to objects ``<prefix>packs/<writer>.<n>``, in order."""
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
                f"{prefix}packs/{shard.writer}.{number}",
                used,
                shard.nbytes,
            )
        )
        fill[shard.writer] = (number, used + size)
    return out
