"""How long an async save blocks the caller, against a plain device-to-host copy.

The physical limit of a blocking phase is copying the bytes the save must
keep: every replica-0 shard to host memory. Per repetition this measures
that copy (``copy_to_host_async`` on all shards, then ``np.array(copy=True)``
of each), ``jax.device_get`` of the whole tree for reference, how long
``cc.AsyncCheckpointer.save`` blocks, and how long Orbax's
``AsyncCheckpointer.save`` blocks, each followed by waiting for the
background commit (also timed) so the next measurement starts on an idle
machine. Saves go to the file backend (or the first backend selected).
"""

from __future__ import annotations

import gc
import time
from typing import Any

from benchmarks import tree
from benchmarks.common import Context, median, ratio, samples, scenario, timed
from benchmarks.ops import CloudCkpt, Orbax, Saver
from benchmarks.targets import remove
from benchmarks.throughput import warm_up


def _async_round(saver: Saver, url: str, state: Any) -> tuple[float, float]:
    start = time.perf_counter()
    blocked = saver.async_save(url, state)
    saver.wait()
    total = time.perf_counter() - start
    remove(url)
    return blocked, total


@scenario("blocking", order=30)
def blocking(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    target = ctx.target("file") or ctx.targets[0]
    state = ctx.main_tree()
    savers: list[Saver] = [CloudCkpt()]
    if cfg.peer and target.orbax_root:
        savers.append(Orbax())
    times: dict[str, list[float]] = {"plain_copy": [], "device_get": []}
    for saver in savers:
        times[f"{saver.name}_block"] = []
        times[f"{saver.name}_total"] = []
    try:
        for saver in savers:  # start-up (imports, loops, first tensorstore context)
            url = target.fresh("warmup") if saver.name == "cloudckpt" else target.fresh_orbax("w")
            warm_up(saver, url, ctx)
            small = tree.model_tree(1, ctx.mesh)
            _async_round(saver, url, small)
        for rep in range(cfg.reps):
            for key, copy in (
                ("plain_copy", tree.replica0_copy),
                ("device_get", tree.device_get_copy),
            ):
                seconds, host = timed(lambda copy=copy: copy(state))
                times[key].append(seconds)
                del host
                gc.collect()
            for saver in savers:
                url = (
                    target.fresh("async")
                    if saver.name == "cloudckpt"
                    else target.fresh_orbax("async")
                )
                blocked, total = _async_round(saver, url, state)
                times[f"{saver.name}_block"].append(blocked)
                times[f"{saver.name}_total"].append(total)
                gc.collect()
            ctx.log(
                f"blocking rep {rep}: plain copy {times['plain_copy'][-1]:.3f}s, "
                + ", ".join(
                    f"{s.name} blocks {times[s.name + '_block'][-1]:.3f}s "
                    f"(commit done after {times[s.name + '_total'][-1]:.2f}s)"
                    for s in savers
                )
            )
        many = _many_leaves(ctx, target)
    finally:
        for saver in savers:
            saver.close()
    med = {k: median(v) for k, v in times.items()}
    return {
        "backend": target.name,
        "many_leaves": many,
        "times": {k: samples(v) for k, v in times.items()},
        "cloudckpt_vs_copy": ratio(med["cloudckpt_block"], med["plain_copy"]),
        "orbax_vs_copy": ratio(med.get("orbax_block", float("nan")), med["plain_copy"]),
        "cloudckpt_vs_orbax": ratio(med["cloudckpt_block"], med.get("orbax_block", float("nan"))),
    }


def _many_leaves(ctx: Context, target: Any) -> dict[str, Any]:
    """The same, cloudckpt only, for the scaling goal's tree of many small leaves.

    With thousands of leaves the blocking part is per-leaf planning, not bytes:
    10,000 leaves of 4 KiB blocked 0.93-1.20 s while their copy took 0.1 s,
    until the pack records for ``pytree.json`` moved to the background.
    """
    cfg = ctx.config
    state = tree.many_leaves_tree(cfg.goal_leaves, cfg.goal_leaves * cfg.goal_leaf_bytes, ctx.mesh)
    saver = CloudCkpt()
    times: dict[str, list[float]] = {"plain_copy": [], "cloudckpt_block": [], "cloudckpt_total": []}
    try:
        _async_round(saver, target.fresh("many-warmup"), state)
        tree.replica0_copy(state)  # untimed: jax's first pass over 10,000 leaves is slower
        for rep in range(min(cfg.reps, 3)):
            seconds, host = timed(lambda: tree.replica0_copy(state))
            times["plain_copy"].append(seconds)
            del host
            gc.collect()
            blocked, total = _async_round(saver, target.fresh("many"), state)
            times["cloudckpt_block"].append(blocked)
            times["cloudckpt_total"].append(total)
            gc.collect()
            ctx.log(
                f"blocking, {cfg.goal_leaves} leaves, rep {rep}: plain copy "
                f"{times['plain_copy'][-1]:.3f}s, cloudckpt blocks {blocked:.3f}s "
                f"(commit done after {total:.2f}s)"
            )
    finally:
        saver.close()
    med = {k: median(v) for k, v in times.items()}
    return {
        "leaves": cfg.goal_leaves,
        "leaf_bytes": cfg.goal_leaf_bytes,
        "times": {k: samples(v) for k, v in times.items()},
        "cloudckpt_vs_copy": ratio(med["cloudckpt_block"], med["plain_copy"]),
    }
