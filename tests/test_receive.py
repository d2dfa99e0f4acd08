"""Large ranged GET bodies received by the socket straight into the caller's buffers.

``cloudckpt.storage._receive`` takes a connection's transport from aiohttp once
the headers are in and lets the kernel (or TLS) write the body into the
destination. These tests run a real HTTP server (aiohttp.web on 127.0.0.1,
plain and TLS with a certificate made here) that answers as stores do and as
they fail: a range honoured or ignored, a body cut short, one that stalls
halfway, gzip and chunked answers (which must stay on aiohttp's reader). The
GCS and S3 servers' own answers are checked in test_direct_chunks_gcs.py and
test_direct_reads_s3.py (``check_read_into``).
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from cloudckpt.storage._stream import fill_from_range

from .backend_harness import direct_receives

DATA = np.random.default_rng(18).bytes(3 << 20)
SENTINEL = 0xAA


def _certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the server's) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Server:
    """What the handler did, and a gate a stalling answer waits at."""

    def __init__(self) -> None:
        self.half_sent = asyncio.Event()
        self.go_on = asyncio.Event()
        self.rest_sent = asyncio.Event()
        #: The client's address (its connection) of each request answered at /honour.
        self.peers: list[Any] = []


def _range_of(request: web.Request) -> tuple[int, int]:
    spec = request.headers["Range"].removeprefix("bytes=")
    first, last = spec.split("-")
    return int(first), min(int(last), len(DATA) - 1)


def _app(server: Server) -> web.Application:
    async def honour(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        server.peers.append(request.transport.get_extra_info("peername"))
        first, last = _range_of(request)
        if first >= len(DATA):
            return web.Response(status=416)
        body = DATA[first : last + 1]
        headers = {"Content-Range": f"bytes {first}-{last}/{len(DATA)}"}
        return web.Response(status=206, body=body, headers=headers)

    async def ignore(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, body=DATA)

    async def partial(request: web.Request, stall: bool) -> web.StreamResponse:
        first, last = _range_of(request)
        body = DATA[first : last + 1]
        response = web.StreamResponse(
            status=206, headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}"}
        )
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        server.half_sent.set()
        if not stall:
            assert request.transport is not None
            request.transport.close()  # the connection ends with half the body sent
            return response
        await server.go_on.wait()
        try:
            await response.write(body[len(body) // 2 :])
            server.rest_sent.set()
        except (ConnectionError, RuntimeError):
            server.rest_sent.set()  # the client had gone: nothing more to send
        return response

    async def gzipped(request: web.Request) -> web.StreamResponse:
        first, last = _range_of(request)
        headers = {
            "Content-Range": f"bytes {first}-{last}/{len(DATA)}",
            "Content-Encoding": "gzip",
        }
        return web.Response(
            status=206, body=gzip.compress(DATA[first : last + 1], 1), headers=headers
        )

    async def chunked(request: web.Request) -> web.StreamResponse:
        first, last = _range_of(request)
        response = web.StreamResponse(
            status=206, headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        body = DATA[first : last + 1]
        for at in range(0, len(body), 1 << 18):
            await response.write(body[at : at + (1 << 18)])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/honour", honour)
    app.router.add_get("/ignore", ignore)

    async def cut(request: web.Request) -> web.StreamResponse:
        return await partial(request, stall=False)

    async def stall(request: web.Request) -> web.StreamResponse:
        return await partial(request, stall=True)

    app.router.add_get("/cut", cut)
    app.router.add_get("/stall", stall)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/chunked", chunked)
    return app


@asynccontextmanager
async def _serving(
    scheme: str, tmp_path: Path
) -> AsyncIterator[tuple[Server, str, aiohttp.ClientSession]]:
    server = Server()
    runner = web.AppRunner(_app(server))
    await runner.setup()
    server_ssl = client_ssl = None
    if scheme == "https":
        cert, key = _certificate(tmp_path)
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ssl.load_cert_chain(cert, key)
        client_ssl = ssl.create_default_context(cafile=str(cert))
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    connector = aiohttp.TCPConnector(ssl=client_ssl if client_ssl is not None else True)
    session = aiohttp.ClientSession(connector=connector)
    try:
        yield server, f"{scheme}://127.0.0.1:{port}", session
    finally:
        await session.close()
        await runner.cleanup()


@pytest.fixture
def received() -> Iterator[list[int]]:
    """The body lengths the direct receiver took (the other answers went through aiohttp)."""
    with direct_receives() as calls:
        yield calls


def _buffers(*sizes: int) -> list[bytearray]:
    return [bytearray([SENTINEL]) * n for n in sizes]


async def _get(session: aiohttp.ClientSession, url: str, offset: int, buffers: list[Any]) -> int:
    """A ranged GET of ``url`` into ``buffers`` (bytearrays, or views and sinks), as stores do."""
    into = [memoryview(b) if isinstance(b, bytearray) else b for b in buffers]
    want = sum(b.nbytes for b in into)
    headers = {"Range": f"bytes={offset}-{offset + want - 1}"}
    async with session.get(url, headers=headers) as response:
        return await fill_from_range(response, into, offset, "test://obj", "TEST")


def _run(scheme: str, tmp_path: Path, test: Callable[..., Any]) -> None:
    async def go() -> None:
        async with _serving(scheme, tmp_path) as (server, base, session):
            await test(server, base, session)

    asyncio.run(asyncio.wait_for(go(), 60))  # a socket left waiting fails, not hangs


SCHEMES = pytest.mark.parametrize("scheme", ["http", "https"])


@SCHEMES
def test_a_large_body_lands_in_place_across_many_buffers(
    scheme: str, tmp_path: Path, received: list[int]
) -> None:
    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        # Chunk data and its 4-byte crc32c, alternating, as the chunk reader asks.
        sizes = [1 << 20, 4, 12345, 4, (1 << 20) + 3, 0, 4]
        buffers = _buffers(*sizes)
        assert await _get(session, f"{base}/honour", 777, buffers) == sum(sizes)
        assert b"".join(buffers) == DATA[777 : 777 + sum(sizes)]
        # The same session goes on working, on the connection handed back to its pool.
        again = _buffers(2 << 20)
        assert await _get(session, f"{base}/honour", 0, again) == 2 << 20
        assert bytes(again[0]) == DATA[: 2 << 20]
        small = _buffers(1000)
        assert await _get(session, f"{base}/honour", 5, small) == 1000
        assert bytes(small[0]) == DATA[5:1005]

    _run(scheme, tmp_path, test)
    assert len(received) == 2  # the two large bodies; the small one went through aiohttp


@SCHEMES
def test_a_body_received_whole_leaves_its_connection_to_the_next_request(
    scheme: str, tmp_path: Path, received: list[int]
) -> None:
    """One connection carries many large bodies (no handshake, no slow start per read)."""

    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        for k in range(4):
            offset = 1000 * k
            buffers = _buffers(1 << 20, 4, 1 << 20)
            assert await _get(session, f"{base}/honour", offset, buffers) == (2 << 20) + 4
            assert b"".join(buffers) == DATA[offset : offset + (2 << 20) + 4]
            # aiohttp's own reader (a small body) on the connection handed back
            small = _buffers(100)
            assert await _get(session, f"{base}/honour", offset, small) == 100
            assert bytes(small[0]) == DATA[offset : offset + 100]
        sink, left, right = _halves()  # a sink's pieces, then the connection again
        assert await _get(session, f"{base}/honour", 0, [sink]) == 2 << 20
        await sink.settled()
        values = np.frombuffer(DATA[: 2 << 20], np.float32).reshape(512, 1024)
        np.testing.assert_array_equal(np.concatenate([left, right], axis=1), values)
        assert len(server.peers) == 9 and len(set(server.peers)) == 1, server.peers

    _run(scheme, tmp_path, test)
    assert received == [(2 << 20) + 4] * 4 + [2 << 20]


@SCHEMES
def test_a_connection_is_never_reused_after_a_body_not_received_whole(
    scheme: str, tmp_path: Path, received: list[int]
) -> None:
    """Buffers full before the body's end, or a cancelled read: closed, and the next is right."""

    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        async def check(offset: int) -> None:
            (buffer,) = _buffers(1 << 20)
            assert await _get(session, f"{base}/honour", offset, [buffer]) == 1 << 20
            assert bytes(buffer) == DATA[offset : offset + (1 << 20)]

        await check(0)
        (buffer,) = _buffers(1 << 20)  # a 3 MiB answer to a 1 MiB range: its rest is unread
        assert await _get(session, f"{base}/ignore", 5, [buffer]) == 1 << 20
        await check(7)
        read = asyncio.ensure_future(_get(session, f"{base}/stall", 0, _buffers(2 << 20)))
        await server.half_sent.wait()
        await asyncio.sleep(0.2)  # the first half arrives: the body is being received
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        await check(11)
        server.go_on.set()
        await check(13)  # on the connection the last one handed back
        assert len(server.peers) == 4
        first, after_ignored, after_cancelled, last = server.peers
        assert len({first, after_ignored, after_cancelled}) == 3, server.peers
        assert last == after_cancelled

    _run(scheme, tmp_path, test)
    assert received == [1 << 20, len(DATA), 1 << 20, 2 << 20, 1 << 20, 1 << 20]


@SCHEMES
def test_a_store_that_ignores_the_range_has_its_prefix_skipped(
    scheme: str, tmp_path: Path, received: list[int]
) -> None:
    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        (buffer,) = _buffers(1 << 20)
        assert await _get(session, f"{base}/ignore", 1_500_000, [buffer]) == 1 << 20
        assert bytes(buffer) == DATA[1_500_000 : 1_500_000 + (1 << 20)]
        # Past the end of the object: the bytes there are, fewer than asked for.
        (tail,) = _buffers(1 << 20)
        offset = len(DATA) - 5000
        assert await _get(session, f"{base}/ignore", offset, [tail]) == 5000
        assert bytes(tail[:5000]) == DATA[offset:]
        assert set(tail[5000:]) == {SENTINEL}

    _run(scheme, tmp_path, test)
    assert received == [len(DATA), len(DATA)]


@SCHEMES
def test_a_body_cut_short_raises_as_aiohttp_does(
    scheme: str, tmp_path: Path, received: list[int]
) -> None:
    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        with pytest.raises(aiohttp.ClientPayloadError, match="not completed"):
            await _get(session, f"{base}/cut", 0, _buffers(2 << 20))

    _run(scheme, tmp_path, test)
    assert received == [2 << 20]


@SCHEMES
def test_nothing_lands_after_the_read_is_cancelled(
    scheme: str, tmp_path: Path, received: list[int]
) -> None:
    # A hedge that lost, or a deadline: the caller's buffers are someone else's from then on.
    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        (buffer,) = _buffers(2 << 20)
        read = asyncio.ensure_future(_get(session, f"{base}/stall", 0, [buffer]))
        await server.half_sent.wait()
        await asyncio.sleep(0.2)  # the first half arrives
        assert not read.done()
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        server.go_on.set()
        await server.rest_sent.wait()
        await asyncio.sleep(0.2)
        assert set(buffer[1 << 20 :]) == {SENTINEL}
        assert bytes(buffer[: 1 << 19]) == DATA[: 1 << 19]  # the half that came did land

    _run(scheme, tmp_path, test)
    assert received == [2 << 20]


@pytest.mark.parametrize("path", ["gzip", "chunked"])
def test_coded_bodies_stay_on_aiohttps_reader(
    path: str, tmp_path: Path, received: list[int]
) -> None:
    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        buffers = _buffers(1 << 20, 4, 1 << 20)
        assert await _get(session, f"{base}/{path}", 99, buffers) == (2 << 20) + 4
        assert b"".join(buffers) == DATA[99 : 99 + (2 << 20) + 4]

    _run("http", tmp_path, test)
    assert received == []


class _SlowSink:
    """A sink whose placing is held up: crowded after its first piece until let go."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.pieces: list[tuple[int, bytes]] = []
        self.let_go = asyncio.Event()

    def write(self, pos: int, data: memoryview) -> None:
        raise AssertionError("a streamed body's pieces are handed over with write_later")

    def write_later(self, pos: int, data: memoryview, release: Any = None) -> None:
        self.pieces.append((pos, bytes(data)))
        if release is not None:
            release()

    def crowded(self) -> bool:
        return not self.let_go.is_set()

    async def room(self) -> None:
        await self.let_go.wait()


@SCHEMES
def test_a_sink_gets_whole_pieces_and_a_crowded_one_stops_the_socket(
    scheme: str, tmp_path: Path, received: list[int]
) -> None:
    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        sink = _SlowSink(2 << 20)
        (crc,) = _buffers(4)
        want = (2 << 20) + 4
        read = asyncio.ensure_future(_get(session, f"{base}/honour", 100, [sink, crc]))
        await asyncio.sleep(0.3)
        held = len(sink.pieces)
        assert not read.done()  # nothing read past the first piece while it is crowded
        assert 1 <= held <= 2 and sum(len(p) for _, p in sink.pieces) <= (1 << 20) + (1 << 16)
        sink.let_go.set()
        assert await read == want
        assert b"".join(p for _, p in sink.pieces) == DATA[100 : 100 + (2 << 20)]
        assert [pos for pos, _ in sink.pieces] == list(
            np.cumsum([0] + [len(p) for _, p in sink.pieces[:-1]])
        )
        assert bytes(crc) == DATA[100 + (2 << 20) : 100 + want]

    _run(scheme, tmp_path, test)
    assert received == [(2 << 20) + 4]


def _halves() -> tuple[Any, np.ndarray, np.ndarray]:
    """A scatter of a (512, 1024) float32 inner chunk into its left and right halves."""
    from cloudckpt.handlers.pytree.scatter import Scatter

    left = np.full((512, 512), -1.0, np.float32)
    right = np.full((512, 512), -1.0, np.float32)
    sink = Scatter(
        (512, 1024),
        np.dtype(np.float32),
        [(left, ((0, 512), (0, 512))), (right, ((0, 512), (512, 1024)))],
    )
    return sink, left, right


def test_an_inner_chunk_cut_between_two_arrays_is_scattered_as_received(
    tmp_path: Path, received: list[int], placement: str
) -> None:
    import crc32c

    values = np.frombuffer(DATA[: 2 << 20], np.float32).reshape(512, 1024)

    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        sink, left, right = _halves()
        (crc,) = _buffers(4)
        assert await _get(session, f"{base}/honour", 0, [sink, crc]) == (2 << 20) + 4
        await sink.settled()
        np.testing.assert_array_equal(left, values[:, :512])
        np.testing.assert_array_equal(right, values[:, 512:])
        assert sink.written == 2 << 20 and sink.crc == crc32c.crc32c(DATA[: 2 << 20])
        assert bytes(crc) == DATA[2 << 20 : (2 << 20) + 4]

    _run("http", tmp_path, test)
    assert received == [(2 << 20) + 4]


def test_pieces_placed_by_a_scatter_are_handed_back_and_carry_the_next_body(
    tmp_path: Path, received: list[int], monkeypatch: pytest.MonkeyPatch, placement: str
) -> None:
    """A scattered body's piece memory is reused once placed, not new memory per piece."""
    from cloudckpt.storage import _receive

    pieces = _receive._Pieces(_receive.KEEP_PIECES)
    monkeypatch.setattr(_receive, "_pieces", pieces)
    taken: list[int] = []  # the id of each piece buffer handed out
    take = pieces.take
    monkeypatch.setattr(pieces, "take", lambda: taken.append(id(p := take())) or p)

    async def halves(session: aiohttp.ClientSession, url: str, offset: int) -> np.ndarray:
        sink, left, right = _halves()
        assert await _get(session, url, offset, [sink]) == 2 << 20
        await sink.settled()
        return np.concatenate([left, right], axis=1)

    def expected(offset: int) -> np.ndarray:
        return np.frombuffer(DATA[offset : offset + (2 << 20)], np.float32).reshape(512, 1024)

    async def test(server: Server, base: str, session: aiohttp.ClientSession) -> None:
        np.testing.assert_array_equal(await halves(session, f"{base}/honour", 0), expected(0))
        first = set(taken)  # a piece placed before the next is taken is taken again
        assert first and pieces.kept() == len(first)  # every piece came back once placed
        taken.clear()
        np.testing.assert_array_equal(await halves(session, f"{base}/honour", 4), expected(4))
        # The second body starts in a piece of the first's; with placing threads a second
        # piece may be new (the first not placed yet when it is taken): never more than
        # the two a body is received in.
        assert taken and taken[0] in first
        assert len(first | set(taken)) <= 2 and pieces.kept() == len(first | set(taken))
        if placement == "inline":  # each piece placed before the next is received
            assert len(first) == 1 and set(taken) == first

    _run("http", tmp_path, test)
    assert received == [2 << 20, 2 << 20]


def test_pieces_kept_for_reuse_are_bounded() -> None:
    from cloudckpt.storage import _receive

    pieces = _receive._Pieces(2)
    held = [pieces.take() for _ in range(3)]
    assert len({id(p) for p in held}) == 3 and all(p.nbytes == _receive.PIECE_BYTES for p in held)
    for p in held:
        pieces.give(p)
    assert pieces.kept() == 2  # the third is left to the garbage collector
    assert id(pieces.take()) in {id(p) for p in held[:2]}
