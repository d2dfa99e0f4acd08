"""Round trips before a restore's data, on a channel with a cloud's request latency (issue 18).

A loopback emulator answers a small GET in about a millisecond; a cloud bucket in 20-50 ms,
so what costs a restore of a small state there is how many requests wait for one another
before the data. Per object store, every request goes through a ``FaultProxy`` (no faults)
that holds each answer ``--latency-ms`` (25 ms) back. Timed, interleaved, median of
``--small-reps``:

* one GET of a small object through the proxy: one round trip, the yardstick;
* ``Checkpointer.restore`` of a small pytree (one sharded array, one small leaf; nothing
  packed, so that every read on GCS is cloudckpt's own and goes through the proxy);
* ``CheckpointManager.restore`` of the latest step of a composite of that pytree and a JSON
  item, as a job restarting after preemption does (the manager made before the clock starts).

Each time divided by the yardstick is the restore's sequential round trips. Before the early
reads (f3a9de2's parent) they were 3 (marker, ``pytree.json``, data) and 4 (marker, step
metadata, documents, data); now the documents go out with the marker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import cloudckpt as cc
from benchmarks import tree as tree_lib
from benchmarks.common import Context, aligned, median, scenario, timed
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.testing.faultproxy import FaultProxy


def _tree(ctx: Context) -> dict[str, Any]:
    sharding = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec("data", "model"))
    w = np.arange(1024 * 256, dtype=np.float32).reshape(1024, 256)
    return {"w": jax.device_put(w, sharding), "b": np.arange(16, dtype=np.float32)}


def _composite(pytree: cc.StandardCheckpointHandler) -> cc.CompositeCheckpointHandler:
    registry = cc.HandlerRegistry()
    registry.add("state", cc.args.StandardSave, pytree)
    registry.add("state", cc.args.StandardRestore, pytree)
    registry.add("meta", cc.args.JsonSave, cc.JsonCheckpointHandler)
    registry.add("meta", cc.args.JsonRestore, cc.JsonCheckpointHandler)
    return cc.CompositeCheckpointHandler(handler_registry=registry)


def _measure(ctx: Context, url: str, proxy: FaultProxy) -> dict[str, Any]:
    tree = _tree(ctx)
    # Saved straight to the server; restored through the proxy. On GCS tensorstore (which
    # writes the arrays, and would read packs) takes its endpoint from the environment, so
    # nothing is packed and every read of a restore is cloudckpt's own, through the proxy.
    pytree = cc.StandardCheckpointHandler(pack_below_bytes=1)
    plain_url, root = f"{url}/plain", f"{url}/managed"
    with cc.CheckpointManager(root, _composite(pytree)) as saver:
        saver.save(
            1,
            args=cc.args.Composite(
                state=cc.args.StandardSave(tree), meta=cc.args.JsonSave({"lr": 0.1})
            ),
        )
        saver.wait_until_finished()
    with cc.Checkpointer(pytree) as saver:
        saver.save(plain_url, args=cc.args.StandardSave(tree))
    options = {"endpoint_url": proxy.endpoint, "deadlines": Deadlines(hedge=False, cut_min_s=60)}
    restore_args = cc.args.StandardRestore(tree_lib.abstract_target(tree))
    composite_args = cc.args.Composite(state=restore_args, meta=cc.args.JsonRestore())
    with (
        cc.Checkpointer(pytree, storage_options=options) as ckptr,
        cc.CheckpointManager(root, _composite(pytree), storage_options=options) as managed,
    ):
        document = ckptr.location(f"{plain_url}/pytree.json")
        ops: dict[str, Callable[[], Any]] = {
            "get": lambda: ckptr.run_on_loop(document.backend.get(document.path)),
            "restore": lambda: ckptr.restore(plain_url, args=restore_args),
            "manager_restore": lambda: managed.restore(1, args=composite_args),
        }
        for fn in ops.values():  # warm-up: connections and jax, not what is measured
            fn()
        times: dict[str, list[float]] = {name: [] for name in ops}
        for rep in range(ctx.config.small_reps):
            order = list(ops) if rep % 2 == 0 else list(reversed(ops))
            for name in order:
                times[name].append(timed(ops[name])[0])
    med = {name: median(v) for name, v in times.items()}
    return {
        "seconds": times,
        "median_s": med,
        "round_trips": {
            name: round(med[name] / med["get"], 2) for name in ("restore", "manager_restore")
        },
    }


@scenario("restore_latency", order=13)
def run(ctx: Context) -> dict[str, Any]:
    latency_s = ctx.config.latency_ms / 1000
    out: dict[str, Any] = {"latency_ms": ctx.config.latency_ms, "backends": {}}
    for target in ctx.targets:
        if target.is_file or target.endpoint is None:
            continue
        flavor = "s3" if target.name == "s3" else "gcs"
        with FaultProxy(
            target.endpoint, fault_rate=0.0, flavor=flavor, delay=lambda *_: latency_s
        ) as proxy:
            row = _measure(ctx, target.fresh("latency"), proxy)
        out["backends"][target.name] = row
        ctx.log(f"restore_latency: {target.name}: {row['median_s']} {row['round_trips']}")
    return out


def table_lines(result: dict[str, Any]) -> list[str]:
    """The summary rows for ``report.table``."""
    lines = [
        f"\n== Restore latency: every request answered {result['latency_ms']:g} ms late "
        "(a cloud's small-object latency); median ms, and / one GET = sequential round trips =="
    ]
    header = ["backend", "one GET", "restore", "round trips", "manager restore", "round trips"]
    rows = []
    for name, r in result["backends"].items():
        med, trips = r["median_s"], r["round_trips"]
        rows.append(
            [name, f"{med['get'] * 1000:.0f}", f"{med['restore'] * 1000:.0f}",
             f"{trips['restore']:.2f}", f"{med['manager_restore'] * 1000:.0f}",
             f"{trips['manager_restore']:.2f}"]
        )  # fmt: skip
    lines += aligned(header, rows)
    lines.append(
        "restore: Checkpointer.restore of a small pytree; manager restore: CheckpointManager."
        "restore of a composite (that pytree and a JSON item). Before the early reads: 3 and 4"
    )
    return lines
