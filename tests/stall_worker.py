"""Save and restore one tree in its own process, with short deadlines: the straggler test's client.

Run as ``python -m tests.stall_worker URL FLOOR_S [ATTEMPTS [HEDGE_FLOOR_S]]`` with the client
environment pointing at a :class:`cloudckpt.testing.stallproxy.StallProxy`. A
separate process because tensorstore reads its stall bound (and its GCS
endpoint) once per process, at its first HTTP request. Prints one JSON line:
``{"save_s", "restore_s", "equal"}``, or ``{"error": type, "message": text}``
when a save or restore failed (exit status 3).
"""

from __future__ import annotations

import json
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

import cloudckpt as cc  # noqa: E402

#: Arrays stored as zarr (each shard at least ``pack_below_bytes``) and leaves packed together.
ARRAYS = 40
SMALL = 20


def make_tree() -> dict[str, object]:
    mesh = jax.make_mesh((8,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    rng = np.random.default_rng(14)
    tree: dict[str, object] = {
        f"w{i:02d}": jax.device_put(rng.standard_normal((64, 128), np.float32), sharding)
        for i in range(ARRAYS)
    }
    tree.update({f"s{i:02d}": rng.standard_normal((16,), np.float32) for i in range(SMALL)})
    return tree


def target_of(tree: dict[str, object]) -> dict[str, object]:
    """What a restore of ``tree`` asks for: each array's shape, dtype and sharding."""
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
            if isinstance(x, jax.Array)
            else x
        ),
        tree,
    )


def checkpointer(floor_s: float) -> cc.Checkpointer:
    hedge_floor_s = float(sys.argv[4]) if len(sys.argv) > 4 else floor_s / 4
    deadlines = cc.storage.Deadlines(
        floor_s=floor_s, min_rate_bps=64 * 1024, hedge_floor_s=hedge_floor_s, hedge_rate_bps=8 << 20
    )
    retry = cc.RetryPolicy(
        max_attempts=int(sys.argv[3]) if len(sys.argv) > 3 else 10,
        initial_backoff_s=0.05,
        max_backoff_s=0.5,
        max_total_s=120,
    )
    # Shards of 4 KiB: zarr objects, not packed, so every array is its own requests.
    handler = cc.StandardCheckpointHandler(pack_below_bytes=1024)
    return cc.Checkpointer(handler, storage_options={"deadlines": deadlines, "retry": retry})


def main(url: str, floor_s: float) -> dict[str, object]:
    tree = make_tree()
    target = target_of(tree)
    ckpt = checkpointer(floor_s)
    try:
        start = time.monotonic()
        ckpt.save(url, args=cc.args.StandardSave(tree))
        save_s = time.monotonic() - start
        start = time.monotonic()
        restored = ckpt.restore(url, args=cc.args.StandardRestore(target))
        restore_s = time.monotonic() - start
    finally:
        ckpt.close()
    equal = all(np.array_equal(np.asarray(tree[k]), np.asarray(restored[k])) for k in tree) and set(
        tree
    ) == set(restored)
    return {"save_s": save_s, "restore_s": restore_s, "equal": equal}


if __name__ == "__main__":
    try:
        result = main(sys.argv[1], float(sys.argv[2]))
    except Exception as exc:  # reported to the test, which asserts on it
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        sys.exit(3)
    print(json.dumps(result))
