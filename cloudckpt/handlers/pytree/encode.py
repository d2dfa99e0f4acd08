"""Encoding cloudckpt's own zarr chunk objects directly, for writes straight from host memory.

The write-side twin of :mod:`cloudckpt.handlers.pytree.chunks`. An array laid
out by :func:`cloudckpt.format.layout.zarr_metadata` is uncompressed, so a
chunk object is the chunk's bytes (C order, little-endian) and their crc32c;
or, divided into inner chunks (``sharding_indexed``), each inner chunk's
bytes and crc32c back to back in C order of the inner grid, then the shard
index (offset and length of each inner chunk, ``<u8``) and its crc32c. These
are exactly the bytes tensorstore's zarr3 driver writes for such a chunk
(``tests/test_direct_writes.py`` compares them), so any zarr reader opens
the array, and tensorstore's SHA-256-signed PUTs are not needed to write it.

An object is described as a list of buffers: the pieces of the host copy
that are contiguous are referenced where they lie, and only the others (an
inner chunk cut across a trailing dimension) are copied, once, into a
staging buffer of the object's own. Only whole chunks inside one region are
encoded here (:func:`covers_whole_chunks`); anything else stays on
tensorstore's path.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np

from cloudckpt.format import layout


def covers_whole_chunks(index: layout.Index, metadata: dict[str, Any]) -> bool:
    """Whether the region ``index`` of an array with ``metadata`` is made of whole chunk objects.

    Also that the array is laid out as :func:`layout.zarr_metadata` writes it
    (the codecs this module encodes) and is not zero-dimensional.
    """
    shape = tuple(metadata["shape"])
    chunk = tuple(metadata["chunk_grid"]["configuration"]["chunk_shape"])
    inner = inner_shape(metadata)
    if not shape or len(chunk) != len(shape) or len(index) != len(shape):
        return False
    expected = layout.zarr_metadata(
        shape, np.dtype(metadata["data_type"]), list(chunk), list(inner)
    )
    if metadata.get("codecs") != expected["codecs"] or metadata.get("chunk_key_encoding") != {
        "name": "default"
    }:
        return False
    return all(
        c > 0 and i > 0 and c % i == 0 and a % c == 0 and b % c == 0 and a < b <= n
        for (a, b), c, i, n in zip(index, chunk, inner, shape, strict=True)
    )


def inner_shape(metadata: dict[str, Any]) -> tuple[int, ...]:
    """The inner chunk shape of ``metadata`` (the chunk shape when it is not sharded)."""
    codecs = metadata.get("codecs") or []
    if codecs and codecs[0].get("name") == "sharding_indexed":
        return tuple(codecs[0]["configuration"]["chunk_shape"])
    return tuple(metadata["chunk_grid"]["configuration"]["chunk_shape"])


def chunk_positions(index: layout.Index, chunk: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """The grid positions of the chunks that region ``index`` covers, in C order."""
    return itertools.product(
        *(range(a // c, b // c) for (a, b), c in zip(index, chunk, strict=True))
    )


@dataclass
class Encoded:
    """One chunk object as buffers to send joined, and their crc32c; ``staged`` bytes were copied."""

    buffers: list[memoryview]
    staged: int
    crc32c: int

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)


def staged_bytes(
    index: layout.Index, data: np.ndarray, chunk: tuple[int, ...], inner: tuple[int, ...]
) -> int:
    """Bytes :func:`encode_chunk` copies for each chunk object of this region (0: none).

    Every chunk object of a region has the same pieces, so one figure serves
    all; a ByteBudget holds it while an object is in flight.
    """
    first = next(chunk_positions(index, chunk))
    view = _chunk_view(data, index, first, chunk)
    return sum(p.nbytes for p in _pieces(view, inner) if not p.flags.c_contiguous)


def encode_chunk(
    data: np.ndarray,
    index: layout.Index,
    position: tuple[int, ...],
    chunk: tuple[int, ...],
    inner: tuple[int, ...],
) -> Encoded:
    """The chunk object at grid ``position``, from ``data`` (the region ``index``, stored dtype).

    ``data`` must stay unchanged while the buffers are in use. Computes the
    crc32c of every piece (off the event loop: call it in a thread).
    """
    view = _chunk_view(data, index, position, chunk)
    pieces = list(_pieces(view, inner))
    copied = [p for p in pieces if not p.flags.c_contiguous]
    staging = np.empty(sum(p.nbytes for p in copied), np.uint8)
    at = 0
    crcs = np.empty((len(pieces), layout.CRC_BYTES), np.uint8)
    buffers: list[memoryview] = []
    whole = 0  # the object's crc32c so far (the store checks it on upload)
    for piece, crc in zip(pieces, crcs, strict=True):
        if piece.flags.c_contiguous:
            flat = _bytes_of(piece)
        else:
            flat = staging[at : at + piece.nbytes]
            np.copyto(flat.view(piece.dtype).reshape(piece.shape), piece)
            at += piece.nbytes
        own = crc32c.crc32c(memoryview(flat))
        # The first piece's crc is the object's so far; later ones take a second pass.
        whole = own if not buffers else crc32c.crc32c(memoryview(flat), value=whole)
        crc[:] = np.frombuffer(own.to_bytes(layout.CRC_BYTES, "little"), np.uint8)
        whole = crc32c.crc32c(memoryview(crc), value=whole)
        buffers += [memoryview(flat), memoryview(crc)]
    if inner != chunk:
        piece_bytes = math.prod(inner) * data.dtype.itemsize + layout.CRC_BYTES
        table = np.empty((len(pieces), 2), "<u8")
        table[:, 0] = np.arange(len(pieces), dtype=np.uint64) * piece_bytes
        table[:, 1] = piece_bytes
        shard_index = np.empty(table.nbytes + layout.CRC_BYTES, np.uint8)
        shard_index[: table.nbytes] = table.reshape(-1).view(np.uint8)
        shard_index[table.nbytes :] = np.frombuffer(_crc_le(shard_index[: table.nbytes]), np.uint8)
        buffers.append(memoryview(shard_index))
        whole = crc32c.crc32c(memoryview(shard_index), value=whole)
    return Encoded(buffers, staging.nbytes, whole)


def _chunk_view(
    data: np.ndarray, index: layout.Index, position: tuple[int, ...], chunk: tuple[int, ...]
) -> np.ndarray:
    local = tuple(
        slice(p * c - a, (p + 1) * c - a)
        for p, c, (a, _) in zip(position, chunk, index, strict=True)
    )
    return data[local]


def _pieces(view: np.ndarray, inner: tuple[int, ...]) -> Iterator[np.ndarray]:
    """The inner chunks of a chunk ``view``, in C order of the inner grid (the chunk if unsharded)."""
    grid = [range(0, n, i) for n, i in zip(view.shape, inner, strict=True)]
    for origin in itertools.product(*grid):
        yield view[tuple(slice(o, o + i) for o, i in zip(origin, inner, strict=True))]


def _bytes_of(piece: np.ndarray) -> np.ndarray:
    """A C-contiguous array's bytes as a flat uint8 view (any dtype, bfloat16 included)."""
    return piece.reshape(-1).view(np.uint8)


def _crc_le(flat: np.ndarray) -> bytes:
    return crc32c.crc32c(memoryview(flat)).to_bytes(layout.CRC_BYTES, "little")
