"""Host values in the byte order and layout the format stores: little-endian, C order.

``pytree.json`` records a dtype by name (``float32``), which says nothing about
byte order, and both writers (packs and tensorstore) copy raw bytes, so an
array in another byte order must be converted before it is planned, or it is
stored as garbage with valid checksums. Memory layout (Fortran order,
strides, negative strides) is handled by the copies each writer makes
(``np.ascontiguousarray`` and ``ndarray.copy``, both C order).
"""

from __future__ import annotations

import math
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
