"""Host values in the byte order and layout the format stores: little-endian, C order.

``pytree.json`` records a dtype by name (``float32``), which says nothing about
byte order, and both writers (packs and tensorstore) copy raw bytes, so an
array in another byte order must be converted before it is planned, or it is
stored as garbage with valid checksums. Memory layout (Fortran order,
strides, negative strides) is handled by the copies each writer makes
(``np.ascontiguousarray`` and ``ndarray.copy``, both C order).

Also what a restore's host memory costs: aligned buffers, their pages mapped
ahead (``prefault``), and the cyclic collector paused meanwhile (``collector_paused``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import math
import mmap
import sys
import threading
import time
from collections.abc import Iterator, Sequence
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
#: ``madvise`` advice for a range's page size: transparent huge pages, or small pages only.
_MADV_HUGEPAGE = 14
_MADV_NOHUGEPAGE = 15
#: Below this, a buffer's page faults cost less than a system call and a thread hop.
PREFAULT_MIN_BYTES = 4 * 1024 * 1024
#: Buffers are mapped this many bytes at a time, each step with one page size and timed.
PREFAULT_STEP = 8 * 1024 * 1024
#: One step in this many tries the page size that has been slower, in case that changed.
PREFAULT_EXPLORE = 16
_PAGE = mmap.PAGESIZE
#: A transparent huge page (x86-64 and 4 KiB-page arm64); steps are cut on multiples of it.
_HUGE_PAGE = 2 * 1024 * 1024


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


class PageSizes:
    """Which page size maps new memory faster here and now, learned from the mapping itself.

    numpy advises transparent huge pages for every array of 4 MiB or more. Where
    freed memory stays with the machine, a huge page costs one fault instead of
    512 (1 GiB mapped in 0.09 s against 0.33 s with small pages, measured here).
    Where it goes back to a hypervisor (Firecracker's free page reporting, as on
    this project's machines), a huge page must be assembled and zeroed from memory
    the host hands back, and the same GiB took 0.5-1.8 s against a steady 0.33 s.
    Which one a restore meets depends on how long ago memory was freed, so the
    choice is measured, not configured: each step is timed (thread CPU time, so
    other threads' turns do not count), the faster size is used, and every
    ``PREFAULT_EXPLORE``-th step tries the other one again. One measure may serve
    several threads mapping at once (a restore's read groups): a count lost or a
    time overwritten between them only moves the next retry of the slower size.
    """

    def __init__(self) -> None:
        self.cost: dict[bool, float | None] = {True: None, False: None}  # seconds per byte
        self.steps = 0

    def best(self) -> bool:
        """The size measured faster so far (huge pages, numpy's default, until both are known)."""
        huge, small = self.cost[True], self.cost[False]
        return huge is None or small is None or huge <= small

    def pick(self) -> bool:
        """The size for the next measured step: True for huge pages, False for small ones."""
        self.steps += 1
        if self.cost[True] is None:
            return True
        if self.cost[False] is None:
            return False
        best = self.best()
        return (not best) if self.steps % PREFAULT_EXPLORE == 0 else best

    def record(self, huge: bool, seconds: float, nbytes: int) -> None:
        self.cost[huge] = seconds / nbytes


def _steps(buffers: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """The page-aligned ranges of ``buffers`` worth mapping, cut at ``PREFAULT_STEP`` boundaries.

    Cuts fall on multiples of the step in the address space, so every step but a
    buffer's first and last spans whole huge pages.
    """
    steps = []
    for buffer in buffers:
        if buffer.nbytes < PREFAULT_MIN_BYTES:
            continue
        start = buffer.ctypes.data
        lo = -(-start // _PAGE) * _PAGE
        end = (start + buffer.nbytes) // _PAGE * _PAGE
        while lo < end:
            hi = min(end, (lo // PREFAULT_STEP + 1) * PREFAULT_STEP)
            steps.append((lo, hi))
            lo = hi
    return steps


def prefault(buffers: Sequence[np.ndarray], pages: PageSizes | None = None) -> None:
    """Maps the pages of fresh ``buffers`` before they are filled, with the faster page size.

    A restore's buffers are new memory, and filling new memory page fault by
    page fault costs more than the bytes' copy: measured here, 1 GiB took
    0.75 s faulted in by the copy and 0.35 s mapped ahead with
    ``MADV_POPULATE_WRITE`` (then 0.09 s to copy). The mapping goes in steps of
    ``PREFAULT_STEP``, each with the page size that :class:`PageSizes` finds
    faster; the rest of the buffers is advised that size too, so that bytes
    landing ahead of this call fault the same way. Contents are untouched (page
    size advice and mapping never change a byte), so this may run while the
    buffers are being filled. Where the advice is unknown (older kernels, other
    systems) it does nothing: the faults happen as before. Releases the GIL
    (foreign calls), so it is meant for a worker thread.
    """
    madvise = _madvise()
    if madvise is None:
        return
    steps = _steps(buffers)
    pages = pages if pages is not None else PageSizes()
    rest: bool | None = None  # the advice the steps not yet mapped have
    for k, (lo, hi) in enumerate(steps):
        # Only steps of whole huge pages say what huge pages cost (a buffer's ragged
        # ends fault small pages whatever the advice); the others follow the best.
        whole = lo % _HUGE_PAGE == 0 and hi % _HUGE_PAGE == 0
        huge = pages.pick() if whole else pages.best()
        madvise(lo, hi - lo, _MADV_HUGEPAGE if huge else _MADV_NOHUGEPAGE)
        start = time.thread_time()
        if madvise(lo, hi - lo, _MADV_POPULATE_WRITE) != 0:
            return  # unsupported here: the first refusal says so for all of them
        if not whole:
            continue
        pages.record(huge, time.thread_time() - start, hi - lo)
        best = pages.best()
        if None not in pages.cost.values() and best != rest:
            for later_lo, later_hi in _merged(steps[k + 1 :]):
                madvise(later_lo, later_hi - later_lo, _MADV_HUGEPAGE if best else _MADV_NOHUGEPAGE)
            rest = best


def _merged(steps: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent steps joined: one advice call per buffer rather than per step."""
    out: list[tuple[int, int]] = []
    for lo, hi in steps:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


_collector = threading.Lock()
_pauses = 0  # restores inside collector_paused, in all threads
_was_enabled = False  # whether the collector ran when the first of them began


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector while inside; nested and concurrent uses count.

    A restore of many leaves makes hundreds of thousands of objects that live
    on (entries, regions, arrays), and each batch of new survivors sets off
    another full collection over the whole heap: restoring 10,000 replicated
    leaves took 2.6 s, of which the collector took 1.0-1.2 s (7 full and 93
    middle collections), and 1.7-2.1 s with it paused. Reference counting
    still frees whatever is not in a cycle; cycles made meanwhile (by any
    thread: the collector is process-wide) wait for the next collection after
    the pause. When the last pause ends, the collector runs again only if it
    ran when the first one began: a program that turned it off keeps it off.
    """
    global _pauses, _was_enabled
    with _collector:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _collector:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()
