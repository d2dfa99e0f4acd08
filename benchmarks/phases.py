"""Where a restore's time goes: one restore of the main tree replayed phase by phase.

Per backend, the main tree is saved once by cloudckpt (and once by Orbax where
it has a path); then, interleaved per repetition so all see the same machine
noise:

* the restore replayed step by step with the library's own read path
  (``cloudckpt.handlers.pytree.read.Reader``), each step timed alone:
  ``pytree.json`` read and parse, packed reads, tensorstore opens, the region
  reads of every array (all concurrently, as a restore does: requests,
  crc32c, decoding and the copies into host buffers), and the assembly of
  the ``jax.Array`` leaves from those host buffers
  (``make_array_from_callback``: host-to-device transfer, a memcpy on CPU
  unless the buffer can be aliased);
* the handler's ``restore`` alone and the whole ``Checkpointer.restore``
  (whose difference is the step-level work: step metadata, marker check),
  and the same restore onto a 2x4 mesh instead of the saved 4x2 (regions
  cut through chunk objects: ranged reads of inner chunks);
* the yardsticks on the same bytes: the raw concurrent GET of objects of the
  checkpoint's sizes (``raw.py``), ``np.fromfile`` of the checkpoint's own
  files (file backend), one crc32c pass and one memcpy over the restored
  bytes (what a checksum and an extra host copy cost here), and Orbax's
  restore of the same tree.

Requests are counted from tensorstore's own metrics during the whole restore
(its reads, and the bytes they returned) beside the checkpoint's object
count, which is what the raw channel issues. A fresh process per backend
measures peak RSS of a restore above its baseline (``python -m
benchmarks.phases``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
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
async def _replay(url: str, target: Any) -> tuple[dict[str, float], list[np.ndarray]]:
    """The handler's restore of ``target``, one phase at a time; returns times and host pieces."""
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
    return times, list(pieces)


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


# ------------------------------------------------------------------------- yardsticks
def _fromfile(paths: list[str]) -> float:
    """``np.fromfile`` of every file, 8 at a time (one per device)."""
    with ThreadPoolExecutor(8) as pool:
        start = time.perf_counter()
        got = sum(pool.map(lambda p: np.fromfile(p, np.uint8).nbytes, paths))
        elapsed = time.perf_counter() - start
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
    start = time.perf_counter()
    copies = [v.copy() for v in views]
    copy_s = time.perf_counter() - start
    del copies
    return crc_s, copy_s


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
def run_backend(ctx: Context, target: Target, state: Any, abstract: Any) -> dict[str, Any]:
    import jax
    from jax.sharding import Mesh

    cfg = ctx.config
    nbytes = tree.tree_nbytes(state)
    cc = CloudCkpt()
    peer = Orbax() if cfg.peer and target.orbax_root else None
    url = target.fresh("phases")
    orbax_url = target.fresh_orbax("phases") if peer is not None else None
    times: dict[str, list[float]] = {
        k: []
        for k in (
            *PHASES,
            *("handler", "restore", "resharded", "raw_get", "fromfile", "crc32c", "memcpy"),
            "orbax",
        )
    }
    requests: dict[str, Any] = {}
    # The same tree onto another mesh: 2x4 instead of 4x2, so most regions cut chunks.
    other = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    resharded = tree.abstract_from_specs(tree.model_specs(cfg.size_mib), other)
    stack = contextlib.ExitStack()
    try:
        cc.save(url, state)
        first = cc.restore(url, abstract)  # warm-up: client start-up is not a phase
        del first
        if peer is not None and orbax_url is not None:
            peer.save(orbax_url, state)
            del_me = peer.restore(orbax_url, abstract)
            del del_me
        objects = list_objects(url)
        from benchmarks import raw

        payloads = raw.payloads([o.size for o in objects])
        # One loop for every replay, as the Checkpointer keeps one: storage clients are
        # per loop, and their start-up is not a phase of a restore. The first replay warms it.
        loop = stack.enter_context(contextlib.closing(asyncio.new_event_loop()))
        stack.callback(loop.run_until_complete, _close_clients())
        loop.run_until_complete(_replay(url, abstract))
        for rep in range(cfg.reps):
            phase_times, pieces = loop.run_until_complete(_replay(url, abstract))
            for k, v in phase_times.items():
                times[k].append(v)
            crc_s, copy_s = _crc_and_copy(pieces)
            times["crc32c"].append(crc_s)
            times["memcpy"].append(copy_s)
            restored_bytes = sum(p.nbytes for p in pieces)
            del pieces
            gc.collect()
            times["handler"].append(_handler_restore(loop, url, abstract))
            gc.collect()
            before = _ts_counters(_driver(target))
            start = time.perf_counter()
            restored = cc.restore(url, abstract)
            times["restore"].append(time.perf_counter() - start)
            after = _ts_counters(_driver(target))
            del restored
            gc.collect()
            start = time.perf_counter()
            restored = cc.restore(url, resharded)
            times["resharded"].append(time.perf_counter() - start)
            after_reshard = _ts_counters(_driver(target))
            del restored
            gc.collect()
            if rep == 0:
                requests = {
                    "resharded_reads": after_reshard.get("read", 0) - after.get("read", 0),
                    "tensorstore_reads": after.get("read", 0) - before.get("read", 0),
                    "tensorstore_batch_reads": after.get("batch_read", 0)
                    - before.get("batch_read", 0),
                    "tensorstore_bytes": after.get("bytes_read", 0) - before.get("bytes_read", 0),
                    "objects": len(objects),
                    "object_bytes": sum(o.size for o in objects),
                    "restored_bytes": restored_bytes,
                }
            times["raw_get"].append(target.raw_put_get(f"phases{rep}", payloads).get_s)
            if target.is_file:
                times["fromfile"].append(_fromfile([o.path for o in objects]))
            if peer is not None and orbax_url is not None:
                start = time.perf_counter()
                restored = peer.restore(orbax_url, abstract)
                times["orbax"].append(time.perf_counter() - start)
                del restored
                gc.collect()
            ctx.log(
                f"phases {target.name} rep {rep}: "
                + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v)
            )
        rss = _rss(url, cfg.size_mib)
    finally:
        stack.close()
        cc.close()
        if peer is not None:
            peer.close()
        remove(url)
        if orbax_url is not None:
            remove(orbax_url)
    med = {k: median(v) for k, v in times.items()}
    return {
        "bytes": nbytes,
        "times": {
            k: {"median_s": med[k], "samples_s": [round(x, 4) for x in v]}
            for k, v in times.items()
            if v
        },
        "phase_sum_s": sum(med[k] for k in PHASES),
        "requests": requests,
        "restore_vs_raw_get": ratio(med["restore"], med["raw_get"]),
        "resharded_vs_raw_get": ratio(med["resharded"], med["raw_get"]),
        "restore_vs_fromfile": ratio(med["restore"], med["fromfile"]),
        "restore_vs_orbax": ratio(med["restore"], med["orbax"]),
        "restore_vs_orbax_worst": max(
            (ratio(a, b) for a, b in zip(times["restore"], times["orbax"], strict=False)),
            default=float("nan"),
        ),
        "rss": rss,
    }


@scenario("restore_phases", order=12)
def restore_phases(ctx: Context) -> dict[str, Any]:
    state = ctx.main_tree()
    abstract = tree.abstract_target(state)
    out: dict[str, Any] = {"bytes": tree.tree_nbytes(state), "backends": {}}
    for target in ctx.targets:
        ctx.log(f"restore phases on {target.name}")
        out["backends"][target.name] = run_backend(ctx, target, state, abstract)
    return out


# ------------------------------------------------------------------------- the table
def _ms(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value * 1000:.0f}"


def table_lines(result: dict[str, Any]) -> list[str]:
    """The phase table of ``make bench`` (milliseconds, medians), one column per backend."""
    backends = result["backends"]
    names = list(backends)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: Any) -> None:
        rows.append((label, [fn(backends[n]) for n in names]))

    def t(key: str) -> Any:
        return lambda r: _ms(r["times"].get(key, {}).get("median_s"))

    row("pytree.json read+parse", t("document"))
    row("packed reads", t("packs"))
    row("tensorstore opens", t("open"))
    row("array reads (GET+crc32c+decode+copy)", t("reads"))
    row("assembly (make_array_from_callback)", t("assemble"))
    row("= sum of phases", lambda r: _ms(r["phase_sum_s"]))
    row("handler restore", t("handler"))
    row("Checkpointer.restore", t("restore"))
    row("Checkpointer.restore onto a 2x4 mesh", t("resharded"))
    row("raw concurrent GET, same sizes", t("raw_get"))
    row("np.fromfile of the files", t("fromfile"))
    row("one crc32c pass over the bytes", t("crc32c"))
    row("one memcpy of the bytes", t("memcpy"))
    row("Orbax restore", t("orbax"))
    row("restore / raw GET", lambda r: f"{r['restore_vs_raw_get']:.2f}")
    row("restore / np.fromfile", lambda r: f"{r['restore_vs_fromfile']:.2f}")
    row("restore / Orbax (median, worst)", lambda r: f"{r['restore_vs_orbax']:.2f}, "
        f"{r['restore_vs_orbax_worst']:.2f}")  # fmt: skip
    row("objects (raw GETs)", lambda r: str(r["requests"].get("objects", "-")))
    row("tensorstore reads (batched)", lambda r: f"{r['requests'].get('tensorstore_reads', '-')} "
        f"({r['requests'].get('tensorstore_batch_reads', '-')})")  # fmt: skip
    row(
        "tensorstore reads onto the 2x4 mesh",
        lambda r: str(r["requests"].get("resharded_reads", "-")),
    )
    row("MiB read / MiB restored", lambda r: f"{r['requests'].get('tensorstore_bytes', 0) / 2**20:.0f}"
        f" / {r['requests'].get('restored_bytes', 0) / 2**20:.0f}")  # fmt: skip
    row("peak RSS above baseline", lambda r: f"{r['rss']['multiple']:.2f}x")
    width = max(len(label) for label, _ in rows)
    cols = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    head = f"{'ms (median)':<{width}}  " + "  ".join(
        f"{n:>{c}}" for n, c in zip(names, cols, strict=True)
    )
    lines = [
        f"\n== Restore phases: {result['bytes'] / 2**20:.0f} MiB tree, each phase timed alone ==",
        head,
        "-" * len(head),
    ]
    for label, values in rows:
        lines.append(
            f"{label:<{width}}  "
            + "  ".join(f"{v:>{c}}" for v, c in zip(values, cols, strict=True))
        )
    lines.append(
        "goals: restore/raw GET <= 1.1 (s3, gcs); restore/np.fromfile <= 2 (file); "
        "restore/Orbax <= 0.6 every run (file, gcs); RSS <= 1.25x"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="peak RSS of one restore (run by the scenario)")
    parser.add_argument("url")
    parser.add_argument("size_mib", type=float)
    args = parser.parse_args()
    print(json.dumps(rss_child(args.url, args.size_mib)), flush=True)


if __name__ == "__main__":
    main()
