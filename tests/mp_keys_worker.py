"""One process of a multi-process typed-PRNG-key test (tests/test_prng_keys.py).

``python -m tests.mp_keys_worker SPEC_JSON`` with SPEC: process_id,
num_processes, devices (per process), port, url. Saves sharded key batches of
every implementation from all processes, restores them onto another mesh,
checks each process's own shards, and prints one ``RESULT <json>`` line.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from cloudckpt.testing.jobs import leave_job

IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def expected_key_data(impl: str) -> np.ndarray:
    """The global key data every process saves: the same on each, computed locally."""
    import jax

    with jax.default_device(jax.local_devices()[0]):
        keys = jax.random.split(jax.random.key(IMPLS.index(impl), impl=impl), (16, 4))
        return np.asarray(jax.random.key_data(keys))


def global_keys(impl: str, mesh: Any, spec: tuple[Any, ...]) -> Any:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    data = expected_key_data(impl)
    sharding = NamedSharding(mesh, P(*spec, None))  # the key data's trailing dim unsharded
    array = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
    return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl))(array)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import cloudckpt as cc

    devices = np.array(jax.devices())
    mesh = Mesh(devices.reshape(4, 2), ("data", "model"))
    state = {impl: global_keys(impl, mesh, ("data", "model")) for impl in IMPLS}
    options = cc.CheckpointManagerOptions(
        multiprocessing_options=cc.MultiprocessingOptions(barrier_timeout_s=60)
    )
    with cc.CheckpointManager(spec["url"], options=options) as mngr:
        mngr.save(1, args=cc.args.Composite(state=cc.args.StandardSave(state)))
        mngr.wait_until_finished()
        other = Mesh(devices[::-1].reshape(2, 4), ("x", "y"))
        target = {
            impl: jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=NamedSharding(other, P("y", "x")))
            for impl, k in state.items()
        }
        restored = mngr.restore(1, args=cc.args.Composite(state=cc.args.StandardRestore(target)))
    checked = 0
    for impl, keys in restored.state.items():
        assert keys.dtype == state[impl].dtype and keys.sharding == target[impl].sharding
        want = expected_key_data(impl)
        for shard in keys.addressable_shards:
            got = np.asarray(jax.random.key_data(shard.data))
            np.testing.assert_array_equal(got, want[shard.index])
            checked += got.size
    return {"process": jax.process_index(), "checked_words": checked}


def main(spec: dict[str, Any]) -> None:
    from tests.mp_worker import join_job

    join_job(spec)
    result = run(spec)
    print("RESULT", json.dumps(result), flush=True)
    leave_job()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
