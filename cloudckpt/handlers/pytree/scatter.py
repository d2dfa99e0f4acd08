"""One inner chunk's bytes placed, as they arrive, into the strided parts of several arrays.

A restore onto another mesh cuts inner chunks: a saved (3264, 512) inner
chunk may feed two destination arrays 256 columns each, neither part
contiguous in the chunk's bytes. Instead of reading the chunk into a
temporary and copying the parts out (one extra copy, and a byte budget that
limits the reads in flight), a :class:`Scatter` is handed to the backend's
``read_into`` as a sink (:class:`cloudckpt.storage._stream.Sink`): each piece
of the body, as it arrives, is copied into place a block of whole rows at a
time, and the crc32c is computed over the same piece while it is still in
the cache. Only a partial row (at most one row's bytes) is held between
pieces. A streamed GCS body's pieces (immutable bytes) are handed to a few
placing threads (``write_later``), so the copies and checksums run beside the
event loop: each scatter's pieces in order, different scatters in parallel,
with a bounded backlog (a reader waits for ``room``). The reader waits for a
scatter's pieces before it verifies or reads again. On a host of two cores
or fewer there are no placing threads (``THREADS`` is 0): ``write_later``
places a piece at once, on the event loop, while it is still in the cache
the socket wrote it through. The file system's reads, already on worker
threads, place them at once (``write``).

Arrays of any rank but 0 are placed this way: the inner chunk is seen as
rows of its last axis, and each block of whole rows is copied with numpy,
one plane (the last two axes) at a time, into every destination it
overlaps (see ``supports``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import crc32c
import numpy as np

from cloudckpt.format import layout
from cloudckpt.storage.held import HeldClock


def _cores() -> int:
    """The cores this process may run on (its affinity, where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for(cores: int) -> int:
    """``THREADS`` on a host of ``cores`` cores."""
    return min(8, cores) if cores > 2 else 0


#: Threads placing the pieces handed over with ``write_later``: different scatters (inner
#: chunks of different reads) are placed in parallel, each scatter's pieces in order by
#: one thread at a time. crc32c and numpy's copies release the GIL; more threads than
#: cores would only queue. 0 (two cores or fewer): ``write_later`` places each piece at
#: once, on the reader's thread. There the threads share the event loop's cores, and a
#: piece read on another core than the one the socket wrote it on cost more CPU than the
#: offload saved: on 2 cores, restoring 1 GiB from GCS onto another mesh took 0.90 CPU-s
#: placed at once against 1.23 with two placing threads, 0.98 s against 1.20 s of wall
#: time; in a second run 0.78 against 1.03 CPU-s, 0.85 s against 0.96 s (medians of 7-8
#: interleaved repetitions, fake-gcs-server on the same host). Placing at once, the event
#: loop's thread spent about 0.7 CPU-s per GiB (about 1.5 GB/s): more than a two-vCPU
#: cloud VM's network delivers.
THREADS = threads_for(_cores())
#: Bytes handed over and not yet placed, over all scatters of the process: a reader
#: past it waits (``room``) before handing over more, so a slow placement pauses the
#: reads (their sockets) instead of growing a queue.
QUEUED_BYTES = 32 * 1024 * 1024
#: A scatter's thread gives its place to the others after placing this many bytes.
_TURN_BYTES = 1024 * 1024


class _Pool:
    """The placing threads and the bytes waiting for them (shared by every scatter)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._queued = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="cloudckpt-scatter")
            executor = self._executor
        executor.submit(fn)

    def add(self, n: int) -> None:
        with self._lock:
            self._queued += n

    def release(self, n: int) -> None:
        """``n`` bytes were placed (or dropped): wakes the readers waiting for room."""
        with self._lock:
            self._queued -= n
            if self._queued >= QUEUED_BYTES or not self._waiters:
                return
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits
                loop.call_soon_threadsafe(_wake, waiter)

    def crowded(self) -> bool:
        """Whether ``QUEUED_BYTES`` or more wait to be placed (``room`` would wait)."""
        with self._lock:
            return self._queued >= QUEUED_BYTES

    async def room(self) -> None:
        """Returns once fewer than ``QUEUED_BYTES`` bytes wait to be placed."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._queued < QUEUED_BYTES:
                    return
                waiter = loop.create_future()
                self._waiters.append((loop, waiter))
            await waiter


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


_pool = _Pool()


def supports(inner: Sequence[int]) -> bool:
    """Whether inner chunks of this shape can be scattered (any rank but 0)."""
    return len(inner) >= 1


class Scatter:
    """A sink placing one inner chunk's bytes (C order) into the parts of it arrays want.

    ``parts`` pairs a destination view (any strides; the stored dtype) with
    the box of the inner chunk it receives, a ``(start, stop)`` per axis in the
    chunk's own coordinates (rank 1: ``((row0, row1), (0, 1))``, rows of one
    element). ``crc`` is the crc32c of every byte written, in order;
    ``written`` how many there were. The caller compares them with the stored crc32c.
    ``held_s`` is how long readers waited in ``room`` (the placement's time, not the
    store's: a read's hedge and deadline clocks leave it out).
    """

    def __init__(
        self,
        inner: Sequence[int],
        dtype: np.dtype,
        parts: list[tuple[np.ndarray, tuple[tuple[int, int], ...]]],
    ) -> None:
        if not supports(inner):
            raise ValueError(f"a rank 0 inner chunk is not scattered: {tuple(inner)}")
        shape = (inner[0], 1) if len(inner) == 1 else tuple(inner)
        # Rows of the last axis, grouped in planes of the last two axes (one copy per
        # plane and destination); ``leading`` are the axes before them.
        self._leading, self._plane, self.cols = shape[:-2], shape[-2], shape[-1]
        self.rows = math.prod(shape[:-1])
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.cols * self.dtype.itemsize
        self.nbytes = self.rows * self.row_bytes
        self._parts = []
        for view, box in parts:
            # Rank 1: a contiguous slice seen as a column (a view); otherwise the view itself.
            view_nd = view.reshape(-1, 1) if view.ndim == 1 else view
            if len(box) != len(shape) or view_nd.shape != tuple(b - a for a, b in box):
                raise ValueError(
                    f"a destination of shape {view.shape} for the box {box} of an inner "
                    f"chunk of shape {tuple(inner)}"
                )
            self._parts.append((view_nd, box[:-2], *box[-2], *box[-1]))
        self.crc = 0
        self.written = 0
        self._held = HeldClock()  # the time readers waited in room
        self._carry = np.empty(self.row_bytes, np.uint8)
        self._carried = 0
        self._error: BaseException | None = None
        # Pieces handed over and not yet placed, and the future of the thread placing
        # them (None while none is): one thread at a time, so they are placed in order.
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, memoryview, Callable[[], None] | None]] = deque()
        self._drained: Future[None] | None = None

    async def room(self) -> None:
        """Waits until a piece may be handed over: the placing threads' backlog is bounded."""
        with self._held.waiting():
            await _pool.room()

    @property
    def held_s(self) -> float:
        """Seconds readers have waited in ``room`` so far, the wait under way included."""
        return self._held.seconds

    def crowded(self) -> bool:
        """Whether ``room`` would wait (for a reader that cannot await: a protocol)."""
        return _pool.crowded()

    def write_later(
        self, pos: int, data: memoryview, release: Callable[[], None] | None = None
    ) -> None:
        """``write``, done by a placing thread; ``data`` must stay valid until placed.

        A streamed body's pieces are handed over this way so that the copies and
        the crc32c run beside the event loop instead of on it, several scatters
        at once. Never blocks: a reader awaits ``room`` first to stay within the
        bounded backlog. ``settled`` waits for the pieces (and raises what went wrong).
        ``release``, where given, is called once ``data`` is placed or dropped
        (after a failure), never touched again: its memory may carry the next piece.
        Without placing threads (``THREADS`` 0) the piece is placed before this returns.
        """
        if not THREADS:
            self._place(pos, data, release)
            return
        with self._lock:
            self._queue.append((pos, data, release))
            _pool.add(len(data))
            if self._drained is not None:
                return  # the thread placing this scatter's pieces takes it in turn
            self._drained = Future()
            self._drained.set_running_or_notify_cancel()  # a waiter's cancel can't cancel it
        _pool.submit(self._drain)

    def _drain(self) -> None:
        """Places the pieces handed over, in order, until none is left (or its turn ends)."""
        placed = 0
        while True:
            with self._lock:
                if not self._queue:
                    done, self._drained = self._drained, None
                    break
                if placed >= _TURN_BYTES:  # let other scatters' pieces in, then go on
                    _pool.submit(self._drain)
                    return
                pos, data, release = self._queue.popleft()
            try:
                self._place(pos, data, release)
            finally:
                _pool.release(len(data))
            placed += len(data)
        if done is not None:
            done.set_result(None)

    def _place(self, pos: int, data: memoryview, release: Callable[[], None] | None) -> None:
        """Places a piece handed over (unless one failed before), then releases it."""
        try:
            if self._error is None:
                self._write_now(pos, data)
        except BaseException as exc:  # reported by settled(), in order
            self._error = exc
        finally:
            if release is not None:
                release()

    @property
    def pending(self) -> Future[None] | None:
        """Done once every piece handed over so far is placed; None when none waits."""
        return self._drained

    @property
    def failed(self) -> BaseException | None:
        """What went wrong placing a piece handed over, if anything."""
        return self._error

    async def settled(self) -> None:
        """Waits until every piece handed over has been placed; raises the first failure."""
        drained = self._drained
        if drained is not None:
            await asyncio.shield(asyncio.wrap_future(drained))
        if self._error is not None:
            raise self._error

    def write(self, pos: int, data: memoryview) -> None:
        """Places bytes ``pos:pos+len(data)`` of the inner chunk (in order; 0 starts over).

        Waits for pieces handed over with ``write_later`` first (a retried read
        starts over after them).
        """
        drained = self._drained
        if drained is not None:
            drained.result()
        if pos == 0:
            self._error = None
        if self._error is not None:
            raise self._error
        self._write_now(pos, data)

    def _write_now(self, pos: int, data: memoryview) -> None:
        if pos == 0 and self.written:
            self.crc, self.written, self._carried = 0, 0, 0
        if pos != self.written or pos + len(data) > self.nbytes:
            raise ValueError(
                f"bytes {pos}-{pos + len(data)} of a {self.nbytes}-byte inner chunk written "
                f"out of order (next is byte {self.written})"
            )
        self.crc = crc32c.crc32c(data, self.crc)
        self.written += len(data)
        src = np.frombuffer(data, np.uint8)
        row = (pos - self._carried) // self.row_bytes  # the row the carry belongs to
        if self._carried:
            take = min(self.row_bytes - self._carried, src.size)
            self._carry[self._carried : self._carried + take] = src[:take]
            self._carried += take
            src = src[take:]
            if self._carried < self.row_bytes:
                return
            self._rows(row, self._carry)
            self._carried = 0
            row += 1
        whole = src.size // self.row_bytes
        if whole:
            self._rows(row, src[: whole * self.row_bytes])
        rest = src.size - whole * self.row_bytes
        if rest:
            self._carry[:rest] = src[whole * self.row_bytes :]
            self._carried = rest

    def _rows(self, first: int, flat: np.ndarray) -> None:
        """Copies whole rows ``first:first + n`` (``flat``: their bytes) into every part."""
        block = flat.view(self.dtype).reshape(-1, self.cols)
        row, end = first, first + block.shape[0]
        while row < end:  # one plane at a time (rank 1 and 2: one plane in all)
            plane, r = divmod(row, self._plane)
            stop = min(end, row - r + self._plane)
            rows = block[row - first : stop - first]
            at = layout.unravel(plane, self._leading)
            for view, lead, r0, r1, c0, c1 in self._parts:
                if not all(a <= x < b for x, (a, b) in zip(at, lead, strict=True)):
                    continue
                a, b = max(r, r0), min(r + rows.shape[0], r1)
                if a < b:
                    where = tuple(x - a0 for x, (a0, _) in zip(at, lead, strict=True))
                    view[where][a - r0 : b - r0] = rows[a - r : b - r, c0:c1]
            row = stop
