"""Capped streams: restoring large objects when each connection is held to a rate.

On loopback one connection to the emulator is as fast as several, so the
other scenarios cannot tell a reader that fetches a 128 MiB object with one
GET from one that splits it. S3 and GCS can: a single stream carries a
fraction of a host's network (AWS's performance guide recommends concurrent
ranged GETs of 8-16 MB for large objects). Here every request goes through a
:class:`cloudckpt.testing.paceproxy.PacedRelay` that holds each connection's
downloads to ``--capped-rate-mbs`` MB/s (25 by default).

Per object store, a random float32 array of ``--capped-size-mib`` MiB (256)
sharded in two (``P(None, "model")`` on the 4x2 mesh) is saved straight to
the server as two chunk objects (``max_object_bytes`` is 256 MiB, so a pod's
large shards are objects this size too). Per repetition, through the relay
and in alternating order:

* cloudckpt's restore, its reads in spans of at most
  ``handlers.pytree.chunks.RUN_BYTES`` (16 MiB);
* the same restore reading each object with one GET (``RUN_BYTES`` set past
  the object size for that restore: the reader before spans);
* the raw GET of the same two objects, whole, and in ranges of ``RUN_BYTES``
  (``raw.get_ranges``: gcsfs or aiobotocore, 64 requests at once).

Reported: medians, ``restore / raw ranged GET`` (issue 18's ratio for a
channel whose streams are capped) and ``one GET per object / restore`` (what
the spans buy). Every restore's values are compared with the saved array.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks import raw
from benchmarks.common import Context, median, ratio, scenario
from benchmarks.targets import BUCKET, list_objects, remove


@contextlib.contextmanager
def _run_bytes(value: int) -> Iterator[None]:
    """The direct chunk reader's ``RUN_BYTES`` set to ``value`` for the duration."""
    from cloudckpt.handlers.pytree import chunks

    before = chunks.RUN_BYTES
    chunks.RUN_BYTES = value
    try:
        yield
    finally:
        chunks.RUN_BYTES = before


def _one(ctx: Context, kind: str, upstream: str) -> dict[str, Any]:
    import cloudckpt as cc
    from cloudckpt.handlers.pytree import chunks
    from cloudckpt.testing.paceproxy import PacedRelay

    cfg = ctx.config
    rate = cfg.capped_rate_mbs * 1e6
    cols = 2048
    rows = max(1, int(cfg.capped_size_mib * 2**20) // (4 * cols))
    sharding = NamedSharding(ctx.mesh, P(None, "model"))
    value = np.random.default_rng(7).random((rows, cols), dtype=np.float32)
    array = jax.device_put(value, sharding)
    scheme = "s3" if kind == "s3" else "gs"
    url = f"{scheme}://{BUCKET}/capped-{uuid.uuid4().hex[:8]}"
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        ckptr.save(url, args=cc.args.StandardSave({"w": array}))
    del array
    objects = [(o.path, o.size) for o in list_objects(url) if "/c/" in o.path]
    target = {"w": jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)}
    times: dict[str, list[float]] = {"restore": [], "whole": [], "raw_ranged": [], "raw_whole": []}
    equal = True
    try:
        with PacedRelay(upstream, rate=rate) as relay:
            options = {"endpoint_url": relay.endpoint}
            with cc.Checkpointer(cc.StandardCheckpointHandler(), storage_options=options) as ckptr:

                def restore(which: str) -> None:
                    nonlocal equal
                    start = time.perf_counter()
                    out = ckptr.restore(url, args=cc.args.StandardRestore(target))
                    times[which].append(time.perf_counter() - start)
                    equal = equal and bool(np.array_equal(np.asarray(out["w"]), value))

                restore("restore")  # warm-up: client start-up is not what is measured
                times["restore"].clear()
                for rep in range(cfg.capped_reps):
                    order = ["restore", "whole"] if rep % 2 == 0 else ["whole", "restore"]
                    for which in order:
                        whole = which == "whole"
                        with _run_bytes(1 << 62) if whole else contextlib.nullcontext():
                            restore(which)
                    spans = [("raw_ranged", chunks.RUN_BYTES), ("raw_whole", None)]
                    for which, span in spans if rep % 2 == 0 else spans[::-1]:
                        times[which].append(raw.get_ranges(kind, relay.endpoint, objects, span))
                    ctx.log(
                        f"capped {kind} rep {rep}: "
                        + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
                    )
    finally:
        remove(url)
    med = {k: median(v) for k, v in times.items()}
    return {
        "objects": [size for _, size in objects],
        "times_s": times,
        "median_s": med,
        "restore_over_raw_ranged": ratio(med["restore"], med["raw_ranged"]),
        "whole_over_restore": ratio(med["whole"], med["restore"]),
        "equal": equal,
    }


@scenario("capped_streams", order=75)
def capped_streams(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    out: dict[str, Any] = {
        "size_mib": cfg.capped_size_mib,
        "rate_mbs": cfg.capped_rate_mbs,
        "reps": cfg.capped_reps,
        "backends": {},
    }
    if ctx.servers is None:
        return out
    for kind in ("s3", "gcs"):
        if ctx.target(kind) is None:
            continue
        upstream = ctx.servers.s3.endpoint if kind == "s3" else ctx.servers.gcs.endpoint
        out["backends"][kind] = _one(ctx, kind, upstream)
    return out


def table_lines(result: dict[str, Any]) -> list[str]:
    """The scenario's rows for the report."""
    from benchmarks.report import _f, _rows

    backends = result.get("backends") or {}
    if not backends:
        return []
    rows = []
    for kind, r in backends.items():
        med = r["median_s"]
        sizes = r["objects"]
        rows.append([
            kind, f"{len(sizes)} x {max(sizes) / 2**20:.0f} MiB" if sizes else "-",
            _f(med["restore"]), _f(med["whole"]), _f(med["raw_ranged"]), _f(med["raw_whole"]),
            _f(r["restore_over_raw_ranged"]), _f(r["whole_over_restore"]),
            "yes" if r["equal"] else "NO",
        ])  # fmt: skip
    lines = [
        f"\n== Capped streams: {result['size_mib']:g} MiB in two objects, each connection held "
        f"to {result['rate_mbs']:g} MB/s, median of {result['reps']} (s) =="
    ]
    lines += _rows(
        ["backend", "objects", "restore", "1 GET/object", "raw ranged", "raw whole",
         "restore/raw ranged", "1 GET/object / restore", "equal"],
        rows,
    )  # fmt: skip
    lines.append(
        "restore: cloudckpt's reads, in spans of at most 16 MiB; 1 GET/object: the same restore "
        "reading each object whole; raw: gcsfs/aiobotocore GETs of the same objects, in 16 MiB "
        "ranges and whole (a single cloud stream is capped too; AWS suggests 8-16 MB ranges)"
    )
    return lines
