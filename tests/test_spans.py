"""A chunk object larger than ``RUN_BYTES`` is read in spans, all at once, each byte once.

A single stream of S3 or GCS carries a fraction of a host's network, so the
direct chunk reader (cloudckpt/handlers/pytree/chunks.py) splits a whole
object between inner chunks into ranged reads of at most ``RUN_BYTES`` and
issues them together. Here ``RUN_BYTES`` is made small so that the test
checkpoint's objects (16 inner chunks of 4 KiB each) are split: the ranges a
proxy sees tile each object once and were all requested before the first was
answered; values round-trip onto other meshes; a flipped byte in any span and
a cut object are refused as with one read (an object laid out in another
order: tests/test_direct_chunks_gcs.py). Pack objects, read by runs of
entries, are cut the same way.
The relay that stands for a capped stream in the ``capped_streams`` benchmark
(cloudckpt/testing/paceproxy.py) is checked too: bytes intact, S3 signatures
still valid, and no connection faster than its rate.
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.handlers.pytree import chunks
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.storage.path import StoragePath
from cloudckpt.testing.faultproxy import FaultProxy
from cloudckpt.testing.paceproxy import PacedRelay
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique
from .test_direct_chunks import SAVED, VALUES, _mesh, _rewrite, _url
from .test_direct_chunks_gcs import INNER, _restore_all, _save_all

PIECE = INNER + 4  # an inner chunk and its crc32c
#: Five inner chunks per span: a 16-chunk object is read in spans of 4.
SPAN = 5 * PIECE


#: A chunk object of the f32 array: 16 inner chunks, then the index and its crc32c.
SIZE = 16 * PIECE + 16 * 16 + 4


def _f32_objects(url: str) -> list[str]:
    """The chunk objects of the f32 array (the only ones of ``SIZE`` bytes)."""

    async def sized() -> list[str]:
        root = StoragePath.from_url(url)
        found = [o async for o in root.backend.list_prefix(root.path + "/")]
        return sorted(o.path for o in found if o.size == SIZE and "/c/" in o.path)

    return asyncio.run(sized())


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunks, "RUN_BYTES", SPAN)


@pytest.mark.parametrize(
    ("count", "piece", "limit", "expected"),
    [
        (16, 10, 50, [(0, 4), (4, 8), (8, 12), (12, 16)]),  # 5 fit: 4 even spans of 4
        (7, 10, 30, [(0, 2), (2, 4), (4, 7)]),  # 3 fit: 3 spans, not 3 + 3 + 1
        (3, 10, 1000, [(0, 3)]),  # all in one
        (3, 10, 5, [(0, 1), (1, 2), (2, 3)]),  # a piece over the limit: one per span
        (1, 10, 10, [(0, 1)]),
    ],
)
def test_spans_are_even_and_within_the_limit(
    count: int, piece: int, limit: int, expected: list[tuple[int, int]]
) -> None:
    got = chunks._spans(count, piece, limit)
    assert got == expected
    assert [a for a, _ in got[1:]] == [b for _, b in got[:-1]]  # back to back, whole
    assert all((b - a) * piece <= max(limit, piece) for a, b in got)


class _HeldRanges:
    """A proxy ``delay`` hook: holds every GET ``picks`` chooses ``HOLD_S``, logging its range.

    Requests made together arrive within ``HOLD_S`` of each other; one made
    after another was answered arrives at least ``HOLD_S`` later.
    """

    HOLD_S = 1.0

    def __init__(self, picks: Callable[[str], bool]) -> None:
        self._picks = picks
        self._lock = threading.Lock()
        self.log: list[tuple[str, int, int, float]] = []  # path, start, end, arrival

    def __call__(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> float:
        path = unquote(path.split("?")[0])
        if method != "GET" or not self._picks(path):
            return 0.0
        first, last = headers.get("Range", "").removeprefix("bytes=").split("-")
        with self._lock:
            self.log.append((path, int(first), int(last) + 1, time.monotonic()))
        return self.HOLD_S

    def ranges(self, key: str) -> list[tuple[int, int]]:
        """The ranges of the GETs of ``key`` (a path ending), by start."""
        return sorted((a, b) for path, a, b, _ in self.log if path.endswith(key))

    def together(self, key: str) -> bool:
        """Whether every GET of ``key`` was requested before the first was answered."""
        arrivals = [at for path, _, _, at in self.log if path.endswith(key)]
        return max(arrivals) - min(arrivals) < self.HOLD_S


@pytest.mark.usefixtures("spans")
def test_a_large_object_is_read_in_spans_at_once_each_byte_once(
    servers: LocalServers, tmp_path: Any
) -> None:
    url = _url("gs", tmp_path)
    with _save_all(url):
        objects = _f32_objects(url)
    assert len(objects) == 8
    hold = _HeldRanges(lambda path: "/c/" in path)  # every chunk object's answer held
    with FaultProxy(servers.gcs.endpoint, fault_rate=0.0, flavor="gcs", delay=hold) as proxy:
        options = {
            "endpoint_url": proxy.endpoint,
            "deadlines": Deadlines(hedge=False, cut_min_s=60),
        }
        sharding = NamedSharding(_mesh(SAVED), P("data", "model"))
        target = {"f32": jax.ShapeDtypeStruct((512, 256), np.float32, sharding=sharding)}
        with cc.Checkpointer(cc.StandardCheckpointHandler(), storage_options=options) as ckptr:
            out = ckptr.restore(url, args=cc.args.StandardRestore(target))
    np.testing.assert_array_equal(np.asarray(out["f32"]), VALUES["f32"])
    for obj in objects:
        key = "/o/" + obj.split("/", 1)[1]
        assert hold.ranges(key) == [
            (0, 4 * PIECE),
            (4 * PIECE, 8 * PIECE),
            (8 * PIECE, 12 * PIECE),
            (12 * PIECE, SIZE),  # the last span carries the index
        ], obj
        # All four requested before the first was answered (each answer was held).
        assert hold.together(key), obj


@pytest.mark.usefixtures("spans")
@pytest.mark.parametrize("backend", ["file", "gs"])
def test_spans_round_trip_onto_other_meshes(
    backend: str, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url(backend, tmp_path)
    with _save_all(url) as ckptr:
        for sharding in (
            NamedSharding(_mesh(SAVED), P("data", "model")),  # whole objects, in spans
            NamedSharding(_mesh((2, 4)), P("data", "model")),  # cut inner chunks
            NamedSharding(_mesh(SAVED), P()),  # every object whole, on every device
        ):
            _restore_all(ckptr, url, sharding)


@pytest.mark.usefixtures("spans")
@pytest.mark.parametrize("at", [0, 5 * PIECE + 17, 11 * PIECE - 1, -9], ids=str)
def test_a_flipped_byte_in_any_span_is_refused(
    at: int, servers: LocalServers, tmp_path: Any
) -> None:
    url = _url("gs", tmp_path)
    with _save_all(url) as ckptr:
        victim = _f32_objects(url)[2]

        def flip(data: bytearray) -> bytes:
            data[at] ^= 0x08
            return bytes(data)

        _rewrite(url, victim, flip)
        with pytest.raises(cc.CorruptCheckpointError, match="checksum mismatch") as info:
            _restore_all(ckptr, url, NamedSharding(_mesh(SAVED), P("data", "model")))
        assert victim.split("/", 1)[1] in str(info.value)


@pytest.mark.usefixtures("spans")
def test_a_cut_object_read_in_spans_is_refused(servers: LocalServers, tmp_path: Any) -> None:
    url = _url("gs", tmp_path)
    with _save_all(url) as ckptr:
        victim = _f32_objects(url)[1]
        _rewrite(url, victim, lambda data: bytes(data[: 6 * PIECE]))
        with pytest.raises(cc.CorruptCheckpointError) as info:
            _restore_all(ckptr, url, NamedSharding(_mesh(SAVED), P("data", "model")))
        assert victim.split("/", 1)[1] in str(info.value)


def test_a_large_pack_is_read_in_spans_at_once_each_byte_once(
    servers: LocalServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packed leaves too: runs of entries are cut at ``RUN_BYTES`` and read together.

    On S3, where tensorstore (which reads packs) takes its endpoint from the
    spec, so that a proxy in front of the server sees every ranged GET.
    """
    entry = 256 * 4 + 4  # a 256-float leaf and its crc32c
    monkeypatch.setattr(chunks, "RUN_BYTES", 10 * entry)
    url = f"s3://{BUCKET}/{unique('packspans')}"
    tree = {f"b{i:02d}": np.arange(256, dtype=np.float32) + i for i in range(40)}
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        ckptr.save(url, args=cc.args.StandardSave(tree))
    hold = _HeldRanges(lambda path: "/packs/" in path)
    with FaultProxy(servers.s3.endpoint, fault_rate=0.0, flavor="s3", delay=hold) as proxy:
        options = {
            "endpoint_url": proxy.endpoint,
            "deadlines": Deadlines(hedge=False, cut_min_s=60),
        }
        with cc.Checkpointer(cc.StandardCheckpointHandler(), storage_options=options) as ckptr:
            out = ckptr.restore(url)
    for k, v in tree.items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)
    packs = {path for path, _, _, _ in hold.log}
    assert packs and len(packs) == 1  # one pack
    (pack,) = packs
    assert hold.ranges(pack) == [(k * 10 * entry, (k + 1) * 10 * entry) for k in range(4)]
    assert hold.together(pack)  # all requested before the first answer


# ----------------------------------------------------------------------------- the relay
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_restore_through_the_paced_relay_is_exact(
    kind: str, servers: LocalServers, tmp_path: Any
) -> None:
    """Bytes pass intact, and S3 signatures (made for the relay's port) verify upstream."""
    scheme = "s3" if kind == "s3" else "gs"
    url = f"{scheme}://{BUCKET}/{unique('paced')}"
    upstream = servers.s3.endpoint if kind == "s3" else servers.gcs.endpoint
    sharding = NamedSharding(_mesh(SAVED), P("data", "model"))
    tree = {k: jax.device_put(v, sharding) for k, v in VALUES.items()}
    # Chunk objects only, read by cloudckpt's own clients (tensorstore, which reads packs,
    # takes its GCS endpoint from the environment only; so does it write arrays).
    handler = cc.StandardCheckpointHandler(pack_below_bytes=1024)
    if kind == "gcs":
        with cc.Checkpointer(handler) as ckptr:
            ckptr.save(url, args=cc.args.StandardSave(tree))
    with PacedRelay(upstream, rate=50e6) as relay:
        options = {"endpoint_url": relay.endpoint}
        with cc.Checkpointer(handler, storage_options=options) as ckptr:
            if kind == "s3":  # signed PUTs through the relay
                ckptr.save(url, args=cc.args.StandardSave(tree))
            target = {
                k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                for k, v in VALUES.items()
            }
            out = ckptr.restore(url, args=cc.args.StandardRestore(target))
    for k, v in VALUES.items():
        np.testing.assert_array_equal(np.asarray(out[k]), v, err_msg=k)


def test_the_relay_holds_a_download_to_its_rate(servers: LocalServers) -> None:
    """2 MiB at 4 MB/s cannot arrive in less than 0.5 s, less the first read's 64 KiB."""
    bucket_url = f"{servers.gcs.endpoint}/upload/storage/v1/b/{BUCKET}/o"
    name = unique("pace")
    body = np.random.default_rng(5).bytes(2 << 20)
    request = urllib.request.Request(
        f"{bucket_url}?uploadType=media&name={name}", data=body, method="POST"
    )
    urllib.request.urlopen(request, timeout=30).close()
    with PacedRelay(servers.gcs.endpoint, rate=4e6) as relay:
        start = time.monotonic()
        with urllib.request.urlopen(
            f"{relay.endpoint}/storage/v1/b/{BUCKET}/o/{name}?alt=media", timeout=30
        ) as answer:
            got = answer.read()
        took = time.monotonic() - start
    assert got == body
    assert took >= (len(body) - 64 * 1024) / 4e6


def test_the_relay_refuses_a_bad_upstream_or_rate() -> None:
    with pytest.raises(ValueError, match="http://host:port"):
        PacedRelay("https://storage.googleapis.com", rate=1e6)
    with pytest.raises(ValueError, match="positive"):
        PacedRelay("http://127.0.0.1:9", rate=0)
