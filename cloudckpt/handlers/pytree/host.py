"""Host values in the byte order and layout the format stores: little-endian, C order.

``pytree.json`` records a dtype by name (``float32``), which says nothing about
byte order, and both writers (packs and tensorstore) copy raw bytes, so an
array in another byte order must be converted before it is planned, or it is
stored as garbage with valid checksums. Memory layout (Fortran order,
strides, negative strides) is handled by the copies each writer makes
(``np.ascontiguousarray`` and ``ndarray.copy``, both C order).
"""

from __future__ import annotations

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
