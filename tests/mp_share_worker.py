"""One process of tests/test_share_reads.py, joined to the others by jax.distributed.

``python -m tests.mp_share_worker SPEC_JSON`` with SPEC as in
tests/mp_replica_worker.py (``endpoints``: one S3 endpoint per process, each
through its own counting proxy) plus ``restores``: a list of
``[url, state, share_reads]``. Each state (:data:`tests.mp_replica_worker.STATES`)
is restored onto a ``(processes, devices)`` ``("data", "model")`` mesh with
the specs it was saved with, so replicated leaves are needed by every
process; every addressable byte is compared with the expected values. Prints
one ``RESULT <json>`` line: bytes checked per URL (with ``errors_expected``,
a restore that raises reports ``{"error": type, "message": text}`` instead).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from cloudckpt.testing.jobs import leave_job


def restore_all(spec: dict[str, Any], result: dict[str, Any]) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import cloudckpt as cc
    from tests.mp_replica_worker import STATES, _mesh, check, expected

    mesh = _mesh((jax.process_count(), jax.local_device_count()), ("data", "model"))
    for url, state, share in spec["restores"]:
        target = {
            name: jax.ShapeDtypeStruct(
                v.shape, v.dtype, sharding=NamedSharding(mesh, P(*STATES[state][name][2]))
            )
            for name, v in expected(state).items()
        }
        with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
            try:
                restored = ckptr.restore(
                    url, args=cc.args.StandardRestore(target, share_reads=share)
                )
            except Exception as exc:  # reported, for tests that expect it
                if not spec.get("errors_expected"):
                    raise
                result[url] = {"error": type(exc).__name__, "message": str(exc)}
                continue
        result[url] = check(state, restored)


def main(spec: dict[str, Any]) -> None:
    os.environ["AWS_ENDPOINT_URL"] = spec["endpoints"][spec["process_id"]]
    import jax

    from tests.mp_worker import join_job

    join_job(spec)
    result: dict[str, Any] = {"process": jax.process_index()}
    restore_all(spec, result)
    print("RESULT", json.dumps(result), flush=True)
    if spec["num_processes"] > 1:
        leave_job()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
