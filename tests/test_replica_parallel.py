"""Replica-parallel save: replicated bytes are written by all their replicas, in parts.

Two and four processes joined by jax.distributed save a fully replicated state
and a mixed one (sharded, partly and fully replicated leaves) to S3
(SeaweedFS), with ``replica_parallel`` on and off. Each process talks to the
server through its own proxy, which counts the bytes of every data object it
PUTs, so the per-process tables are measured at the storage layer. The
checkpoints are then restored on other topologies (one process; two processes
with another mesh) and compared bit for bit. Unit tests at the end drive the
planner's split and assignment rules directly.
"""

from __future__ import annotations

import math
import threading
import urllib.parse
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread
from cloudckpt.format.layout import full_index, index_shape
from cloudckpt.format.pytree import PytreeDocument, ZarrStorage, read_pytree
from cloudckpt.handlers.pytree import layout
from cloudckpt.testing.faultproxy import FaultProxy
from cloudckpt.testing.servers import LocalServers

from . import mp_replica_worker as worker
from .helpers import BUCKET, unique
from .multiproc import finish, launch, tail

BALANCE = 1.1
# Starting 2 or 4 jax processes and saving four ~30 MiB states on a small shared
# machine: generous, never a measure of speed.
pytestmark = pytest.mark.timeout(900)
VARIANTS = [("replicated", True), ("replicated", False), ("mixed", True), ("mixed", False)]


@dataclass
class Counter:
    """Bytes of the data objects (zarr chunks, packs) one process PUT through its proxy, by key."""

    puts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes) -> float:
        # Clients percent-encode some key characters (the ``@`` of ``@<attempt>/``).
        path = urllib.parse.unquote(path_qs.split("?", 1)[0])
        if method == "PUT" and ("/c/" in path or "/packs/" in path):
            with self.lock:
                # Per object, not per request: on a loaded machine a slow PUT is
                # hedged (the same bytes to the same key), which is tail
                # tolerance, not a process writing more than its share.
                self.puts[path] = len(body)
        return 0.0

    def under(self, prefix: str) -> int:
        return sum(n for p, n in self.puts.items() if p.startswith(prefix))


@dataclass
class Run:
    processes: int
    urls: dict[tuple[str, bool], str]
    counters: list[Counter]

    def bytes_by_process(self, state: str, on: bool) -> list[int]:
        prefix = "/" + self.urls[(state, on)][len("s3://") :] + "/"
        return [c.under(prefix) for c in self.counters]


def _save(processes: int, devices: int, servers: LocalServers) -> Run:
    base = f"s3://{BUCKET}/{unique(f'rp{processes}')}"
    urls = {(s, on): f"{base}/{s}-{'on' if on else 'off'}" for s, on in VARIANTS}
    counters = [Counter() for _ in range(processes)]
    proxies = [FaultProxy(servers.s3.endpoint, fault_rate=0.0, delay=c).start() for c in counters]
    try:
        workers = finish(
            launch(
                processes,
                devices,
                "save",
                [],
                module="tests.mp_replica_worker",
                endpoints=[p.endpoint for p in proxies],
                saves=[[urls[(s, on)], s, on] for s, on in VARIANTS],
            ),
            timeout=300,
        )
    finally:
        for p in proxies:
            p.stop()
    for w in workers:
        assert w.proc.returncode == 0 and w.result() is not None, tail(w)
    return Run(processes, urls, counters)


@pytest.fixture(scope="module", params=[2, 4], ids=["2x4", "4x2"])
def run(request: pytest.FixtureRequest, servers: LocalServers) -> Run:
    """One save of every variant on 2 processes x 4 devices, or on 4 x 2."""
    processes = request.param
    out = _save(processes, 8 // processes, servers)
    for state, on in VARIANTS:  # the table, for -s and for failure reports
        table = out.bytes_by_process(state, on)
        print(f"{processes}x{8 // processes} {state} replica_parallel={on}: {table}")
    return out


def _objects(loop: LoopThread, url: str) -> dict[str, int]:
    root = cc.StoragePath.from_url(url)

    async def collect() -> dict[str, int]:
        try:
            return {
                i.path[len(root.path) + 1 :]: i.size
                async for i in root.backend.list_prefix(root.path)
            }
        finally:
            await root.backend.aclose()  # its client lives on the test's loop

    return loop.run(collect())


def _pack(key: str) -> str | None:
    """``packs/<writer>.<n>`` of a pack object's key (format 2 puts it under ``@<attempt>/``)."""
    rel = key.split("/", 1)[1] if key.startswith("@") else key
    return rel if rel.startswith("packs/") else None


def _data_objects(objects: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in objects.items() if "/c/" in k or _pack(k)}


def _leaf_keys(loop: LoopThread, url: str) -> dict[str, str]:
    """Leaf name -> its zarr key, from the stored pytree.json (read as restore reads it)."""
    root = cc.StoragePath.from_url(url)

    async def read() -> PytreeDocument:
        try:
            return await read_pytree(root)
        finally:
            await root.backend.aclose()

    document = loop.run(read())
    return {
        leaf.path.strip("[]'"): leaf.storage.key
        for leaf in document.leaves
        if isinstance(leaf.storage, ZarrStorage)
    }


def _ratio(table: list[int]) -> float:
    return max(table) / (sum(table) / len(table))


def test_replicated_state_is_written_evenly_by_every_replica(run: Run, loop: LoopThread) -> None:
    processes = run.processes
    table = run.bytes_by_process("replicated", True)
    assert min(table) > 0 and _ratio(table) <= BALANCE, table
    # Written once: what the processes PUT is exactly what the bucket holds.
    stored = _data_objects(_objects(loop, run.urls[("replicated", True)]))
    assert sum(table) == sum(stored.values())
    # Every large leaf is split into parts (several chunks), and packs come from every process.
    for name, key in _leaf_keys(loop, run.urls[("replicated", True)]).items():
        assert sum(1 for k in stored if k.startswith(key + "/c/")) >= 2, name
    packs = [p for p in map(_pack, stored) if p]
    assert {p.split("/")[1].split(".")[0] for p in packs} == {str(p) for p in range(processes)}


def test_mixed_state_keeps_owners_and_spreads_replicas(run: Run, loop: LoopThread) -> None:
    processes = run.processes
    url = run.urls[("mixed", True)]
    table = run.bytes_by_process("mixed", True)
    assert _ratio(table) <= BALANCE, table
    stored = _data_objects(_objects(loop, url))
    assert sum(table) == sum(stored.values())
    # The sharded leaf "w" (rows over processes): each process wrote exactly its own rows.
    w_key = "/" + url[len("s3://") :] + "/" + _leaf_keys(loop, url)["w"] + "/c/"
    w_bytes = [c.under(w_key) for c in run.counters]
    w_size = math.prod(worker.MIXED["w"][0]) * 4
    assert all(w_size // processes <= n < w_size // processes + 4096 for n in w_bytes), w_bytes


def test_option_off_writes_each_shard_from_its_first_replica(run: Run, loop: LoopThread) -> None:
    processes = run.processes
    replicated = run.bytes_by_process("replicated", False)
    assert replicated[0] > 0 and replicated[1:] == [0] * (processes - 1), replicated
    url = run.urls[("replicated", False)]
    stored = _data_objects(_objects(loop, url))
    assert sum(replicated) == sum(stored.values())
    for name, key in _leaf_keys(loop, url).items():  # one chunk each, as before the option
        assert sum(1 for k in stored if k.startswith(key + "/c/")) == 1, name
    assert all(p.startswith("packs/0.") for p in map(_pack, stored) if p)
    # Mixed: processes other than 0 write only their rows of the sharded leaf.
    mixed = run.bytes_by_process("mixed", False)
    w_size = math.prod(worker.MIXED["w"][0]) * 4
    assert all(w_size // processes <= n < w_size // processes + 4096 for n in mixed[1:]), mixed
    assert _ratio(mixed) > _ratio(run.bytes_by_process("mixed", True))


def _restore_here(url: str, state: str) -> None:
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    values = worker.expected(state)
    target = {
        name: jax.ShapeDtypeStruct(
            v.shape, v.dtype, sharding=NamedSharding(mesh, P("x") if v.ndim else P())
        )
        for name, v in values.items()
    }
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        restored = ckptr.restore(url, args=cc.args.StandardRestore(target))
        untargeted = ckptr.restore(url)
    for name, want in values.items():
        got = np.asarray(restored[name])
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (url, name)
        host = np.asarray(untargeted[name])
        assert host.dtype == want.dtype and host.tobytes() == want.tobytes(), (url, name)


def test_restores_on_one_process_bit_identical(run: Run) -> None:
    for state, on in VARIANTS:
        _restore_here(run.urls[(state, on)], state)


def test_restores_on_two_processes_with_another_mesh(run: Run) -> None:
    restores = [[run.urls[(s, on)], s] for s, on in VARIANTS if on]
    workers = finish(
        launch(2, 2, "restore", [], module="tests.mp_replica_worker", restores=restores),
        timeout=300,
    )
    results = []
    for w in workers:
        assert w.proc.returncode == 0 and w.result() is not None, tail(w)
        results.append(w.result())
    for url, state in restores:
        total = sum(v.nbytes for v in worker.expected(state).values())
        checked = sum(r[url] for r in results)
        assert checked >= total, (url, checked, total)  # every byte, on some device


# ------------------------------------------------------------------------- the rules alone
def _replicated(shape: tuple[int, ...], processes: int) -> list[layout.Shard]:
    nbytes = math.prod(shape) * 4
    return [layout.Shard(full_index(shape), 0, nbytes, tuple(range(processes)))]


@pytest.mark.parametrize(
    ("shape", "count", "want"),
    [
        ((2048, 1024), 4, [(512, 1024)] * 4),  # the largest dimension, evenly
        ((1024, 3000), 4, [(1024, 750)] * 4),
        ((3, 524288), 3, [(3, 196608), (3, 196608), (3, 131072)]),  # 3, 3, 2 units of 64k
        ((4099, 256), 2, [(4099, 128)] * 2),  # a prime dimension: the next one
        ((4099, 4097), 2, [(4099, 4097)]),  # nothing divides: one part
    ],
)
def test_split_shards_into_chunk_aligned_parts(
    shape: tuple[int, ...], count: int, want: list[tuple[int, ...]]
) -> None:
    shards = _replicated(shape, count)
    (parts,) = layout.split_shards(shape, shards, [count])
    assert [index_shape(p) for p in parts] == want
    # The parts tile the shard, and the chunk grid puts a boundary at every part's edge.
    assert sum(math.prod(index_shape(p)) for p in parts) == math.prod(shape)
    chunk = layout.chunk_grid(shape, [layout.Shard(p, 0, 0) for p in parts], 4, 256 << 20)
    for part in parts:
        assert all(a % c == 0 and b % c == 0 for (a, b), c in zip(part, chunk, strict=True))


def test_writer_loads_are_greedy_deterministic_and_respect_replicas() -> None:
    def run() -> tuple[list[list[int]], dict[int, int]]:
        loads = layout.WriterLoads()
        loads.add(0, 100)  # process 0 already holds a sharded leaf
        picks = [
            loads.assign((0, 1, 2, 3), [40, 40, 40, 40]),
            loads.assign((2, 3), [10, 30]),
            loads.assign((0, 1, 2, 3), [25]),
            loads.assign((0, 1, 2, 3), [25]),
        ]
        return picks, dict(loads.loads)

    picks, loads = run()
    assert run() == (picks, loads)
    assert sorted(picks[0]) == [0, 1, 2, 3]  # one part each
    assert picks[1] == [3, 2]  # the larger part to the less loaded (ties: lower index)
    assert picks[2] == [1] and picks[3] == [3]  # the least loaded of all, whoever moved it
    assert loads == {0: 140, 1: 65, 2: 70, 3: 75}
