"""Where a restore's time goes, beside the raw channel and Orbax (issue 18's measurement).

Per backend, a fresh random tree of ``--phases-size-mib`` MiB (default 1 GiB;
4096 for the large form) is saved once by cloudckpt (and once by Orbax where
it has a path) and dropped; then, per repetition (``--phases-reps``, default
5), all under the same machine noise:

* the restore replayed step by step with the library's own read path
  (``cloudckpt.handlers.pytree.read.Reader``), each step timed alone:
  ``pytree.json`` read and parse, packed reads, tensorstore opens, the region
  reads of every array (all concurrently, as a restore does: requests,
  crc32c and the copies into host buffers), and the assembly of the
  ``jax.Array`` leaves from those host buffers (``make_array_from_callback``:
  host-to-device transfer, a memcpy on CPU unless the buffer is aliased);
* the handler's ``restore`` alone, then the yardstick (``np.fromfile`` of
  the checkpoint's own files on file, the raw concurrent GET of objects of
  the checkpoint's sizes on object stores, ``raw.py``), then the whole
  ``Checkpointer.restore`` and the same restore onto a 2x4 mesh instead of
  the saved 4x2 (regions cut through chunk objects), and Orbax's restore of
  the same tree onto both meshes, the two libraries in alternating order;
* one crc32c pass and one memcpy over the restored bytes (what a checksum
  and an extra host copy cost here).

Each timed restore (ours and Orbax's, both meshes) also records the CPU the
whole process spent in it (user and system seconds, ``getrusage``) and its
minor page faults. On these VMs, new memory is the cost that varies most from
run to run, and it is paid in the kernel: a run much slower than its
neighbours whose user time is level and whose system time doubled lost its
time there (mapping the restore's new memory), not in the library's code.

File reads see the same page cache on both sides of each comparison:
``--file-cache warm`` (default) reads the files once, untimed, before each
timed read; ``cold`` evicts them first (``posix_fadvise(DONTNEED)``). Every
repetition's ratios are printed and kept, not only the medians.

Which library's pair of restores comes first after the yardstick alternates
by repetition (cloudckpt's on even ones, Orbax's on odd ones; ``orbax_first``
records it). Position matters on these VMs: measured at 4 GiB on GCS (nine
repetitions), the restore timed right after the raw GET took 3.8-8.5 s where
the handler restore, timed after the replay, took 3.2-4.3 s; a probe
alternating the two showed the same slowdown on both after the raw channel's
bodies were freed, with more system time: the first restore after them pays
most for new memory. Always timing one library first would hand that cost to
it in every repetition; alternating gives each library both positions. (In
the first runs alternating, at 1 and 4 GiB, neither side was consistently
faster in either position.)

Requests are counted from tensorstore's own metrics and from the direct
chunk reader during a restore, beside the checkpoint's object count, which
is what the raw channel issues. A fresh process per backend measures peak RSS
of a restore above its baseline (``python -m benchmarks.phases``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks import tree
from benchmarks.common import Context, median, ratio, scenario
from benchmarks.ops import CloudCkpt, Orbax
from benchmarks.targets import Target, list_objects, remove
from cloudckpt.storage import BackendCache

ITEM = "state"
PHASES = ("document", "packs", "open", "reads", "assemble")


# ------------------------------------------------------------------------- the replay
async def _replay(url: str, target: Any) -> tuple[dict[str, float], list[np.ndarray], Any]:
    """The handler's restore of ``target``, one phase at a time.

    Returns the phase times, the host pieces, and the direct chunk reader's
    request count (``requests``, ``bytes``).
    """
    import jax

    from cloudckpt.format import layout
    from cloudckpt.format import pytree as document_format
    from cloudckpt.handlers.pytree import StandardCheckpointHandler
    from cloudckpt.handlers.pytree.budget import ByteBudget
    from cloudckpt.handlers.pytree.match import match_targets
    from cloudckpt.handlers.pytree.read import Reader
    from cloudckpt.handlers.pytree.tree import flatten
    from cloudckpt.storage.path import StoragePath

    times: dict[str, float] = {}
    handler = StandardCheckpointHandler()
    item = StoragePath.from_url(f"{url}/{ITEM}", cache=_BACKENDS)

    start = time.perf_counter()
    document = await handler._read_document(item)
    times["document"] = time.perf_counter() - start
    saved = document.leaves
    targets, _ = flatten(target)
    plan = match_targets(
        item, targets, saved, {leaf.path: i for i, leaf in enumerate(saved)}, strict=True
    )
    reader = Reader(item, saved, ByteBudget(handler.max_inflight_bytes))
    wanted = [(i, t, reader.regions_for(i, t)) for i, t in plan.reads]

    start = time.perf_counter()
    await reader.prefetch_packed((i, regions) for i, _, regions in wanted)
    times["packs"] = time.perf_counter() - start

    arrays = [w for w in wanted if isinstance(saved[w[0]].storage, document_format.ZarrStorage)]
    start = time.perf_counter()
    await asyncio.gather(*(reader._open(i) for i, _, _ in arrays))
    times["open"] = time.perf_counter() - start

    # Each leaf's regions together, as the handler reads them (one tensorstore batch).
    jobs = [(i, index) for i, _, regions in wanted for index in regions]
    start = time.perf_counter()
    per_leaf = await asyncio.gather(*(reader.regions(i, regions) for i, _, regions in wanted))
    times["reads"] = time.perf_counter() - start
    pieces = [piece for leaf_pieces in per_leaf for piece in leaf_pieces]

    by_leaf: dict[int, dict[Any, np.ndarray]] = {}
    for (i, index), piece in zip(jobs, pieces, strict=True):
        by_leaf.setdefault(i, {})[index] = piece
    start = time.perf_counter()
    built = []
    for i, t, _ in wanted:
        sharding = getattr(t, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding):
            continue
        shape, got = saved[i].shape, by_leaf[i]
        built.append(
            jax.make_array_from_callback(
                shape,
                sharding,
                lambda idx, got=got, shape=shape: got[layout.normalize_index(idx, shape)],
            )
        )
    jax.block_until_ready(built)
    times["assemble"] = time.perf_counter() - start
    del built
    return times, list(pieces), dict(reader.direct_reads)


#: The backends this probe opens, closed on its loop at the end.
_BACKENDS = BackendCache()


def _handler_restore(loop: asyncio.AbstractEventLoop, url: str, target: Any) -> float:
    import cloudckpt as cc
    from cloudckpt.storage.path import StoragePath

    async def go() -> float:
        handler = cc.StandardCheckpointHandler()
        start = time.perf_counter()
        out = await handler.restore(
            StoragePath.from_url(f"{url}/{ITEM}", cache=_BACKENDS), cc.args.StandardRestore(target)
        )
        import jax

        jax.block_until_ready(out)
        elapsed = time.perf_counter() - start
        del out
        return elapsed

    return loop.run_until_complete(go())


async def _close_clients() -> None:
    await _BACKENDS.aclose()


def _release() -> None:
    """Frees what the last side left: garbage, then the C heap's free pages (glibc).

    Restored arrays of a few MiB each come from the C heap, which keeps freed
    pages mapped: without handing them back, each side of a 4 GiB comparison
    would start on top of the last one's memory instead of beside it.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# ------------------------------------------------------------------------- yardsticks
def _fromfile(paths: list[str], keep: bool = True) -> float:
    """``np.fromfile`` of every file, 8 at a time (one per device).

    ``keep``: the arrays stay alive until every file is read, as a restore's do.
    Freed at once (``keep=False``, the yardstick before issue 18's second pass),
    they hand their memory to the next read: no page faults, no pressure on the
    page cache. Both are reported.
    """
    with ThreadPoolExecutor(8) as pool:
        start = time.perf_counter()
        if keep:
            arrays = list(pool.map(lambda p: np.fromfile(p, np.uint8), paths))
        else:
            sizes = list(pool.map(lambda p: np.fromfile(p, np.uint8).nbytes, paths))
        elapsed = time.perf_counter() - start
    got = sum(a.nbytes for a in arrays) if keep else sum(sizes)
    if keep:
        del arrays
    if got != sum(os.path.getsize(p) for p in paths):
        raise RuntimeError("np.fromfile read fewer bytes than the files hold")
    return elapsed


def _crc_and_copy(pieces: list[np.ndarray]) -> tuple[float, float]:
    """Seconds of one crc32c pass and of one memcpy into fresh memory, over ``pieces``."""
    import google_crc32c

    views = [np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in pieces]
    for v in views:
        v.flags.writeable = False  # the crc32c extension takes read-only buffers
    start = time.perf_counter()
    for v in views:
        google_crc32c.value(v)
    crc_s = time.perf_counter() - start
    copy_s = 0.0
    for v in views:  # one piece at a time: the yardstick costs one piece of memory
        start = time.perf_counter()
        copy = v.copy()
        copy_s += time.perf_counter() - start
        del copy
    return crc_s, copy_s


def _proc_cpu_s(pid: int | None) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far (None: unknown, or gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_ticks() -> tuple[int, int, int] | None:
    """The machine's CPU ticks so far (Linux ``/proc/stat``): all, idle (with iowait), steal."""
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    steal = values[7] if len(values) > 7 else 0
    return sum(values[:8]), values[3] + values[4], steal


def _server_pid(ctx: Context, target: Target) -> int | None:
    """The local server behind ``target`` (SeaweedFS, fake-gcs-server); None on file."""
    if ctx.servers is None or target.is_file:
        return None
    return getattr(getattr(ctx.servers, target.name, None), "pid", None)


def _ts_counters(driver: str) -> dict[str, int]:
    import tensorstore as ts

    out = {}
    for metric in ts.experimental_collect_matching_metrics(f"/tensorstore/kvstore/{driver}/"):
        name = metric["name"].rsplit("/", 1)[-1]
        if name in ("read", "batch_read", "bytes_read"):
            out[name] = int(metric["values"][0].get("value", 0))
    return out


def _driver(target: Target) -> str:
    return "file" if target.is_file else target.name


# ------------------------------------------------------------------------- peak RSS
def rss_child(url: str, size_mib: float) -> dict[str, Any]:
    """In a fresh process: restore the small leaves (warm-up), reset the peak, restore all."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_platforms", "cpu")
    from benchmarks.memory import _reset_peak, _Sampler, _status

    mesh = tree.make_mesh()
    target = tree.abstract_from_specs(tree.model_specs(size_mib), mesh)
    nbytes = tree.tree_nbytes(target)
    cc = CloudCkpt()
    # Warm up imports and storage clients on the small leaves only: a full warm-up
    # restore would leave freed arenas in the baseline and hide part of the peak.
    small = {"opt": target["opt"], "params": {"bias": target["params"]["bias"]}}
    del_me = cc.restore(url, small)
    del del_me
    gc.collect()
    baseline = _status("VmRSS")
    reset = _reset_peak()
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    restored = cc.restore(url, target)
    restore_s = time.perf_counter() - start
    sampled = sampler.stop()
    peak = max(_status("VmHWM") if reset else 0, sampled)
    del restored
    cc.close()
    return {
        "bytes": nbytes,
        "baseline": baseline,
        "peak": peak,
        "above_baseline": peak - baseline,
        "multiple": ratio(peak - baseline, nbytes),
        "restore_s": restore_s,
    }


def _rss(url: str, size_mib: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.phases", url, str(size_mib)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=900)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"restore RSS probe failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------- the scenario
def _drop_cache(paths: list[str]) -> None:
    """Evicts ``paths`` from the page cache (``posix_fadvise(DONTNEED)``), for cold reads."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _warm_cache(paths: list[str]) -> None:
    """Reads ``paths`` once, untimed, so that both sides find them in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def _files(url: str) -> list[str]:
    return [o.path for o in list_objects(url)]


def run_backend(ctx: Context, target: Target, size_mib: float) -> dict[str, Any]:
    """Saves a fresh random tree of ``size_mib`` MiB, then times restores beside yardsticks.

    Per repetition the restores compared are timed in one stretch after the
    yardstick, under the same conditions: on file, ``np.fromfile`` and each
    restore after the same page-cache preparation (``--file-cache``: warm, all
    read once untimed first; cold, all evicted first); on object stores, the
    raw GET, then the restores. The library timed first alternates. Each
    repetition's ratios are kept, not only the medians.
    """
    import jax
    from jax.sharding import Mesh

    cfg = ctx.config
    reps = cfg.phases_reps
    cc = CloudCkpt()
    peer = Orbax() if cfg.peer and target.orbax_root else None
    url = target.fresh("phases")
    orbax_url = target.fresh_orbax("phases") if peer is not None else None
    keys = (*PHASES, "handler", "restore", "resharded", "raw_get", "fromfile", "fromfile_freed")
    keys = (*keys, "raw_get_kept", "crc32c", "memcpy")
    times: dict[str, list[float]] = {k: [] for k in (*keys, "orbax", "orbax_resharded")}
    requests: dict[str, Any] = {}
    # Per timed restore: the process's user and system CPU seconds, and its minor faults;
    # the local server's CPU seconds, and the shares of the machine's CPU time that were idle
    # and that the hypervisor took (steal), to tell a slow client from a slow server or host.
    cpu: dict[str, dict[str, list[float]]] = {}
    server = _server_pid(ctx, target)
    order: list[bool] = []  # per repetition: whether Orbax's restores were timed first
    specs = tree.model_specs(size_mib)
    abstract = tree.abstract_from_specs(specs, ctx.mesh)
    # The same tree onto another mesh: 2x4 instead of 4x2, so most regions cut chunks.
    other = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    resharded = tree.abstract_from_specs(specs, other)
    cold = target.is_file and cfg.file_cache == "cold"
    stack = contextlib.ExitStack()
    try:
        state = tree.build(specs, ctx.mesh)  # random data, dropped once saved
        nbytes = tree.tree_nbytes(state)
        cc.save(url, state)
        if peer is not None and orbax_url is not None:
            peer.save(orbax_url, state)
        del state
        _release()
        first = cc.restore(url, abstract)  # warm-up: client start-up is not a phase
        del first
        _release()
        if peer is not None and orbax_url is not None:
            del_me = peer.restore(orbax_url, abstract)
            del del_me
            _release()
        objects = list_objects(url)
        paths = [o.path for o in objects]
        orbax_paths = _files(orbax_url) if target.is_file and orbax_url else []

        def prepare(which: list[str]) -> None:
            if target.is_file:
                (_drop_cache if cold else _warm_cache)(which)

        from benchmarks import raw

        sizes = [o.size for o in objects]

        def raw_get(rep: int, keep: bool = False) -> float:
            # Payloads built per call (untimed) and dropped after: at 4 GiB, holding them
            # through the restores would double the memory this scenario needs.
            payloads = raw.light_payloads(sizes, seed=rep)
            try:
                if keep:
                    return target.raw_put_get(f"phases{rep}k", payloads, keep=True).get_s
                return target.raw_put_get(f"phases{rep}", payloads).get_s
            finally:
                del payloads
                _release()

        # One loop for every replay, as the Checkpointer keeps one: storage clients are
        # per loop, and their start-up is not a phase of a restore. The first replay warms it.
        loop = stack.enter_context(contextlib.closing(asyncio.new_event_loop()))
        stack.callback(loop.run_until_complete, _close_clients())
        loop.run_until_complete(_replay(url, abstract))

        def timed_restore(which: str, saver: Any, where: str, into: Any, files: list[str]) -> None:
            prepare(files)
            _release()
            before = resource.getrusage(resource.RUSAGE_SELF)
            server_before, ticks_before = _proc_cpu_s(server), _machine_ticks()
            start = time.perf_counter()
            restored = saver.restore(where, into)
            times[which].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            server_after, ticks_after = _proc_cpu_s(server), _machine_ticks()
            used = cpu.setdefault(which, {"user_s": [], "sys_s": [], "minor_faults": []})
            used["user_s"].append(round(after.ru_utime - before.ru_utime, 3))
            used["sys_s"].append(round(after.ru_stime - before.ru_stime, 3))
            used["minor_faults"].append(after.ru_minflt - before.ru_minflt)
            if server_before is not None and server_after is not None:
                used.setdefault("server_s", []).append(round(server_after - server_before, 3))
            if ticks_before is not None and ticks_after is not None:
                total, idle, steal = (b - a for a, b in zip(ticks_before, ticks_after, strict=True))
                used.setdefault("idle_share", []).append(round(idle / total, 3) if total else 0.0)
                used.setdefault("steal_share", []).append(round(steal / total, 3) if total else 0.0)
            del restored
            _release()

        def orbax_pair() -> None:
            if peer is not None and orbax_url is not None:
                timed_restore("orbax", peer, orbax_url, abstract, orbax_paths)
                timed_restore("orbax_resharded", peer, orbax_url, resharded, orbax_paths)

        for rep in range(reps):
            prepare(paths)
            phase_times, pieces, direct = loop.run_until_complete(_replay(url, abstract))
            for k, v in phase_times.items():
                times[k].append(v)
            restored_bytes = sum(p.nbytes for p in pieces)
            crc_s, copy_s = _crc_and_copy(pieces)
            times["crc32c"].append(crc_s)
            times["memcpy"].append(copy_s)
            del pieces
            _release()
            prepare(paths)
            times["handler"].append(_handler_restore(loop, url, abstract))
            _release()
            # The yardstick, then the restores compared with it (in the order below).
            if target.is_file:
                prepare(paths)
                prepare(paths)
                times["fromfile_freed"].append(_fromfile(paths, keep=False))
                _release()
                prepare(paths)
                times["fromfile"].append(_fromfile(paths))
                _release()
            else:
                # Bodies kept until all are read (fresh memory, as a restore's arrays), then
                # freed at once (warm memory reused): the ratio is against the second.
                times["raw_get_kept"].append(raw_get(rep, keep=True))
                times["raw_get"].append(raw_get(rep))
            # The two libraries take turns at the position right after the yardstick.
            orbax_first = peer is not None and rep % 2 == 1
            if orbax_first:
                orbax_pair()
            before = _ts_counters(_driver(target))
            timed_restore("restore", cc, url, abstract, paths)
            after = _ts_counters(_driver(target))
            timed_restore("resharded", cc, url, resharded, paths)
            after_reshard = _ts_counters(_driver(target))
            if not orbax_first:
                orbax_pair()
            if peer is not None:
                order.append(orbax_first)
            if target.is_file:
                times["raw_get"].append(raw_get(rep))
            if rep == 0:
                requests = {
                    "resharded_reads": after_reshard.get("read", 0) - after.get("read", 0),
                    "tensorstore_reads": after.get("read", 0) - before.get("read", 0),
                    "tensorstore_batch_reads": after.get("batch_read", 0)
                    - before.get("batch_read", 0),
                    "tensorstore_bytes": after.get("bytes_read", 0) - before.get("bytes_read", 0),
                    "direct_reads": direct.get("requests", 0),
                    "direct_bytes": direct.get("bytes", 0),
                    "objects": len(objects),
                    "object_bytes": sum(o.size for o in objects),
                    "restored_bytes": restored_bytes,
                }
            ratios = _rep_ratios(times, target.is_file)
            ctx.log(
                f"phases {target.name} {size_mib:g} MiB rep {rep}: "
                + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v)
                + " | ratios: "
                + ", ".join(f"{k} {v[-1]:.2f}" for k, v in ratios.items() if v)
            )
        rss = _rss(url, size_mib)
    finally:
        stack.close()
        cc.close()
        if peer is not None:
            peer.close()
        remove(url)
        if orbax_url is not None:
            remove(orbax_url)
    med = {k: median(v) for k, v in times.items()}
    ratios = _rep_ratios(times, target.is_file)
    return {
        "bytes": nbytes,
        "size_mib": size_mib,
        "cache": cfg.file_cache if target.is_file else "n/a",
        "times": {
            k: {"median_s": med[k], "samples_s": [round(x, 4) for x in v]}
            for k, v in times.items()
            if v
        },
        "phase_sum_s": sum(med[k] for k in PHASES),
        "requests": requests,
        "cpu": cpu,
        "orbax_first": order,
        "ratios": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
        "restore_vs_raw_get": ratio(med["restore"], med["raw_get"]),
        "resharded_vs_raw_get": ratio(med["resharded"], med["raw_get"]),
        "restore_vs_fromfile": ratio(med["restore"], med["fromfile"]),
        "restore_vs_fromfile_freed": ratio(med["restore"], med["fromfile_freed"]),
        "restore_vs_orbax": ratio(med["restore"], med["orbax"]),
        "restore_vs_orbax_worst": max(ratios["restore/orbax"], default=float("nan")),
        "resharded_vs_orbax": ratio(med["resharded"], med["orbax_resharded"]),
        "resharded_vs_orbax_worst": max(ratios["resharded/orbax"], default=float("nan")),
        "rss": rss,
    }


def _rep_ratios(times: dict[str, list[float]], is_file: bool) -> dict[str, list[float]]:
    """Each repetition's ratios (restore over its yardstick in the same repetition)."""

    def per(a: str, b: str) -> list[float]:
        return [ratio(x, y) for x, y in zip(times[a], times[b], strict=False)]

    base = "fromfile" if is_file else "raw_get"
    return {
        f"restore/{base}": per("restore", base),
        f"resharded/{base}": per("resharded", base),
        "restore/fromfile_freed": per("restore", "fromfile_freed") if is_file else [],
        "restore/raw_get_kept": [] if is_file else per("restore", "raw_get_kept"),
        "resharded/raw_get_kept": [] if is_file else per("resharded", "raw_get_kept"),
        "restore/orbax": per("restore", "orbax"),
        "resharded/orbax": per("resharded", "orbax_resharded"),
    }


@scenario("restore_phases", order=12)
def restore_phases(ctx: Context) -> dict[str, Any]:
    size_mib = ctx.config.phases_size_mib
    specs = tree.model_specs(size_mib)
    out: dict[str, Any] = {
        "bytes": tree.tree_nbytes(tree.abstract_from_specs(specs, ctx.mesh)),
        "size_mib": size_mib,
        "reps": ctx.config.phases_reps,
        "file_cache": ctx.config.file_cache,
        "backends": {},
    }
    ctx.drop_main_tree()  # this scenario saves a tree of its own size
    for target in ctx.targets:
        ctx.log(f"restore phases on {target.name}, {size_mib:g} MiB")
        out["backends"][target.name] = run_backend(ctx, target, size_mib)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="peak RSS of one restore (run by the scenario)")
    parser.add_argument("url")
    parser.add_argument("size_mib", type=float)
    args = parser.parse_args()
    print(json.dumps(rss_child(args.url, args.size_mib)), flush=True)


if __name__ == "__main__":
    main()
