"""A large response body received by the socket straight into the caller's memory.

aiohttp hands a body over as ``bytes`` objects: the socket's ``recv`` makes
one, its HTTP parser copies the body out of it into another, and the reader
copies that into the destination, each with Python work per 64-256 KiB
piece. On a restore that is most of the event loop's time, and the loop
receives every byte. Here aiohttp still sends the request and parses the
status and headers (its pool, proxies, TLS, timeouts, errors); once the body
starts, the connection's transport is handed to an
:class:`asyncio.BufferedProtocol` whose buffers are the destination itself,
so the kernel (or the TLS layer) writes each byte once, where it belongs.

Only bodies that are plain bytes on the wire qualify: a known
``Content-Length``, no transfer or content coding, destinations that are flat
views or sinks that take pieces later (``write_later``), at least
:data:`MIN_BYTES`. A body received to its last byte, and not one byte more,
leaves the connection where aiohttp's parser leaves one at a body's end: it
is handed back to aiohttp's protocol and its pool keeps it for the next
request (``_hand_back``). A new connection per ranged GET cost, on loopback,
~0.3 ms of this process's CPU and ~0.4 ms of latency (``TCPConnector
(force_close=True)`` against keep-alive, fake-gcs-server); a cloud's adds a
TLS handshake and TCP's slow start. Any other ending (cancelled, cut short,
buffers full before the body ended, bytes past its end) closes the connection.
A body that ends before its ``Content-Length`` raises
:class:`aiohttp.ClientPayloadError`, as aiohttp does, so it is retried the same
way. Cancelled or failed, nothing more is written into the destination once
the awaiting call has returned.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np

from cloudckpt.storage._stream import Buffer

#: Bodies shorter than this go through aiohttp's reader: a new connection for the next
#: request costs more than the copies saved.
MIN_BYTES = 1 << 20
#: Pieces a sink's bytes are received in (handed over whole, handed back once placed).
PIECE_BYTES = 1 << 20
#: Pieces handed back and kept for the next ones: the placing backlog's bound (32 MiB),
#: so that a steady stream of pieces reuses the same memory.
KEEP_PIECES = 32
#: Where bytes that are not placed go (a skipped prefix; a read after the receiver stopped).
_DISCARD_BYTES = 1 << 16


class _Pieces:
    """Piece memory handed back by sinks once placed, for the next pieces (thread-safe).

    A placing thread holds a piece until it is copied into place, so new
    memory per piece meant a heap that grew and shrank with the backlog: each
    piece's pages faulted in again. Measured here, 1 GiB placed by the
    scatter threads from fresh pieces took 130-205k page faults and 0.64-2.1
    CPU-seconds; from pieces handed back, at most 4k and 0.28-0.36 s. At most
    ``KEEP_PIECES`` are kept between restores.
    """

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self) -> np.ndarray:
        """A ``PIECE_BYTES`` buffer: one handed back, else new memory."""
        with self._lock:
            if self._free:
                return self._free.pop()
        return np.empty(PIECE_BYTES, np.uint8)

    def give(self, piece: np.ndarray) -> None:
        """Takes ``piece`` back; its holder must not touch it any more."""
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(piece)

    def kept(self) -> int:
        with self._lock:
            return len(self._free)


_pieces = _Pieces(KEEP_PIECES)


def usable(response: Any, buffers: list[Buffer]) -> bool:
    """Whether the body of ``response`` can be received straight into ``buffers``."""
    if not all(isinstance(b, memoryview) or hasattr(b, "write_later") for b in buffers):
        return False
    if sum(b.nbytes for b in buffers) < MIN_BYTES:
        return False
    headers = response.headers
    coding = headers.get("Content-Encoding", "identity").strip().lower()
    if response.content_length is None or "Transfer-Encoding" in headers or coding != "identity":
        return False
    connection = response.connection
    return (
        connection is not None
        and connection.transport is not None
        and hasattr(connection.transport, "set_protocol")
        and not connection.transport.is_closing()
    )


def _flat(buffer: Buffer) -> Buffer:
    if isinstance(buffer, memoryview) and (buffer.format != "B" or buffer.ndim != 1):
        return buffer.cast("B")
    return buffer


class _Receiver(asyncio.BufferedProtocol):
    """Receives ``length`` body bytes: ``skip`` dropped, then the views filled in order.

    A sink (``write_later``) is filled through pieces of up to ``PIECE_BYTES``,
    each handed over whole once received (a placing thread, or the sink at
    once on a small host, copies it into place, then hands the memory back for
    later pieces: ``_Pieces``); past its backlog bound (``crowded``) the socket
    is not read until it has ``room``.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        views: list[Buffer],
        skip: int,
        length: int,
        done: asyncio.Future[None],
    ) -> None:
        self._transport = transport
        self._views = [v for v in views if v.nbytes]
        self._at = 0  # the view being filled
        self._pos = 0  # bytes of it filled
        self._skip = skip
        self.left = length  # body bytes not received yet
        self.placed = 0
        self._done = done
        self._discard = memoryview(bytearray(_DISCARD_BYTES))
        self._stopped = False
        self._piece: memoryview | None = None  # a sink's piece being received (of _pieces)
        self._filled = 0  # bytes of it received
        self._waiting: asyncio.Task[None] | None = None  # for a crowded sink's room
        self.stray = 0  # bytes read after receiving stopped (past the body, or after a stop)

    @property
    def full(self) -> bool:
        return self._at >= len(self._views)

    def take(self, data: memoryview) -> None:
        """Places bytes aiohttp had already received (the start of the body)."""
        while data and not self._stopped:
            n = min(len(data), self.left)
            if self._skip:
                n = min(n, self._skip)
            else:
                view = self._views[self._at]
                n = min(n, view.nbytes - self._pos)
                if isinstance(view, memoryview):
                    view[self._pos : self._pos + n] = data[:n]
                else:
                    self._hand(view, memoryview(bytes(data[:n])))
            data = data[n:]
            self._advance(n)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._stopped:  # a read before the transport noticed the pause: dropped
            return self._discard
        if self._skip:
            return self._discard[: min(_DISCARD_BYTES, self._skip, self.left)]
        view = self._views[self._at]
        n = min(view.nbytes - self._pos, self.left)
        if isinstance(view, memoryview):
            return view[self._pos : self._pos + n]
        if self._piece is None:
            self._piece, self._filled = memoryview(_pieces.take())[: min(n, PIECE_BYTES)], 0
        return self._piece[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._stopped:
            self.stray += nbytes
            return
        if self._skip or self._piece is None:
            return self._advance(nbytes)
        # A piece is never longer than the body left (get_buffer): it is handed over,
        # and counted, once whole.
        self._filled += nbytes
        if self._filled == self._piece.nbytes:
            piece, self._piece = self._piece, None
            # Its buffer (``piece.obj``) comes back to _pieces once placed.
            self._hand(self._views[self._at], piece, functools.partial(_pieces.give, piece.obj))
            self._advance(piece.nbytes)

    def _hand(
        self, sink: Any, piece: memoryview, release: Callable[[], None] | None = None
    ) -> None:
        """Gives a sink its next piece; past its backlog bound, stops reading until it has room.

        ``release`` (where given) the sink calls once the piece is placed; the
        piece is never touched here again.
        """
        sink.write_later(self._pos, piece, release)
        crowded = getattr(sink, "crowded", None)
        if crowded is not None and crowded():
            self._transport.pause_reading()
            if self._waiting is None:
                self._waiting = asyncio.ensure_future(self._room(sink))

    async def _room(self, sink: Any) -> None:
        await sink.room()
        self._waiting = None
        if not self._stopped:
            self._transport.resume_reading()

    def _advance(self, n: int) -> None:
        self.left -= n
        if self._skip:
            self._skip -= n
        else:
            self._pos += n
            self.placed += n
            if self._pos == self._views[self._at].nbytes:
                self._at, self._pos = self._at + 1, 0
        if self.left <= 0 or (self.full and not self._skip):
            self._finish()  # the body has ended, or the buffers are full

    def _finish(self, exc: BaseException | None = None) -> None:
        """Stops receiving: nothing more is written into the views from here on."""
        if self._stopped:
            return
        self._stopped = True
        self._transport.pause_reading()
        if self._waiting is not None:
            self._waiting.cancel()
        if not self._done.done():
            if exc is None:
                self._done.set_result(None)
            else:
                self._done.set_exception(exc)

    def start(self) -> None:
        """Reads the socket, unless a crowded sink is waiting for room (it resumes it then)."""
        if self._waiting is None:
            self._transport.resume_reading()

    def stop(self) -> None:
        self._finish()

    def eof_received(self) -> bool:
        self._ended()
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self._ended(exc)

    def _ended(self, exc: BaseException | None = None) -> None:
        if self._stopped:
            return
        if self.left > 0:  # a piece received in part counts as missing: never handed over
            error = aiohttp.ClientPayloadError(
                f"Response payload is not completed: {self.left} bytes of the body missing"
            )
            if exc is not None:
                error.__cause__ = exc
            return self._finish(error)
        self._finish()


async def receive_into(response: Any, buffers: list[Buffer], skip: int) -> int:
    """The body of ``response`` (``usable``), less its first ``skip`` bytes, into ``buffers``.

    Returns the bytes placed: the buffers' total, or fewer when the body ends
    first. Stops when the buffers are full; the rest of a longer body is not read.
    """
    views = [_flat(b) for b in buffers]
    connection = response.connection
    transport = connection.transport
    protocol = connection.protocol
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    receiver = _Receiver(transport, views, skip, response.content_length, done)
    taken = False
    try:
        # What aiohttp received with the headers (and has not handed over yet) comes first.
        receiver.take(memoryview(response.content.read_nowait()))
        if receiver.left <= 0:
            receiver.stop()
        if not done.done():
            drop = getattr(protocol, "_drop_timeout", None)
            if drop is not None:
                drop()  # its read timer would fire on a socket it no longer reads
            transport.set_protocol(receiver)
            taken = True
            receiver.start()
            await done
        done.result()
    finally:
        receiver.stop()
        if not (taken and _hand_back(response, transport, protocol, receiver)):
            response.close()  # aiohttp's parser never saw the body end: not reusable
    return receiver.placed


def _hand_back(response: Any, transport: Any, protocol: Any, receiver: _Receiver) -> bool:
    """Gives the connection back to aiohttp at the body's end, as its parser would; or False.

    Only a body received whole (``left`` 0), with no byte read past it, on a
    transport still open and still ours, qualifies. aiohttp's protocol gets
    the transport back, then the response's reader is told the body has
    ended, as the parser tells it: that resumes the socket's reading and
    releases the connection to the pool, which keeps it unless the protocol
    says it must close (the server's ``Connection: close``, a protocol error).
    aiohttp makes a new parser for the connection's next request.
    """
    content = response.content
    if (
        receiver.left != 0
        or receiver.stray
        or transport.is_closing()
        or transport.get_protocol() is not receiver
        or response.connection is None
        or response.connection.protocol is not protocol
        or content.is_eof()
        or content.exception() is not None
    ):
        return False
    transport.set_protocol(protocol)
    content.feed_eof()
    return True
