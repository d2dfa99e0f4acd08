"""How many requests a restore makes per chunk object (issue 18), counted at a real S3 server.

Requests go through a fault-free ``FaultProxy`` in front of SeaweedFS, which
logs every request it forwards. A restore onto the saved sharding reads each
chunk object whole, once. A restore onto another mesh cuts through chunk
objects; its regions are read in one tensorstore batch, so each object's
shard index and inner chunks are fetched once for all the regions sharing
it, not once per region.
"""

from __future__ import annotations

import collections
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.testing.faultproxy import FaultProxy
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique


def _mesh(shape: tuple[int, int]) -> Mesh:
    return Mesh(np.array(jax.devices()[: math.prod(shape)]).reshape(shape), ("data", "model"))


def _chunk_gets(log: list[tuple[str, str]]) -> collections.Counter[str]:
    return collections.Counter(
        path.split("?")[0].rsplit("/arrays/", 1)[1]
        for method, path in log
        if method == "GET" and "/arrays/" in path and "/c/" in path
    )


def test_each_chunk_object_is_fetched_once_per_restore(servers: LocalServers) -> None:
    value = np.arange(4096 * 1024, dtype=np.float32).reshape(4096, 1024)  # 16 MiB
    saved_sharding = NamedSharding(_mesh((4, 2)), P("data", "model"))  # 8 chunks of 2 MiB
    with FaultProxy(servers.s3.endpoint, fault_rate=0.0) as proxy:
        url = f"s3://{BUCKET}/{unique('requests')}"
        handler = cc.StandardCheckpointHandler(inner_chunk_bytes=256 << 10)  # 8 inner each
        # Counts of requests: none hedged or cut and resent, however loaded the machine.
        options = {
            "endpoint_url": proxy.endpoint,
            "deadlines": Deadlines(hedge=False, cut_min_s=60),
        }
        with cc.Checkpointer(handler, storage_options=options) as ckptr:
            ckptr.save(url, args=cc.args.StandardSave({"x": jax.device_put(value, saved_sharding)}))
            targets = {
                "same mesh": saved_sharding,
                "2x4 mesh": NamedSharding(_mesh((2, 4)), P("data", "model")),
                "transposed": NamedSharding(_mesh((4, 2)), P("model", "data")),
            }
            for name, sharding in targets.items():
                proxy.stats.log.clear()
                out = ckptr.restore(
                    url,
                    args=cc.args.StandardRestore(
                        {"x": jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)}
                    ),
                )
                np.testing.assert_array_equal(np.asarray(out["x"]), value)
                gets = _chunk_gets(proxy.stats.log)
                assert len(gets) == 8, (name, gets)
                # Whole-object reads on the saved mesh; at most the shard index plus one
                # ranged read of the inner chunks on another mesh, whatever the region count.
                limit = 1 if name == "same mesh" else 2
                assert max(gets.values()) <= limit, (name, gets)
