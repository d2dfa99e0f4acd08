"""Response bodies streamed straight into the caller's buffers (restores' ranged reads).

A read's destination is a list of flat byte views or of :class:`Sink` objects:
a sink takes the bytes of its stretch in order, as they arrive, for a
destination that is not one flat buffer (an inner chunk shared by two arrays,
each holding a strided part of it). The file system's ``read_into`` feeds
sinks through a small bounce buffer, GCS's from the response body.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Sink(Protocol):
    """Takes ``nbytes`` bytes in order: ``write(pos, data)`` places bytes ``pos:pos+len(data)``.

    A write at ``pos == 0`` after others starts over (a retried read resends
    the stretch from its first byte); any other write continues where the
    last one stopped. ``data`` is only valid during the call.
    """

    nbytes: int

    def write(self, pos: int, data: memoryview) -> None: ...


# A sink may also have ``write_later(pos, data, release=None)``: the same, possibly done
# later by another thread, with ``data`` that stays valid until placed (a streamed body's
# immutable bytes, or a received piece whose ``release`` the sink calls once it has placed
# or dropped it, so that its memory carries a later piece). Its owner
# waits for those writes before reading the result. Where it also has ``async room()``,
# a reader awaits it before each hand-over (the sink's backlog is bounded); a reader
# that cannot await (a protocol) asks ``crowded()`` after each and then awaits ``room``.
# Such a sink counts the seconds its readers waited there in ``held_s`` (a
# :class:`cloudckpt.storage.held.HeldClock`'s ``seconds``): the read's
# hedge and deadline clocks leave them out (``held``), as that time is the placement's,
# not the store's.


#: One element of a read's destination.
Buffer = memoryview | Sink


def place(buffers: list[Buffer], data: memoryview) -> None:
    """Copies ``data`` (at most the buffers' total) into ``buffers`` in order."""
    at = 0
    for b in buffers:
        n = max(0, min(b.nbytes, len(data) - at))
        if n:
            if isinstance(b, memoryview):
                b[:n] = data[at : at + n]
            else:
                b.write(0, data[at : at + n])
        at += b.nbytes


async def fill_from_stream(stream: Any, buffers: list[Buffer], skip: int) -> int:
    """Copies an aiohttp body, less its first ``skip`` bytes, into ``buffers``; bytes placed.

    Stops when the buffers are full (the rest of the body is not read) or the
    body ends (fewer bytes: the caller reports the object as truncated).
    """
    placed = 0
    views = iter(buffers)
    current = next(views, None)
    pos = 0
    while current is not None and current.nbytes == 0:
        current = next(views, None)
    while current is not None:
        data = await stream.readany()
        if not data:
            break
        piece = memoryview(data)
        if skip:
            dropped = min(skip, len(piece))
            piece, skip = piece[dropped:], skip - dropped
        while piece and current is not None:
            n = min(len(piece), current.nbytes - pos)
            if isinstance(current, memoryview):
                current[pos : pos + n] = piece[:n]
            elif hasattr(current, "write_later"):
                room = getattr(current, "room", None)
                if room is not None:
                    await room()  # a bounded backlog: the body waits in the socket instead
                current.write_later(pos, piece[:n])  # the body's bytes stay valid: handed over
            else:
                current.write(pos, piece[:n])
            piece, pos, placed = piece[n:], pos + n, placed + n
            if pos == current.nbytes:
                current, pos = next(views, None), 0
                while current is not None and current.nbytes == 0:
                    current = next(views, None)
    return placed


async def fill_from_range(
    response: Any, buffers: list[Buffer], offset: int, where: str, store: str
) -> int:
    """Places the body of a ranged GET from ``offset`` (answered 200 or 206) into ``buffers``.

    A store that ignored the range answers 200 with the whole object: its first
    ``offset`` bytes are skipped. A 206 must say it starts at ``offset``;
    anything else is refused (naming ``where``, never a URL) before a byte is placed.
    """
    want = sum(b.nbytes for b in buffers)
    skip = 0
    if response.status == 200:
        skip = offset
    elif response.status == 206:
        got = response.headers.get("Content-Range", "")
        if not got.startswith(f"bytes {offset}-"):
            raise OSError(
                f"{store} answered a read of bytes {offset}-{offset + want - 1} of {where} "
                f"with Content-Range {got[:100]!r}; not reading it"
            )
    else:
        raise OSError(f"{store} answered a ranged GET of {where} with {response.status}")
    from cloudckpt.storage import _receive  # it imports Buffer from here

    if _receive.usable(response, buffers):
        return await _receive.receive_into(response, buffers, skip)
    return await fill_from_stream(response.content, buffers, skip)
