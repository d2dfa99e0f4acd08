"""Save and restore of the main tree on each backend, against the raw channel and Orbax.

Per backend and repetition, interleaved so all of them see the same machine
noise:

* a cloudckpt save and restore (the figures we steer by);
* the raw channel moving objects of the same sizes as that checkpoint;
* the engine reference: plain tensorstore writing and reading the same zarr
  arrays (``engine.py``), which splits cloudckpt's own overhead from the
  engine's (file backend; S3 and GCS too with ``--engine-all``; skipped when
  most of the tree is packed, as with ``--quick``);
* a plain device-to-host copy of the replica-0 shards, the part of a
  blocking save that raw PUTs do not do;
* (S3) the same objects through every other client cloudckpt could use
  (s3fs, plain tensorstore key/value writes, aiohttp with UNSIGNED-PAYLOAD
  and a CRC32C checksum; ``s3tools.py``), so the save is also judged against
  the best of them;
* (file and GCS) an Orbax save and restore of the same tree.

Each save goes to a fresh prefix that is removed, untimed, afterwards. Before
timing, each saver saves and restores a tiny tree once so client start-up is
not counted. The first repetition checks that the restored values equal the
saved ones.
"""

from __future__ import annotations

import gc
from typing import Any

import numpy as np

from benchmarks import engine, raw, s3tools, tree
from benchmarks.common import Context, median, ratio, samples, scenario, timed
from benchmarks.ops import CloudCkpt, Orbax, Saver, same_values
from benchmarks.targets import BUCKET, ObjectStat, Target, list_objects, remove


def object_stats(objects: list[ObjectStat], tree_bytes: int) -> dict[str, Any]:
    sizes = sorted(o.size for o in objects)
    return {
        "count": len(sizes),
        "bytes": sum(sizes),
        "bytes_vs_tree": ratio(sum(sizes), tree_bytes),
        "largest": sizes[-1] if sizes else 0,
        "median": int(np.median(sizes)) if sizes else 0,
        "under_64KiB": sum(1 for s in sizes if s < 64 << 10),
    }


def warm_up(saver: Saver, url: str, ctx: Context) -> None:
    small = tree.model_tree(1, ctx.mesh)
    saver.save(url, small)
    saver.restore(url, tree.abstract_target(small))
    remove(url)


def _save_restore(
    saver: Saver, url: str, state: Any, target: Any, check: bool
) -> tuple[float, float, bool | None]:
    save_s, _ = timed(lambda: saver.save(url, state))
    restore_s, restored = timed(lambda: saver.restore(url, target))
    ok = same_values(state, restored) if check else None
    del restored
    gc.collect()
    return save_s, restore_s, ok


def run_backend(ctx: Context, target: Target, state: Any, abstract: Any) -> dict[str, Any]:
    cfg = ctx.config
    nbytes = tree.tree_nbytes(state)
    cc = CloudCkpt()
    peer = Orbax() if cfg.peer and target.orbax_root else None
    warm_up(cc, target.fresh("warmup"), ctx)
    if peer is not None:
        warm_up(peer, target.fresh_orbax("warmup"), ctx)
    names = ("save", "restore", "raw_put", "raw_get", "engine_save", "engine_restore", "copy")
    peer_names = ("orbax_save", "orbax_restore", "cloudckpt_restore_of_orbax")
    tools = [t for t in s3tools.TOOLS if t != "aiobotocore"] if target.name == "s3" else []
    tool_names = tuple(f"{kind}:{t}" for t in tools for kind in ("tool_put", "tool_get"))
    times: dict[str, list[float]] = {k: [] for k in (*names, *peer_names, *tool_names)}
    objects: dict[str, Any] = {}
    verified: dict[str, bool] = {}
    payloads: list[bytes] = []
    layout: list[Any] = []
    engine_bytes = 0
    host = engine.host_arrays(state)
    try:
        for rep in range(cfg.reps):
            url = target.fresh("main")
            save_s, restore_s, ok = _save_restore(cc, url, state, abstract, check=rep == 0)
            times["save"].append(save_s)
            times["restore"].append(restore_s)
            if rep == 0:
                listed = list_objects(url)
                objects["cloudckpt"] = object_stats(listed, nbytes)
                verified["cloudckpt"] = bool(ok)
                payloads = raw.payloads([o.size for o in listed])
                layout = engine.zarr_layout(url)
                engine_bytes = sum(host[leaf].nbytes for leaf, _, _ in layout)
            remove(url)
            result = target.raw_put_get(f"rep{rep}", payloads)
            times["raw_put"].append(result.put_s)
            times["raw_get"].append(result.get_s)
            for tool in tools:
                assert target.endpoint is not None
                got = s3tools.TOOLS[tool](target.endpoint, BUCKET, f"tool/{tool}{rep}", payloads)
                times[f"tool_put:{tool}"].append(got.put_s)
                times[f"tool_get:{tool}"].append(got.get_s)
            if engine_bytes >= nbytes / 2 and (target.is_file or cfg.engine_all):
                url = target.fresh("engine")
                write_s, read_s = engine.write_read(url, layout, host)
                times["engine_save"].append(write_s)
                times["engine_restore"].append(read_s)
                remove(url)
            copy_s, copies = timed(lambda: tree.replica0_copy(state))
            times["copy"].append(copy_s)
            del copies
            gc.collect()
            if peer is not None:
                url = target.fresh_orbax("main")
                save_s, restore_s, ok = _save_restore(peer, url, state, abstract, check=rep == 0)
                times["orbax_save"].append(save_s)
                times["orbax_restore"].append(restore_s)
                # The same Orbax-written checkpoint restored by cloudckpt (issue 15).
                cc_s, restored = timed(lambda u=url: cc.restore(u, abstract))
                times["cloudckpt_restore_of_orbax"].append(cc_s)
                if rep == 0:
                    objects["orbax"] = object_stats(list_objects(url), nbytes)
                    verified["orbax"] = bool(ok)
                    verified["cloudckpt_reads_orbax"] = same_values(state, restored)
                del restored
                gc.collect()
                remove(url)
            ctx.log(
                f"{target.name} rep {rep}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v)
            )
    finally:
        cc.close()
        if peer is not None:
            peer.close()
    med = {k: median(v) for k, v in times.items()}
    mib = nbytes / (1 << 20)
    # The raw channel (aiobotocore) is one of the tools: the best of all of them.
    tool_put = {"aiobotocore": med["raw_put"], **{t: med[f"tool_put:{t}"] for t in tools}}
    tool_get = {"aiobotocore": med["raw_get"], **{t: med[f"tool_get:{t}"] for t in tools}}
    return {
        "times": {k: samples(v) for k, v in times.items() if v},
        "save_vs_raw": ratio(med["save"], med["raw_put"]),
        "restore_vs_raw": ratio(med["restore"], med["raw_get"]),
        "tools": (
            {
                "put_s": tool_put,
                "get_s": tool_get,
                "save_vs_best_tool": ratio(med["save"], min(tool_put.values())),
                "restore_vs_best_tool": ratio(med["restore"], min(tool_get.values())),
            }
            if tools
            else {}
        ),
        "save_vs_copy_plus_raw": ratio(med["save"], med["copy"] + med["raw_put"]),
        "save_vs_engine": ratio(med["save"], med["engine_save"]),
        "restore_vs_engine": ratio(med["restore"], med["engine_restore"]),
        "engine_save_vs_raw": ratio(med["engine_save"], med["raw_put"]),
        "engine_restore_vs_raw": ratio(med["engine_restore"], med["raw_get"]),
        "save_vs_orbax": ratio(med["save"], med["orbax_save"]),
        "restore_vs_orbax": ratio(med["restore"], med["orbax_restore"]),
        "orbax_save_vs_raw": ratio(med["orbax_save"], med["raw_put"]),
        "orbax_restore_vs_raw": ratio(med["orbax_restore"], med["raw_get"]),
        "orbax_step_restore_cloudckpt_vs_orbax": ratio(
            med["cloudckpt_restore_of_orbax"], med["orbax_restore"]
        ),
        "MiBps": {k: ratio(mib, v) for k, v in med.items() if k != "copy"},
        "engine_bytes": engine_bytes,
        "objects": objects,
        "verified": verified,
    }


@scenario("throughput", order=10)
def throughput(ctx: Context) -> dict[str, Any]:
    state = ctx.main_tree()
    abstract = tree.abstract_target(state)
    leaves = tree.jax_leaves(state)
    out: dict[str, Any] = {
        "tree": {
            "bytes": tree.tree_nbytes(state),
            "leaves": len(tree.all_leaves(state)),
            "arrays": len(leaves),
            "mesh": dict(ctx.mesh.shape),
        },
        "backends": {},
    }
    for target in ctx.targets:
        ctx.log(f"throughput on {target.name}")
        out["backends"][target.name] = run_backend(ctx, target, state, abstract)
    return out
