"""One process of tests/test_replica_parallel.py, joined to the others by jax.distributed.

``python -m tests.mp_replica_worker SPEC_JSON`` with SPEC as in tests/mp_worker.py
plus ``endpoints`` (one S3 endpoint per process: each talks to the server
through its own counting proxy) and ``saves`` or ``restores``: lists of
``[url, state, replica_parallel]`` / ``[url, state]``, where ``state`` names
one of :data:`STATES`. Scenario ``save`` saves each state on a
``(processes, devices)`` ``("data", "model")`` mesh, so that ``data`` spans
processes; ``restore`` reads each URL onto a ``(2, 2)`` mesh with other
specs and checks every addressable byte. Prints one ``RESULT <json>`` line.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import numpy as np

from cloudckpt.testing.jobs import leave_job

# name -> (shape, dtype, saved spec, restored spec). "data" spans processes on save.
Spec = tuple[str | None, ...]
REPLICATED: dict[str, tuple[tuple[int, ...], str, Spec, Spec]] = {
    "w1": ((2048, 1024), "float32", (), ("b", "a")),
    "w2": ((1024, 2048), "bfloat16", (), ("a", None)),
    "emb": ((3000, 1024), "float32", (), (None, "b")),  # 3000 rows: not a power of two
    "proj": ((1024, 1536), "float32", (), ("a", "b")),
    **{f"norm{k}": ((1024,), "float32", (), ("a",)) for k in range(12)},  # packed
    "count": ((), "int32", (), ()),
}
MIXED: dict[str, tuple[tuple[int, ...], str, Spec, Spec]] = {
    "w": ((2048, 1024), "float32", ("data", None), ("b", "a")),  # one owner per row block
    "emb": ((3000, 1024), "float32", (None, "model"), ("a", None)),  # replicated over data
    "mlp": ((1024, 1536), "float32", (), ("a", "b")),  # fully replicated
    "bias": ((1024,), "float32", ("model",), ("b",)),  # small, replicated over data
    **{f"norm{k}": ((512,), "float32", (), ()) for k in range(8)},
}
STATES = {"replicated": REPLICATED, "mixed": MIXED}


def expected(state: str) -> dict[str, np.ndarray]:
    """The global values every topology saves and checks against."""
    import ml_dtypes

    out = {}
    for k, (name, (shape, dtype, _, _)) in enumerate(sorted(STATES[state].items())):
        raw = (np.arange(math.prod(shape), dtype=np.int64) * (2 * k + 3)) % 65521
        dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        out[name] = (raw.astype(np.float64) / 7).astype(dt).reshape(shape)
    return out


def _mesh(shape: tuple[int, int], names: tuple[str, str]) -> Any:
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()).reshape(shape), names)


def build(state: str, mesh: Any) -> dict[str, Any]:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    values = expected(state)
    return {
        name: jax.make_array_from_callback(
            v.shape, NamedSharding(mesh, P(*STATES[state][name][2])), lambda i, v=v: v[i]
        )
        for name, v in values.items()
    }


def check(state: str, restored: dict[str, Any]) -> int:
    """Compares every addressable shard bit-exactly; returns bytes checked."""
    checked = 0
    for name, want in expected(state).items():
        for shard in restored[name].addressable_shards:
            got = np.asarray(shard.data)
            if got.dtype != want.dtype or got.tobytes() != want[shard.index].tobytes():
                raise AssertionError(f"{state} {name} differs at {shard.index}")
            checked += got.nbytes
    return checked


def scenario_save(spec: dict[str, Any], result: dict[str, Any]) -> None:
    import jax

    import cloudckpt as cc

    mesh = _mesh((jax.process_count(), jax.local_device_count()), ("data", "model"))
    for url, state, replica_parallel in spec["saves"]:
        handler = cc.StandardCheckpointHandler(replica_parallel=replica_parallel)
        with cc.Checkpointer(handler) as ckptr:
            ckptr.save(url, args=cc.args.StandardSave(build(state, mesh)))
        result[url] = "saved"


def scenario_restore(spec: dict[str, Any], result: dict[str, Any]) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import cloudckpt as cc

    mesh = _mesh((2, jax.device_count() // 2), ("a", "b"))
    for url, state in spec["restores"]:
        target = {
            name: jax.ShapeDtypeStruct(
                v.shape, v.dtype, sharding=NamedSharding(mesh, P(*STATES[state][name][3]))
            )
            for name, v in expected(state).items()
        }
        with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
            restored = ckptr.restore(url, args=cc.args.StandardRestore(target))
        result[url] = check(state, restored)


def main(spec: dict[str, Any]) -> None:
    if spec.get("endpoints"):
        os.environ["AWS_ENDPOINT_URL"] = spec["endpoints"][spec["process_id"]]
    import jax

    from tests.mp_worker import join_job

    join_job(spec)
    result: dict[str, Any] = {"process": jax.process_index()}
    {"save": scenario_save, "restore": scenario_restore}[spec["scenario"]](spec, result)
    print("RESULT", json.dumps(result), flush=True)
    if spec["num_processes"] > 1:
        leave_job()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
