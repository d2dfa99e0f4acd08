"""A reverse proxy that never answers some requests: the straggler of a pod-scale save.

One request in ``every`` (by arrival order, after ``offset``) or every request
``stall(method, path)`` picks is held forever: the proxy reads the request,
and then neither forwards it nor answers, with the connection left open,
as a wedged load balancer or a dead storage node does. Only the client's own
deadline ends it. Held requests are released (their connections closed) when
the proxy stops, or end when the client closes their connection:
``open_stalled()`` counts the held requests whose client still holds the
connection open (a client that cancels a losing hedge closes it).

With ``forward_first`` the request is forwarded first, so it takes effect
upstream, and only the answer never comes.

Not part of the public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cloudckpt.testing.faultproxy import LoopbackProxy


@dataclass
class StallStats:
    requests: int = 0
    #: (method, path with query) of every held request, in arrival order.
    stalled: list[tuple[str, str]] = field(default_factory=list)
    #: Held requests whose client closed the connection (it gave up on them).
    abandoned: int = 0


class StallProxy(LoopbackProxy):
    """Forwards requests to a real server, holding some of them forever."""

    def __init__(
        self,
        upstream: str,
        *,
        flavor: str = "s3",
        every: int = 50,
        offset: int = 0,
        stall: Callable[[str, str], bool] | None = None,
        forward_first: bool = False,
    ) -> None:
        super().__init__(upstream, flavor)
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.offset = offset
        self.stall = stall
        self.forward_first = forward_first
        self.stats = StallStats()
        self._lock = threading.Lock()
        self._release: asyncio.Event | None = None
        self._open = 0

    def open_stalled(self) -> int:
        """Held requests whose client connection is still open (a request slot, a socket)."""
        with self._lock:
            return self._open

    def _choose(self, method: str, path: str) -> bool:
        with self._lock:
            self.stats.requests += 1
            if self.stall is not None:
                held = self.stall(method, path)
            else:
                n = self.stats.requests - 1 - self.offset
                held = n >= 0 and n % self.every == self.every - 1
            if held:
                self.stats.stalled.append((method, path))
            return held

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        body = await request.read()
        if not self._choose(request.method, request.path_qs):
            return self._respond(request.method, *await self._pass_through(request, body))
        if self.forward_first:
            await self._pass_through(request, body)
        if self._release is None:
            self._release = asyncio.Event()
        with self._lock:
            self._open += 1
        try:
            # Until the proxy stops, or the client closes the connection.
            while not self._release.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    with self._lock:
                        self.stats.abandoned += 1
                    raise ConnectionResetError("the client closed a stalled request")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._release.wait(), 0.05)
        except asyncio.CancelledError:  # aiohttp cancels a handler whose client went away
            with self._lock:
                self.stats.abandoned += 1
            raise
        finally:
            with self._lock:
                self._open -= 1
        if request.transport is not None:
            request.transport.close()
        raise ConnectionResetError("stalled request released at shutdown")

    def stop(self) -> None:
        def release() -> None:
            if self._release is not None:
                self._release.set()

        self._loop.call_soon_threadsafe(release)
        super().stop()
