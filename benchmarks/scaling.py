"""How save time grows with bytes and with leaf count, and the many-small-leaves goal.

* Size: the model-like tree at each of ``scale_sizes_mib`` on the file
  backend, saved once untimed and then ``scale_reps`` times, beside the raw
  channel for the same objects. Growth is linear when, between consecutive sizes, time grows no
  faster than bytes (the log-log slope, "exponent", stays <= 1.25; fixed
  costs make small sizes sub-linear, which is fine). A least-squares line
  gives seconds per GiB and the fixed cost.
* Leaves: ``leaf_counts`` replicated vectors sharing ``leaves_total_mib``,
  saved on the file backend; the same exponent test on (leaves, seconds) and
  a line giving the cost per leaf. Each tree's first timed save is also
  restored ``small_reps`` times, into its own shardings (a restore after preemption
  pays this per-leaf cost too), with its own line per leaf.
* Goal: ``goal_leaves`` leaves of ``goal_leaf_bytes`` each (issue: 10,000
  leaves of a few KB in under a second on the file backend, with a bounded
  object count), on every selected backend; with ``--orbax-many-leaves``
  also Orbax, once, on the file backend (it takes about a minute).
* Awkward shapes: one 4x2-sharded array whose shards have a prime number of
  rows, beside one of the same size whose shard rows are a multiple of 128.
  Both should save and restore equally fast; a gap means the chunk layout
  degenerates (see the ``inner_chunk_bytes`` split in the pytree handler).
"""

from __future__ import annotations

import gc
import math
from typing import Any

from benchmarks import raw, tree
from benchmarks.common import Context, MiB, linear_fit, median, ratio, samples, scenario, timed
from benchmarks.ops import CloudCkpt, Orbax, Saver
from benchmarks.targets import Target, list_objects, remove
from benchmarks.throughput import warm_up


def _saves(
    saver: Saver, target: Target, state: Any, reps: int, orbax: bool = False, restores: int = 0
) -> dict:
    """Median save time over ``reps`` fresh saves; object count and sizes of the first.

    ``restores``: the first save is also restored that many times, into the state's own
    shardings (``restore_s`` and ``restore_samples_s``).
    """
    seconds: list[float] = []
    sizes: list[int] = []
    restored: list[float] = []
    for rep in range(reps):
        url = target.fresh_orbax("scale") if orbax else target.fresh("scale")
        elapsed, _ = timed(lambda url=url: saver.save(url, state))
        seconds.append(elapsed)
        if rep == 0:
            sizes = [o.size for o in list_objects(url)]
            abstract = tree.abstract_target(state) if restores else None
            for _ in range(restores):
                restored.append(timed(lambda url=url, a=abstract: saver.restore(url, a))[0])
        remove(url)
    out = {**samples(seconds), "objects": len(sizes), "object_sizes": sizes}
    if restores:
        back = samples(restored)
        out.update(restore_s=back["median_s"], restore_samples_s=back["samples_s"])
    return out


def _sizes(ctx: Context, saver: Saver, target: Target) -> dict[str, Any]:
    cfg = ctx.config
    points = []
    for size in cfg.scale_sizes_mib:
        state = tree.model_tree(size, ctx.mesh)
        nbytes = tree.tree_nbytes(state)
        # Untimed first save at each size: the process's first save of N bytes pays
        # for fresh pages (page faults cost tens of microseconds on VMs); later ones reuse them.
        _saves(saver, target, state, 1)
        result = _saves(saver, target, state, cfg.scale_reps)
        del state
        data = raw.payloads(result.pop("object_sizes"))
        raw_put = median(
            [target.raw_put_get(f"scale{r}", data).put_s for r in range(cfg.scale_reps)]
        )
        del data
        gc.collect()
        point = {
            "size_mib": size,
            "bytes": nbytes,
            **result,
            "raw_put_s": raw_put,
            "vs_raw": ratio(result["median_s"], raw_put),
            "MiBps": ratio(nbytes / MiB, result["median_s"]),
        }
        points.append(point)
        ctx.log(
            f"size {size:g} MiB: save {point['median_s']:.2f}s ({point['MiBps']:.0f} MiB/s), "
            f"raw {raw_put:.2f}s, {point['objects']} objects"
        )
    xs, ys = [p["bytes"] / MiB for p in points], [p["median_s"] for p in points]
    exponents = _exponents(xs, ys)
    return {
        "points": points,
        "fit_seconds_per_MiB": linear_fit(xs, ys),
        "exponents": exponents,
        "linear": _linear(exponents),
    }


def _leaves(ctx: Context, saver: Saver, target: Target) -> dict[str, Any]:
    cfg = ctx.config
    points = []
    total = int(cfg.leaves_total_mib * MiB)
    for count in cfg.leaf_counts:
        state = tree.many_leaves_tree(count, total, ctx.mesh)
        result = _saves(saver, target, state, cfg.small_reps, restores=cfg.small_reps)
        result.pop("object_sizes")
        points.append({"leaves": count, "bytes": tree.tree_nbytes(state), **result})
        del state
        gc.collect()
        ctx.log(
            f"{count} leaves: save {result['median_s']:.3f}s, {result['objects']} objects; "
            f"restore {result['restore_s']:.3f}s"
        )
    xs, ys = [p["leaves"] for p in points], [p["median_s"] for p in points]
    fit = linear_fit(xs, ys)
    exponents = _exponents(xs, ys)
    restore_fit = linear_fit(xs, [p["restore_s"] for p in points])
    return {
        "points": points,
        "fit_seconds_per_leaf": fit,
        "us_per_leaf": fit["slope"] * 1e6,
        "exponents": exponents,
        "linear": _linear(exponents),
        "restore_fit_seconds_per_leaf": restore_fit,
        "restore_us_per_leaf": restore_fit["slope"] * 1e6,
    }


def _goal(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    state = tree.many_leaves_tree(cfg.goal_leaves, cfg.goal_leaves * cfg.goal_leaf_bytes, ctx.mesh)
    out: dict[str, Any] = {"leaves": cfg.goal_leaves, "leaf_bytes": cfg.goal_leaf_bytes}
    for target in ctx.targets:
        savers: list[Saver] = [CloudCkpt()]
        if cfg.peer and cfg.orbax_many_leaves and target.name == "file":
            savers.append(Orbax())
        for saver in savers:
            orbax = saver.name == "orbax"
            try:
                warm_up(saver, target.fresh_orbax("w") if orbax else target.fresh("w"), ctx)
                result = _saves(saver, target, state, 1 if orbax else cfg.small_reps, orbax=orbax)
            finally:
                saver.close()
            result.pop("object_sizes")
            key = f"{target.name}_orbax" if orbax else target.name
            out[key] = result
            ctx.log(
                f"{cfg.goal_leaves} leaves x {cfg.goal_leaf_bytes} B, {saver.name} on "
                f"{target.name}: {result['median_s']:.3f}s, {result['objects']} objects"
            )
    return out


def _awkward_shapes(ctx: Context, saver: Saver, target: Target) -> dict[str, Any]:
    """Same bytes, per-device rows 6553 (prime) vs 6528 (2^7 x 51), 4x2 sharded."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(ctx.mesh, P("data", "model"))
    out: dict[str, Any] = {}
    for name, rows in (("regular", 4 * 6528), ("prime", 4 * 6553)):
        state = {"x": tree.random_array((rows, 1024), sharding, seed=rows)}
        abstract = tree.abstract_target(state)
        result = _saves(saver, target, state, ctx.config.small_reps)
        result.pop("object_sizes")
        url = target.fresh("shape")
        saver.save(url, state)
        restore_s, _ = timed(lambda url=url, a=abstract: saver.restore(url, a))
        remove(url)
        out[name] = {
            "shape": [rows, 1024],
            "bytes": rows * 1024 * 4,
            **result,
            "restore_s": restore_s,
        }
        ctx.log(
            f"awkward shapes, {name} {rows}x1024: save {result['median_s']:.3f}s "
            f"restore {restore_s:.3f}s"
        )
    out["prime_vs_regular_save"] = ratio(out["prime"]["median_s"], out["regular"]["median_s"])
    out["prime_vs_regular_restore"] = ratio(out["prime"]["restore_s"], out["regular"]["restore_s"])
    return out


def _exponents(xs: list[float], ys: list[float]) -> list[float]:
    """log-log slopes between consecutive points: 1 is linear, 2 quadratic."""
    return [
        math.log(ys[i + 1] / ys[i]) / math.log(xs[i + 1] / xs[i])
        for i in range(len(xs) - 1)
        if xs[i + 1] > xs[i] and ys[i] > 0 and ys[i + 1] > 0
    ]


def _linear(exponents: list[float]) -> bool:
    """No step grows faster than ~linearly (fixed costs may make steps sub-linear)."""
    return bool(exponents) and max(exponents) <= 1.25


@scenario("scaling", order=40)
def scaling(ctx: Context) -> dict[str, Any]:
    ctx.drop_main_tree()  # the large scaling trees need the room
    target = ctx.target("file") or ctx.targets[0]
    saver = CloudCkpt()
    try:
        warm_up(saver, target.fresh("warmup"), ctx)
        out = {"backend": target.name, "sizes": _sizes(ctx, saver, target)}
        out["leaves"] = _leaves(ctx, saver, target)
        out["awkward_shapes"] = _awkward_shapes(ctx, saver, target)
    finally:
        saver.close()
    out["goal_many_leaves"] = _goal(ctx)
    return out
