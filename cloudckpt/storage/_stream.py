"""Response bodies streamed straight into the caller's buffers (restores' ranged reads)."""

from __future__ import annotations

from typing import Any


async def fill_from_stream(stream: Any, buffers: list[memoryview], skip: int) -> int:
    """Copies an aiohttp body, less its first ``skip`` bytes, into ``buffers``; bytes placed.

    Stops when the buffers are full (the rest of the body is not read) or the
    body ends (fewer bytes: the caller reports the object as truncated).
    """
    placed = 0
    views = iter(buffers)
    current = next(views, None)
    pos = 0
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
            current[pos : pos + n] = piece[:n]
            piece, pos, placed = piece[n:], pos + n, placed + n
            if pos == current.nbytes:
                current, pos = next(views, None), 0
                while current is not None and current.nbytes == 0:
                    current = next(views, None)
    return placed
