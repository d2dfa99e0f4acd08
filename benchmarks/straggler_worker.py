"""One process of the straggler scenario: save and restore a tree, timed, with given deadlines.

``python -m benchmarks.straggler_worker '{"url": ..., "size_mib": ..., "floor_s": ..., "reps": ...}'``
with the client environment pointing at the scenario's proxy. A process of its
own because tensorstore reads its stall bound once per process. Prints one
JSON line: ``{"save_s": [...], "restore_s": [...], "equal": bool}``.
"""

from __future__ import annotations

import json
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import cloudckpt as cc  # noqa: E402
from benchmarks import tree  # noqa: E402
from benchmarks.ops import same_values  # noqa: E402


def main(spec: dict) -> dict:
    floor_s = float(spec["floor_s"])
    deadlines = cc.backends.Deadlines(floor_s=floor_s, hedge_floor_s=floor_s / 4)
    ckpt = cc.Checkpointer(
        cc.CompositeCheckpointHandler(), storage_options={"deadlines": deadlines}
    )
    mesh = tree.make_mesh()
    state = tree.model_tree(float(spec["size_mib"]), mesh)
    target = tree.abstract_target(state)
    saves, restores, equal = [], [], True
    try:
        ckpt.save(
            f"{spec['url']}/warmup", args=cc.args.Composite(state=cc.args.StandardSave(state))
        )
        for rep in range(int(spec["reps"])):
            url = f"{spec['url']}/rep{rep}"
            start = time.perf_counter()
            ckpt.save(url, args=cc.args.Composite(state=cc.args.StandardSave(state)))
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            restored = ckpt.restore(
                url, args=cc.args.Composite(state=cc.args.StandardRestore(target))
            )["state"]
            jax.block_until_ready(restored)
            restores.append(time.perf_counter() - start)
            equal = equal and same_values(state, restored)
            del restored
    finally:
        ckpt.close()
    return {"save_s": saves, "restore_s": restores, "equal": equal}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
