"""One process of a multi-process restore of an Orbax step (see tests/test_orbax.py).

Run as ``python -m tests.orbax_mp_worker '<json spec>'``; prints ``RESULT <json>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from cloudckpt.testing.jobs import leave_job


def main(spec: dict[str, Any]) -> None:
    from tests.mp_worker import join_job

    join_job(spec)
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import cloudckpt as cc

    data = np.load(Path(spec["fixtures"]) / "expected.npz")
    step = spec["step"]
    want = {
        "w": data[f"{step}['params']['dense']['w']"],
        "embed": data[f"{step}['params']['embed']"].view(ml_dtypes.bfloat16),
    }
    mesh = Mesh(np.array(jax.devices()).reshape(4, -1), ("x", "y"))
    target = {
        "params": {
            "dense": {
                "w": jax.ShapeDtypeStruct(
                    (8, 12), np.float32, sharding=NamedSharding(mesh, P("x", "y"))
                )
            },
            "embed": jax.ShapeDtypeStruct(
                (16, 4), ml_dtypes.bfloat16, sharding=NamedSharding(mesh, P(("x", "y")))
            ),
        }
    }
    options = cc.CheckpointManagerOptions(enable_async=False)
    with cc.CheckpointManager(spec["url"], options=options) as mngr:
        steps = mngr.all_steps()
        got = mngr.restore(step, args=cc.args.Composite(state=cc.args.StandardRestore(target)))
    checked = 0
    for name, array in (
        ("w", got.state["params"]["dense"]["w"]),
        ("embed", got.state["params"]["embed"]),
    ):
        for shard in array.addressable_shards:
            assert np.asarray(shard.data).tobytes() == want[name][shard.index].tobytes(), name
            checked += shard.data.size
    result = {"process": spec["process_id"], "steps": steps, "checked": checked}
    print("RESULT " + json.dumps(result), flush=True)
    leave_job()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
