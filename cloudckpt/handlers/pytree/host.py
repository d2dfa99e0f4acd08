"""Host values in the byte order and layout the format stores: little-endian, C order.

``pytree.json`` records a dtype by name (``float32``), which says nothing about
byte order, and both writers (packs and tensorstore) copy raw bytes, so an
array in another byte order must be converted before it is planned, or it is
stored as garbage with valid checksums. Memory layout (Fortran order,
strides, negative strides) is handled by the copies each writer makes
(``np.ascontiguousarray`` and ``ndarray.copy``, both C order).
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


def little_endian(array: Any) -> Any:
    """``array`` itself when its bytes are little-endian, else a little-endian copy.

    Device arrays (``jax.Array``) are native, hence returned unchanged; only
    numpy values can arrive in another byte order.
    """
    if not isinstance(array, np.ndarray):
        return array
    order = array.dtype.byteorder
    if order == ">" or (order == "=" and not np.little_endian):
        return array.astype(array.dtype.newbyteorder("<"))
    return array


#: Alignment of restore buffers: XLA's CPU client adopts a host buffer aligned to this
#: many bytes as device memory without copying it (an unaligned one is copied).
BUFFER_ALIGNMENT = 64


def empty_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-order array whose data starts on a ``BUFFER_ALIGNMENT`` boundary.

    Restored regions are read into such buffers so that handing them to CPU
    devices (``jax.make_array_from_callback``) aliases them instead of copying
    every byte once more; on accelerators the transfer copies either way.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + BUFFER_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % BUFFER_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


#: ``madvise`` advice that maps a range writable without touching it (Linux 5.14+).
_MADV_POPULATE_WRITE = 23
#: Below this, a buffer's page faults cost less than a system call and a thread hop.
PREFAULT_MIN_BYTES = 4 * 1024 * 1024
_PAGE = mmap.PAGESIZE


@functools.cache
def _madvise() -> Any:
    """libc's ``madvise``, on Linux only (other systems number their advice differently)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


def prefault(buffers: Sequence[np.ndarray]) -> None:
    """Maps the pages of fresh ``buffers`` in one system call each, before they are filled.

    A restore's buffers are new memory, and filling new memory page fault by
    page fault costs more than the bytes' copy: measured here, 1 GiB took
    0.75 s faulted in by the copy and 0.35 s mapped ahead with
    ``MADV_POPULATE_WRITE`` (then 0.09 s to copy). Contents are untouched, so
    this may run while the buffers are being filled. Where the advice is unknown
    (older kernels, other systems) it does nothing: the faults happen as before.
    Releases the GIL (a foreign call), so it is meant for a worker thread.
    """
    madvise = _madvise()
    if madvise is None:
        return
    for buffer in buffers:
        if buffer.nbytes < PREFAULT_MIN_BYTES:
            continue
        start = buffer.ctypes.data
        first = -(-start // _PAGE) * _PAGE
        last = (start + buffer.nbytes) // _PAGE * _PAGE
        if last > first and madvise(first, last - first, _MADV_POPULATE_WRITE) != 0:
            return  # unsupported here: the first refusal says so for all of them
