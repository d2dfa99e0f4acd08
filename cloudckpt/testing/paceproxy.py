"""A TCP relay that holds each connection's downloads to a fixed rate: one cloud stream.

An emulator on loopback serves one connection as fast as several, so a
reader that fetches a large object with a single GET looks as fast there as
one that splits it. S3 and GCS do not: a single stream carries a fraction of
a host's network, and AWS's performance guide recommends concurrent ranged
GETs of 8-16 MB for large objects. :class:`PacedRelay` stands in front of a
local server and paces what each connection receives to ``rate`` bytes per
second (requests go upstream unpaced), so that a benchmark sees what a
per-stream limit does to a restore.

It relays bytes, not HTTP: requests reach the server as the client sent
them (S3 signatures, which cover the relay's host and port, still verify).
It runs in a process of its own (``python -m cloudckpt.testing.paceproxy``),
so its copies do not share the measured process's interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from typing import Self
from urllib.parse import urlsplit

from cloudckpt.testing.servers import free_port

#: Bytes relayed per read.
_READ_BYTES = 64 * 1024


class PacedRelay:
    """A relay to ``upstream`` (``http://host:port``) pacing each connection's downloads.

    ``with PacedRelay(server.endpoint, rate=25e6) as relay:`` then point the
    client at ``relay.endpoint``.
    """

    def __init__(self, upstream: str, *, rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive bytes per second, got {rate}")
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.rate = rate
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> Self:
        host, port = self.upstream
        argv = [sys.executable, "-m", "cloudckpt.testing.paceproxy", host, str(port)]
        argv += [str(self.port), repr(self.rate)]
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the paced relay did not start (it said {line!r})")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None
) -> None:
    """Copies ``reader`` to ``writer`` until either ends, at most ``rate`` bytes/s on average."""
    start, sent = time.monotonic(), 0
    try:
        while data := await reader.read(_READ_BYTES):
            writer.write(data)
            await writer.drain()
            if rate is not None:
                sent += len(data)
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    except OSError:
        pass  # either side went away: the other is closed below
    finally:
        writer.close()


async def _serve(upstream: tuple[str, int], port: int, rate: float) -> None:
    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*upstream)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pump(client_r, server_w, None), _pump(server_r, client_w, rate))

    server = await asyncio.start_server(relay, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream_host")
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("rate", type=float, help="bytes per second per connection, downloads")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve((args.upstream_host, args.upstream_port), args.port, args.rate))


if __name__ == "__main__":
    main()
