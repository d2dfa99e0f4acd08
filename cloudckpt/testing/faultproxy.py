"""Reverse proxies on 127.0.0.1 for tests: the base, and one that fails requests on purpose.

:class:`LoopbackProxy` runs an aiohttp server on a thread of its own in front
of a real server; :class:`FaultProxy` fails a chosen fraction of requests
(503, 429, dropped connections, or a dropped response after the request
reached the server), for retry tests. :mod:`cloudckpt.testing.cloudproxy`
builds on the same base to answer as the real clouds do.

Needs aiohttp (a dependency of cloudckpt).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from cloudckpt.testing.servers import free_port


@dataclass
class FaultStats:
    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    #: (method, path with query) of every request, in arrival order.
    log: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_faults(self) -> int:
        return sum(self.faults.values())


class LoopbackProxy:
    """An aiohttp reverse proxy on a free 127.0.0.1 port, run on a thread of its own.

    Subclasses implement ``_handle(request)``; ``self._session`` is the client
    session they forward with. ``start``/``stop`` (or ``with``) run it.
    """

    def __init__(self, upstream: str, flavor: str) -> None:
        if flavor not in ("s3", "gcs"):
            raise ValueError(f"flavor must be 's3' or 'gcs', got {flavor!r}")
        self.flavor = flavor
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: Any = None
        self._session: Any = None

    async def _handle(self, request: Any) -> Any:
        raise NotImplementedError

    async def _upstream(
        self, method: str, url: Any, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Sends one request upstream as is: its status, headers to answer with, and body."""
        async with self._session.request(
            method, url, headers=headers, data=body, allow_redirects=False, auto_decompress=False
        ) as upstream:
            payload = await upstream.read()
            # HEAD answers carry the object's Content-Length with no body: keep it.
            dropped: tuple[str, ...] = ("transfer-encoding", "connection")
            if method != "HEAD":
                dropped += ("content-length",)
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in dropped}
            return upstream.status, out, payload

    async def _pass_through(self, request: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """``request`` (with its ``body`` already read) sent to the upstream unchanged."""
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding")
        }
        return await self._upstream(request.method, self.upstream + request.path_qs, headers, body)

    @staticmethod
    def _respond(method: str, status: int, headers: dict[str, str], payload: bytes) -> Any:
        """The answer to send back for an upstream answer."""
        from aiohttp import web

        if method == "HEAD":
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, body=payload, headers=headers)

    def start(self) -> Self:
        from aiohttp import ClientSession, TCPConnector, web

        # Injected faults are the point; don't log each one as a server error.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

        async def setup() -> None:
            self._session = ClientSession(
                connector=TCPConnector(limit=64), skip_auto_headers=("User-Agent",)
            )
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(setup(), self._loop).result(30)
        return self

    def stop(self) -> None:
        async def teardown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(teardown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FaultProxy(LoopbackProxy):
    """A reverse proxy in front of a real server that fails some requests.

    ``delay(method, path_qs, headers, body)`` may hold an answer back for that
    many seconds after the request took effect upstream (a slow response).

    Modes: ``503`` and ``429`` answer with that status without forwarding;
    ``drop`` closes the connection without forwarding; ``lost_response``
    forwards the request (so it takes effect) and then closes the connection
    instead of answering, as when a response is lost on the way back.

    The Host header is preserved so that S3 signatures still verify upstream.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fault_rate: float = 0.2,
        modes: tuple[str, ...] = ("503", "429", "drop", "lost_response"),
        seed: int = 0,
        flavor: str = "s3",
        delay: Callable[[str, str, Mapping[str, str], bytes], float] | None = None,
    ) -> None:
        super().__init__(upstream, flavor)
        self.fault_rate = fault_rate
        self.modes = modes
        self.delay = delay
        self.stats = FaultStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _choose_fault(self, method: str, path: str) -> str | None:
        with self._lock:
            self.stats.requests += 1
            self.stats.log.append((method, path))
            if self._rng.random() >= self.fault_rate:
                return None
            mode = self._rng.choice(self.modes)
            self.stats.faults[mode] += 1
            return mode

    async def _handle(self, request):  # type: ignore[no-untyped-def]

        body = await request.read()
        fault = self._choose_fault(request.method, request.path_qs)
        if fault in ("503", "429"):
            return self._error_response(int(fault))
        if fault == "drop":
            request.transport.close()
            raise ConnectionResetError("injected drop")
        status, out_headers, payload = await self._pass_through(request, body)
        if self.delay is not None:
            held = self.delay(request.method, request.path_qs, request.headers, body)
            if held > 0:
                await asyncio.sleep(held)
        if fault == "lost_response":
            request.transport.close()
            raise ConnectionResetError("injected lost response")
        return self._respond(request.method, status, out_headers, payload)

    def _error_response(self, status: int):  # type: ignore[no-untyped-def]
        """An error shaped like the real service's, so clients parse it as such."""
        from aiohttp import web

        if self.flavor == "gcs":
            body = json.dumps({"error": {"code": status, "message": "injected fault"}})
            return web.Response(status=status, text=body, content_type="application/json")
        code = "SlowDown" if status == 503 else "TooManyRequests"
        body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected fault</Message></Error>"
        return web.Response(status=status, text=body, content_type="application/xml")


class ByteCountingProxy(LoopbackProxy):
    """A pass-through proxy counting the body bytes of every request and answer.

    ``sent[where]`` and ``received[where]`` are the request and answer body
    bytes per request target (``where``: the path with its query, unquoted),
    whichever client sent it (s3fs/gcsfs, tensorstore, cloudckpt's own
    channels): what a process moved to and from the store, as its network saw it.
    """

    def __init__(self, upstream: str, flavor: str) -> None:
        super().__init__(upstream, flavor)
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        from urllib.parse import unquote

        body = await request.read()
        status, headers, payload = await self._pass_through(request, body)
        where = unquote(request.path_qs)
        with self._lock:
            self.sent[where] += len(body)
            if request.method != "HEAD":
                self.received[where] += len(payload)
        return self._respond(request.method, status, headers, payload)

    def totals(self, keep: Callable[[str], bool]) -> tuple[int, int]:
        """(bytes sent, bytes received) of the request targets ``keep`` selects."""
        with self._lock:
            sent = sum(n for where, n in self.sent.items() if keep(where))
            received = sum(n for where, n in self.received.items() if keep(where))
        return sent, received
