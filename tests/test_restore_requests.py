"""How many requests a restore makes per chunk object, and in what order (issue 18), at S3.

Requests go through a fault-free ``FaultProxy`` in front of SeaweedFS, which
logs every request it forwards. A restore onto the saved sharding reads each
chunk object whole, once. A restore onto another mesh cuts through chunk
objects; its regions are read in one tensorstore batch, so each object's
shard index and inner chunks are fetched once for all the regions sharing
it, not once per region. The packed small leaves are read beside the arrays,
not before them: a proxy holds the pack's GET until an array's GET arrives.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.testing.faultproxy import FaultProxy, LoopbackProxy
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


class PackHoldingProxy(LoopbackProxy):
    """Forwards to S3, holding each GET of a pack object until a chunk's GET has arrived.

    ``events`` lists ``(what, kind)`` in order: ``asked`` when a GET arrives,
    ``answered`` when its answer goes back; ``kind`` is ``pack``, ``chunk`` or
    ``other``. A pack GET is held ``hold_s`` at most, so a restore that waits
    for its packs before it reads arrays still ends (late, and in the wrong order).
    """

    def __init__(self, upstream: str, hold_s: float = 5.0) -> None:
        super().__init__(upstream, "s3")
        self.hold_s = hold_s
        self.events: list[tuple[str, str]] = []  # appended on the proxy's one loop thread
        self._chunk_asked: asyncio.Event | None = None

    async def _handle(self, request: Any) -> Any:
        body = await request.read()
        path = request.path
        kind = "pack" if "/packs/" in path else "chunk" if "/c/" in path else "other"
        if self._chunk_asked is None:
            self._chunk_asked = asyncio.Event()
        is_get = request.method == "GET"
        if is_get:
            self.events.append(("asked", kind))
            if kind == "chunk":
                self._chunk_asked.set()
            if kind == "pack":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._chunk_asked.wait(), self.hold_s)
        answer = await self._pass_through(request, body)
        if is_get:
            self.events.append(("answered", kind))
        return self._respond(request.method, *answer)

    def reset(self) -> None:
        """Forgets the events, and holds the next pack GET again (between restores)."""

        async def clear() -> None:  # on the proxy's loop, where the handlers use them
            self.events.clear()
            self._chunk_asked = None

        asyncio.run_coroutine_threadsafe(clear(), self._loop).result(10)


def test_packed_leaves_are_read_beside_the_arrays(servers: LocalServers) -> None:
    """Reading the packs costs no round trip before the arrays' bytes start to flow."""
    big = np.arange(1024 * 256, dtype=np.float32).reshape(1024, 256)
    small = {f"b{i}": np.full((16,), i, np.int32) for i in range(8)}  # packed
    sharding = NamedSharding(_mesh((4, 2)), P("data", "model"))
    tree = {"w": jax.device_put(big, sharding), **small}
    with PackHoldingProxy(servers.s3.endpoint) as proxy:
        url = f"s3://{BUCKET}/{unique('pack-order')}"
        options = {
            "endpoint_url": proxy.endpoint,
            "deadlines": Deadlines(hedge=False, cut_min_s=60),  # the held GET is not cut
        }
        handler = cc.StandardCheckpointHandler(pack_below_bytes=4096)  # ``w`` is an array
        with cc.Checkpointer(handler, storage_options=options) as ckptr:
            ckptr.save(url, args=cc.args.StandardSave(tree))
            target = {
                "w": jax.ShapeDtypeStruct(big.shape, big.dtype, sharding=sharding),
                **{k: np.zeros_like(v) for k, v in small.items()},
            }
            for name, args in (
                ("onto shardings", cc.args.StandardRestore(target)),
                ("to the host", cc.args.StandardRestore()),
            ):
                proxy.reset()
                out = ckptr.restore(url, args=args)
                np.testing.assert_array_equal(np.asarray(out["w"]), big)
                for k, v in small.items():
                    np.testing.assert_array_equal(np.asarray(out[k]), v)
                events = list(proxy.events)
                assert ("asked", "pack") in events, (name, events)
                first_chunk = events.index(("asked", "chunk"))
                assert first_chunk < events.index(("answered", "pack")), (name, events)
