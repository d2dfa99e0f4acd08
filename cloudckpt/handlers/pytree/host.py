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
import resource
import sys
import threading
import time
from collections import deque
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
#: A page size's cost is the least of its last this many measures (see ``PageSizes``).
PREFAULT_MEASURES = 4
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
    ``PREFAULT_EXPLORE``-th step tries the other one again.

    A size's cost is the least of its last ``PREFAULT_MEASURES`` measures, not
    the last one. A single step can take many times its usual cost (a vCPU
    descheduled inside the call still counts as the thread's time): in 1 GiB
    restores here huge pages usually cost 0.1-0.2 s per GiB and small ones
    0.45-0.6 s, yet about one huge step in 30 took 0.85-3.9 s per GiB. Going by
    the last measure, one such step put every step after it on small pages, at
    three to four times the cost, until the next retry. Delays only ever add
    time, so the least of the recent measures is the cost without them, and a lasting
    change (huge pages turning dear) still shows within ``PREFAULT_MEASURES``
    steps of that size. A step counts only the pages its call mapped (see
    ``_mapped``): pages the fill reached first would make a size look free.
    One measure may serve several threads mapping at once (a restore's read
    groups); its measures are kept under a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._measures: dict[bool, deque[float]] = {
            huge: deque(maxlen=PREFAULT_MEASURES) for huge in (True, False)
        }
        self.steps = 0

    @property
    def cost(self) -> dict[bool, float | None]:
        """Seconds per byte of each size (True: huge pages), None where not yet measured."""
        with self._lock:
            return {huge: min(m) if m else None for huge, m in self._measures.items()}

    def best(self) -> bool:
        """The size measured faster so far (huge pages, numpy's default, until both are known)."""
        return _faster(self.cost)

    def pick(self) -> bool:
        """The size for the next measured step: True for huge pages, False for small ones."""
        cost = self.cost
        with self._lock:
            self.steps += 1
            steps = self.steps
        if cost[True] is None:
            return True
        if cost[False] is None:
            return False
        best = _faster(cost)
        return (not best) if steps % PREFAULT_EXPLORE == 0 else best

    def record(self, huge: bool, seconds: float, nbytes: int) -> None:
        """One step's measure: ``nbytes`` mapped with ``huge`` pages in ``seconds``."""
        with self._lock:
            self._measures[huge].append(seconds / nbytes)


def _faster(cost: dict[bool, float | None]) -> bool:
    """Whether huge pages cost no more than small ones (or either is not measured yet)."""
    huge, small = cost[True], cost[False]
    return huge is None or small is None or huge <= small


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
        faults, start = _thread_faults(), time.thread_time()
        if madvise(lo, hi - lo, _MADV_POPULATE_WRITE) != 0:
            return  # unsupported here: the first refusal says so for all of them
        seconds = time.thread_time() - start
        mapped = _mapped(hi - lo, faults, huge)
        if not whole or not mapped:
            continue
        pages.record(huge, seconds, mapped)
        best = pages.best()
        if None not in pages.cost.values() and best != rest:
            for later_lo, later_hi in _merged(steps[k + 1 :]):
                madvise(later_lo, later_hi - later_lo, _MADV_HUGEPAGE if best else _MADV_NOHUGEPAGE)
            rest = best


def _thread_faults() -> int | None:
    """The calling thread's page faults so far (Linux), None where the system does not count them."""
    try:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    except (AttributeError, OSError):
        return None


def _mapped(nbytes: int, faults_before: int | None, huge: bool) -> int:
    """The bytes of an ``nbytes`` step that its mapping call mapped, from the faults it took.

    Bodies may land in a step before the prefault gets there, and pages already
    mapped cost next to nothing: timed as the whole step, they would make that
    size look free. Each fault maps one page of the advised size (more faults
    than that, small pages where a huge one was refused, still map at most the
    step). Where faults are not counted, the whole step is taken as mapped.
    """
    after = _thread_faults()
    if faults_before is None or after is None:
        return nbytes
    return min(nbytes, (after - faults_before) * (_HUGE_PAGE if huge else _PAGE))


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
