"""One process of the ``multiprocess`` benchmark, driven over stdin by ``benchmarks/multiprocess.py``.

``python -m benchmarks.mp_bench_worker SPEC_JSON`` with SPEC: process_id,
num_processes, devices (per process), port, size_mib, barrier_s. With more
than one process it joins the others through ``jax.distributed`` (gloo CPU
collectives) on 127.0.0.1. Every topology builds the same global 8-device
``("data", "model")`` mesh and the same tree (``tree.model_specs``), whose
values depend only on the leaf and the shard's position, so one process and
two processes hold bit-identical global arrays.

It prints ``READY <json>`` once the tree is built, then reads one JSON
command a line from stdin and answers each with ``RESULT <json>`` (or
``ERROR <json>``, after which it exits):

* ``{"op": "warmup", "id": ..., "url": ...}``: save and restore a 1 MiB tree
  (client start-up is not timed);
* ``{"op": "run", "id": ..., "url": ..., "check": bool}``: the timed save and
  restore. Each phase runs from a barrier before to a barrier after (the
  distributed client's ``wait_at_barrier``; none with one process), so a
  process's time covers the slowest process's part. The restore targets the
  saved shardings; its values are compared with the saved ones, a few per
  shard, or every byte with ``check``;
* ``{"op": "bytes", "id": ..., "url": ..., "replica_parallel": bool,
  "share_reads": bool}``: one save with that handler option, then one restore
  of it (onto the saved shardings) with that ``StandardRestore`` option, its
  values compared a few per shard; answers the data bytes this process wrote
  and read: with ``count_bytes`` in SPEC, the body bytes of data objects
  (zarr chunks and packs, not the JSON documents) through byte-counting
  proxies of its own in front of both servers, every channel included;
  otherwise tensorstore's ``/tensorstore/kvstore/<driver>/bytes_written`` and
  ``bytes_read`` counters, which miss the direct S3 writes and chunk reads;
* ``{"op": "quit"}``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from typing import Any

import numpy as np

from cloudckpt.testing.jobs import leave_job


def emit(kind: str, payload: dict[str, Any]) -> None:
    print(kind, json.dumps(payload, default=str), flush=True)


def _shard_values(seed: int, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Random float32 values of one shard, a function of the leaf and the shard's place only."""
    bounds = [s.indices(n) for s, n in zip(index, shape, strict=True)]
    local = tuple(len(range(*b)) for b in bounds)
    rng = np.random.default_rng([seed, *(b[0] for b in bounds)])
    return rng.random(local, dtype=np.float32)


def build_state(size_mib: float, mesh: Any) -> dict[str, Any]:
    """The ``tree.model_specs`` tree, with topology-independent values."""
    import jax
    from jax.sharding import NamedSharding

    from benchmarks import tree

    state: dict[str, Any] = {}
    for i, leaf in enumerate(tree.model_specs(size_mib)):
        if leaf.spec is None:
            value: Any = np.asarray(i, np.int64) if "count" in leaf.path[-1] else np.float32(3e-4)
        else:
            cache: dict[tuple[Any, ...], np.ndarray] = {}

            def shard(
                index: tuple[slice, ...], seed: int = i, shape: Any = leaf.shape, cache: Any = cache
            ) -> np.ndarray:
                key = tuple((s.start, s.stop) for s in index)
                if key not in cache:  # the replicas of a shard on this process share one draw
                    cache[key] = _shard_values(seed, index, shape)
                return cache[key]

            value = jax.make_array_from_callback(leaf.shape, NamedSharding(mesh, leaf.spec), shard)
        node = state
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = value
    return state


def _positions(n: int) -> np.ndarray:
    return np.unique(np.array([0, 1, n // 3, n // 2, (2 * n) // 3, n - 2, n - 1]).clip(0, n - 1))


def compare(saved: Any, restored: Any, full: bool) -> tuple[bool, int, str | None]:
    """Compares every addressable shard (a few elements each, or all with ``full``) bit-exactly."""
    import jax

    checked = 0
    pairs = zip(
        jax.tree_util.tree_leaves_with_path(saved),
        jax.tree_util.tree_leaves(restored),
        strict=True,
    )
    for (path, want), got in pairs:
        name = jax.tree_util.keystr(path)
        if not isinstance(want, jax.Array):
            if not np.array_equal(np.asarray(want), np.asarray(got)):
                return False, checked, f"{name}: {got!r} != {want!r}"
            continue
        if got.sharding != want.sharding:
            return False, checked, f"{name}: restored with {got.sharding}, saved {want.sharding}"
        theirs = {s.device: s for s in got.addressable_shards}
        for mine in want.addressable_shards:
            other = theirs[mine.device]
            if other.index != mine.index:
                return False, checked, f"{name}: shard on {mine.device} is {other.index}"
            a = np.asarray(mine.data).reshape(-1).view(np.uint32)
            b = np.asarray(other.data).reshape(-1).view(np.uint32)
            if not full:
                where = _positions(a.size)
                a, b = a[where], b[where]
            if a.shape != b.shape or not np.array_equal(a, b):
                return False, checked, f"{name}: values differ in shard {mine.index}"
            checked += a.nbytes
    return True, checked, None


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        import jax

        import cloudckpt as cc
        from benchmarks import tree

        self.cc = cc
        self.jax = jax
        self.process_id = jax.process_index()
        self.timeout_ms = int(spec["barrier_s"] * 1000)
        if jax.process_count() > 1:
            from jax._src import distributed

            self.client = distributed.global_state.client
        else:
            self.client = None
        self.mesh = tree.make_mesh()
        start = time.perf_counter()
        self.state = build_state(spec["size_mib"], self.mesh)
        jax.block_until_ready(self.state)
        self.build_s = time.perf_counter() - start
        self.abstract = tree.abstract_target(self.state)
        self.small = build_state(1, self.mesh)
        self.ckpt = cc.Checkpointer(
            cc.CompositeCheckpointHandler(),
            multiprocessing_options=cc.MultiprocessingOptions(barrier_timeout_s=spec["barrier_s"]),
        )
        local = sum(
            s.data.nbytes
            for x in tree.jax_leaves(self.state)
            for s in x.addressable_shards
            if s.replica_id == 0
        )
        self.ready = {
            "process": self.process_id,
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "bytes": tree.tree_nbytes(self.state),
            "leaves": len(tree.all_leaves(self.state)),
            "arrays": len(tree.jax_leaves(self.state)),
            "mesh": dict(self.mesh.shape),
            "replica0_bytes_here": local,
            "build_s": round(self.build_s, 3),
        }

    def barrier(self, name: str) -> None:
        if self.client is not None:
            self.client.wait_at_barrier(f"mpbench/{name}", self.timeout_ms)

    def phase(self, name: str, fn: Any) -> tuple[float, Any]:
        """Seconds from a barrier before ``fn`` to a barrier after it, on this process."""
        self.barrier(f"{name}/start")
        start = time.perf_counter()
        out = fn()
        self.barrier(f"{name}/end")
        return time.perf_counter() - start, out

    def _save(self, url: str, state: Any) -> None:
        self.ckpt.save(url, self.cc.args.Composite(state=self.cc.args.StandardSave(state)))

    def _restore(self, url: str, target: Any) -> Any:
        args = self.cc.args.Composite(state=self.cc.args.StandardRestore(target))
        return self.jax.block_until_ready(self.ckpt.restore(url, args)["state"])

    def bytes_moved(self, cmd: dict[str, Any]) -> dict[str, Any]:
        import tensorstore as ts

        def counted(which: str) -> int:
            if _PROXIES:
                totals = [p.totals(_is_data) for p in _PROXIES]
                return sum(t[0] if which == "bytes_written" else t[1] for t in totals)
            metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/")
            return sum(
                v.get("value", 0)
                for m in metrics
                if m["name"].endswith(f"/{which}")
                for v in m["values"]
            )

        handler = self.cc.StandardCheckpointHandler(replica_parallel=cmd["replica_parallel"])
        options = self.cc.MultiprocessingOptions(barrier_timeout_s=self.timeout_ms / 1000)
        restore = self.cc.args.StandardRestore(self.abstract, share_reads=cmd["share_reads"])
        with self.cc.Checkpointer(handler, multiprocessing_options=options) as ckpt:
            before = counted("bytes_written")
            save_s, _ = self.phase(
                f"{cmd['id']}/save",
                lambda: ckpt.save(cmd["url"], self.cc.args.StandardSave(self.state)),
            )
            written = counted("bytes_written") - before
            before = counted("bytes_read")
            restore_s, restored = self.phase(
                f"{cmd['id']}/restore",
                lambda: self.jax.block_until_ready(ckpt.restore(cmd["url"], restore)),
            )
            read = counted("bytes_read") - before
        ok, _, why = compare(self.state, restored, full=False)
        del restored
        gc.collect()
        return {
            "bytes_written": written,
            "bytes_read": read,
            "save_s": save_s,
            "restore_s": restore_s,
            "verified": ok,
            "mismatch": why,
        }

    def warmup(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from benchmarks import tree

        url = cmd["url"]
        save_s, _ = self.phase(f"{cmd['id']}/save", lambda: self._save(url, self.small))
        restore_s, restored = self.phase(
            f"{cmd['id']}/restore", lambda: self._restore(url, tree.abstract_target(self.small))
        )
        ok, _, why = compare(self.small, restored, full=True)
        return {"save_s": save_s, "restore_s": restore_s, "verified": ok, "mismatch": why}

    def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        url = cmd["url"]
        save_s, _ = self.phase(f"{cmd['id']}/save", lambda: self._save(url, self.state))
        restore_s, restored = self.phase(
            f"{cmd['id']}/restore", lambda: self._restore(url, self.abstract)
        )
        ok, checked, why = compare(self.state, restored, full=bool(cmd.get("check")))
        del restored
        gc.collect()
        return {
            "save_s": save_s,
            "restore_s": restore_s,
            "verified": ok,
            "full_check": bool(cmd.get("check")),
            "checked_bytes": checked,
            "mismatch": why,
        }


#: This process's byte-counting proxies (``count_bytes``), one per server.
_PROXIES: list[Any] = []


def _is_data(where: str) -> bool:
    """Whether a request target (path and query, unquoted) addresses a data object.

    Array chunks and packs (``.../arrays/<leaf>/c/...``, ``.../packs/...``;
    GCS uploads name the object in the query), not ``zarr.json``, the other
    documents or listings.
    """
    if "zarr.json" in where or "prefix=" in where or "list-type=" in where:
        return False
    return "/arrays/" in where or "/packs/" in where


def _count_through_proxies() -> None:
    """Points this process's clients at byte-counting proxies in front of both servers."""
    from cloudckpt.testing.faultproxy import ByteCountingProxy

    s3 = ByteCountingProxy(os.environ["AWS_ENDPOINT_URL"], "s3").start()
    gcs = ByteCountingProxy(os.environ["STORAGE_EMULATOR_HOST"], "gcs").start()
    _PROXIES.extend([s3, gcs])
    os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
    os.environ["STORAGE_EMULATOR_HOST"] = gcs.endpoint
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = gcs.endpoint


def main(spec: dict[str, Any]) -> None:
    if spec.get("count_bytes"):
        _count_through_proxies()
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", spec["devices"])
    if spec["num_processes"] > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{spec['port']}",
            num_processes=spec["num_processes"],
            process_id=spec["process_id"],
            heartbeat_timeout_seconds=30,
            initialization_timeout=120,
        )
    try:
        worker = Worker(spec)
        emit("READY", worker.ready)
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            ops = {"warmup": worker.warmup, "run": worker.run, "bytes": worker.bytes_moved}
            result = ops[cmd["op"]](cmd)
            emit("RESULT", {"process": worker.process_id, "id": cmd["id"], **result})
        worker.ckpt.close()
    except BaseException as exc:  # report anything, then leave at once
        emit("ERROR", {"process": spec["process_id"], "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
        os._exit(1)  # peers may wait in a barrier: skip jax.distributed's shutdown
    if spec["num_processes"] > 1:
        leave_job()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
