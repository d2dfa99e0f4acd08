"""How a pytree item's bytes lie in storage: regions, zarr arrays, pack entries.

This is the on-storage half of the layout, shared by the writer, the reader
and the tools; which process writes which shard (planning from jax
shardings) lives in :mod:`cloudckpt.handlers.pytree.layout`.

* An *index* is a region of an array: ``(start, stop)`` per dimension.
* A large leaf is a zarr v3 array (``@<attempt>/arrays/<leaf>``; format 1:
  ``arrays/<leaf>``) stored uncompressed, with crc32c on every chunk and,
  when chunks are divided into inner chunks (the ``sharding_indexed``
  codec), on the shard index. Dtypes zarr lacks
  are stored as the unsigned integer of their width.
* A small leaf is stored as *pack entries*: ``[object, offset, nbytes,
  index]`` in ``pytree.json``; the entry's bytes (C order, little-endian) lie
  at ``offset`` in the pack object ``@<attempt>/packs/<writer>.<n>``,
  followed by 4 bytes of crc32c (little-endian), and the entries of one
  object lie back to back from offset 0.
"""

from __future__ import annotations

import itertools
import json
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
#: Bytes of the crc32c stored after every pack entry (and every zarr chunk).
CRC_BYTES = 4
#: Bytes of one entry of a zarr shard index (offset and length, uint64 each).
SHARD_INDEX_ENTRY_BYTES = 16
#: zarr metadata fields that ``zarr.json`` and ``pytree.json`` must agree on.
ZARR_IDENTITY_FIELDS = ("shape", "data_type", "chunk_grid")


# ------------------------------------------------------------------------------- regions
def normalize_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> Index:
    """A jax/numpy index of unit-stride slices as ``(start, stop)`` pairs."""
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


def overlap(a: Index, b: Index) -> Index | None:
    """The region two indices share, or None when they are disjoint."""
    out = []
    for (a0, a1), (b0, b1) in zip(a, b, strict=True):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def full_index(shape: tuple[int, ...]) -> Index:
    return tuple((0, n) for n in shape)


def unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The C-order coordinates of element ``flat`` of ``shape`` (() for a shape of ()).

    ``np.unravel_index`` for one element, without its numpy set-up (restores ask
    for it per pack entry and per plane of a scattered chunk).
    """
    out = []
    for n in reversed(shape):
        flat, x = divmod(flat, n)
        out.append(x)
    return tuple(reversed(out))


# ----------------------------------------------------------------------------------- zarr
def tiles(regions: list[Index], shape: tuple[int, ...]) -> bool:
    """Whether non-empty ``regions`` tile ``shape`` exactly: a grid, no overlap, no gap."""
    if len(regions) == 1:  # the common case: one shard, the whole array
        return regions[0] == full_index(shape)
    cuts = [sorted({0, n} | {x for r in regions for x in r[d]}) for d, n in enumerate(shape)]
    cells = [set(itertools.pairwise(c)) for c in cuts]
    if len(set(regions)) != len(regions) or math.prod(len(c) for c in cells) != len(regions):
        return False
    return all(r in c for region in regions for r, c in zip(region, cells, strict=True))


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype an array is stored as: itself, or an unsigned int of its width."""
    if dtype.name in ZARR_DTYPES:
        return dtype
    return np.dtype(f"uint{8 * dtype.itemsize}")


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


def chunk_object_bytes(chunk: tuple[int, ...], inner: tuple[int, ...], itemsize: int) -> int:
    """The exact size of a stored chunk of :func:`zarr_metadata` (arrays are uncompressed).

    Its bytes and crc32c; divided into inner chunks, each inner chunk with its
    crc32c, then the shard index (one entry per inner chunk) and its crc32c.
    """
    if inner == chunk:
        return math.prod(chunk) * itemsize + CRC_BYTES
    n_inner = math.prod(c // i for c, i in zip(chunk, inner, strict=True))
    inner_bytes = math.prod(inner) * itemsize + CRC_BYTES
    return n_inner * (inner_bytes + SHARD_INDEX_ENTRY_BYTES) + CRC_BYTES


def zarr_json_agrees(data: bytes, metadata: dict[str, Any]) -> bool:
    """Whether a stored ``zarr.json`` (untrusted bytes) describes the array ``metadata`` does.

    tensorstore adds fields of its own (fill value, attributes), so only
    :data:`ZARR_IDENTITY_FIELDS` are compared.
    """
    try:
        stored = json.loads(data)
        return all(stored.get(k) == metadata[k] for k in ZARR_IDENTITY_FIELDS)
    except (ValueError, TypeError, AttributeError, RecursionError):
        return False


# ---------------------------------------------------------------------------- pack entries
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


@dataclass(frozen=True)
class PackEntry:
    """Where one packed shard lives: object, offset, length (crc32c follows).

    ``leaf`` and ``writer`` are known when the entry is planned; an entry read
    back from ``pytree.json`` has -1 for both (the document does not store them).
    """

    leaf: int
    index: Index
    writer: int
    obj: str
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        """Where the entry's crc32c ends: the next entry of the object starts here."""
        return self.offset + self.nbytes + CRC_BYTES

    def to_json(self) -> list[Any]:
        """The entry as ``pytree.json`` stores it: ``[object, offset, nbytes, index]``."""
        return [self.obj, self.offset, self.nbytes, [list(r) for r in self.index]]
