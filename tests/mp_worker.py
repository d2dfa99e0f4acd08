"""One process of a multi-process test, joined to the others by jax.distributed.

``python -m tests.mp_worker SPEC_JSON`` with SPEC: process_id, num_processes,
devices (per process), port, scenario, urls, and scenario options. Prints
``EVENT ...`` lines as it goes and one ``RESULT <json>`` line at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudckpt.testing.jobs import leave_job

SPEC: dict[str, Any] = {}


def emit(*words: Any) -> None:
    print(*words, flush=True)


def expected_arrays() -> dict[str, np.ndarray]:
    """The global train state every topology saves or checks against."""
    import ml_dtypes

    return {
        "w": (np.arange(64 * 512, dtype=np.float32).reshape(64, 512) / 7).astype(np.float32),
        "emb": (np.arange(128 * 256, dtype=np.float32).reshape(128, 256) % 97).astype(
            ml_dtypes.bfloat16
        ),
        "b": np.arange(512, dtype=np.int32),
        "big": np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024),  # 4 MiB: zarr chunks
    }


SPECS = {"w": ("data", "model"), "emb": (None, "model"), "b": ("model",), "big": ("data", None)}


def build_mesh() -> Any:
    import jax
    from jax.sharding import Mesh

    devices = np.array(jax.devices())
    model = 2 if devices.size % 2 == 0 else 1
    return Mesh(devices.reshape(devices.size // model, model), ("data", "model"))


def sharded_state(mesh: Any) -> dict[str, Any]:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    out = {}
    for name, value in expected_arrays().items():
        sharding = NamedSharding(mesh, P(*SPECS[name]))
        out[name] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
    return out


def targets(mesh: Any) -> dict[str, Any]:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    return {
        name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, P(*SPECS[name])))
        for name, v in expected_arrays().items()
    }


def check_restored(restored: dict[str, Any]) -> int:
    """Compares every addressable shard bit-exactly; returns bytes checked."""
    checked = 0
    for name, value in expected_arrays().items():
        array = restored[name]
        for shard in array.addressable_shards:
            got = np.asarray(shard.data)
            want = value[shard.index]
            if got.tobytes() != want.tobytes():
                raise AssertionError(f"{name} differs at {shard.index}")
            checked += got.nbytes
    return checked


# --------------------------------------------------------------------------- fault items
def _cc() -> Any:
    import cloudckpt as cc

    return cc


def _define_fault_handler() -> tuple[type, type]:
    cc = _cc()
    import jax

    class FaultHandler(cc.AsyncCheckpointHandler):
        """A small item whose write or finalize misbehaves on a chosen process."""

        def async_save(self, directory: Any, args: Any) -> list[Awaitable[None]]:
            self.stall_finalize = args.stall_finalize_on == jax.process_index()
            return [self._write(directory, args)]

        async def _write(self, directory: Any, args: Any) -> None:
            me = jax.process_index()
            emit("EVENT WRITES", me)
            if args.raise_on == me:
                raise OSError(f"injected failure on process {me}")
            if args.stall_on == me:
                time.sleep(60)  # the parent kills this process now
            await directory.backend.put((directory / f"p{me}").path, b"ok")

        async def finalize(self, directory: Any) -> None:
            me = jax.process_index()
            emit("EVENT FINALIZE", me)
            if self.stall_finalize:
                time.sleep(60)  # between the last write and the marker: the parent kills us

        async def restore(self, directory: Any, args: Any = None) -> Any:
            return "ok"

    @cc.register_with_handler(FaultHandler, for_save=True)
    @dataclass(frozen=True)
    class FaultSave(cc.CheckpointArgs):
        raise_on: int | None = None
        stall_on: int | None = None
        stall_finalize_on: int | None = None

    @cc.register_with_handler(FaultHandler, for_restore=True)
    @dataclass(frozen=True)
    class FaultRestore(cc.CheckpointArgs):
        pass

    FaultHandler.default_restore_args = FaultRestore
    return FaultHandler, FaultSave


# ---------------------------------------------------------------------------- scenarios
def scenario_save(result: dict[str, Any]) -> None:
    """Save two steps per URL, restore the latest on this topology, check it."""
    import jax

    cc = _cc()
    mesh = build_mesh()
    options = cc.CheckpointManagerOptions(
        max_to_keep=1,
        multiprocessing_options=cc.MultiprocessingOptions(
            barrier_timeout_s=SPEC.get("barrier_s", 60)
        ),
    )
    extra = None
    if SPEC.get("extra_checkpointer_on") == jax.process_index():
        # A checkpointer only this process creates (and never saves with) must not
        # shift the identities every process agrees on for the manager's saves.
        extra = cc.Checkpointer(cc.CompositeCheckpointHandler())
    for url in SPEC["urls"]:
        state = sharded_state(mesh)
        start = time.perf_counter()
        with cc.CheckpointManager(url, options=options) as mngr:
            for step in (1, 2):
                mngr.save(
                    step,
                    args=cc.args.Composite(
                        state=cc.args.StandardSave(state), meta=cc.args.JsonSave({"step": step})
                    ),
                )
            mngr.wait_until_finished()
            saved_s = time.perf_counter() - start
            steps = mngr.all_steps()
            restored = mngr.restore(
                2, args=cc.args.Composite(state=cc.args.StandardRestore(targets(mesh)))
            )
            checked = check_restored(restored.state)
            backend = mngr.directory.backend
            result[url] = {
                "steps": steps,
                "save_s": saved_s,
                "checked_bytes": checked,
                "meta": restored.meta if "meta" in restored else None,
                "calls": dict(backend.stats.calls),
                "process": jax.process_index(),
            }
    if extra is not None:
        extra.close()


def scenario_restore(result: dict[str, Any]) -> None:
    """Restore the latest step of each URL onto this topology."""
    cc = _cc()
    mesh = build_mesh()
    for url in SPEC["urls"]:
        with cc.CheckpointManager(
            url, options=cc.CheckpointManagerOptions(cleanup_uncommitted_on_start=False)
        ) as mngr:
            start = time.perf_counter()
            restored = mngr.restore(
                args=cc.args.Composite(state=cc.args.StandardRestore(targets(mesh)))
            )
            result[url] = {
                "step": mngr.latest_step(),
                "restore_s": time.perf_counter() - start,
                "checked_bytes": check_restored(restored.state),
            }


def scenario_fault(result: dict[str, Any]) -> None:
    """Step 1 commits; step 2 meets the fault named in SPEC; report what each process saw."""
    cc = _cc()
    _, fault_save = _define_fault_handler()
    mesh = build_mesh()
    url = SPEC["urls"][0]
    options = cc.CheckpointManagerOptions(
        multiprocessing_options=cc.MultiprocessingOptions(
            barrier_timeout_s=SPEC.get("barrier_s", 30)
        ),
        cleanup_uncommitted_on_start=False,
    )
    mngr = cc.CheckpointManager(url, options=options)
    state = sharded_state(mesh)
    mngr.save(1, args=cc.args.Composite(state=cc.args.StandardSave(state), fault=fault_save()))
    mngr.wait_until_finished()
    emit("EVENT COMMITTED 1")
    fault = fault_save(
        raise_on=SPEC.get("raise_on"),
        stall_on=SPEC.get("stall_on"),
        stall_finalize_on=SPEC.get("stall_finalize_on"),
    )
    mngr.save(2, args=cc.args.Composite(state=cc.args.StandardSave(state), fault=fault))
    try:
        mngr.wait_until_finished()
        result["error"] = None
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["steps"] = mngr.all_steps()


def scenario_leave(result: dict[str, Any]) -> None:
    """Only what every job does before leaving: a key-value exchange and a collective."""
    from jax.experimental import multihost_utils

    result["agreed"] = int(multihost_utils.broadcast_one_to_all(np.int32(7 + SPEC["process_id"])))


def scenario_late(result: dict[str, Any]) -> None:
    """Every process meets once; process 1 arrives ``late_s`` after the others."""
    import asyncio

    from cloudckpt.engine.multihost import ProcessGroup

    group = ProcessGroup()
    if group.process_index == 1:
        time.sleep(SPEC["late_s"])
    start = time.monotonic()
    asyncio.run(group.sync("late-peer", "met"))
    result["waited_s"] = time.monotonic() - start


def join_job(spec: dict[str, Any]) -> None:
    """Configures this process's CPU devices and joins the others (jax.distributed, gloo)."""
    import jax

    jax.config.update("jax_num_cpu_devices", spec["devices"])
    if spec["num_processes"] > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{spec['port']}",
            num_processes=spec["num_processes"],
            process_id=spec["process_id"],
            heartbeat_timeout_seconds=spec.get("heartbeat_s", 10),
            initialization_timeout=60,
        )


def main(spec: dict[str, Any]) -> None:
    SPEC.update(spec)
    import jax

    join_job(spec)
    result: dict[str, Any] = {"process": spec["process_id"], "devices": jax.device_count()}
    scenarios = {
        "save": scenario_save,
        "restore": scenario_restore,
        "fault": scenario_fault,
        "late": scenario_late,
        "leave": scenario_leave,
    }
    scenarios[spec["scenario"]](result)
    emit("RESULT", json.dumps(result, default=str))
    if spec["scenario"] == "fault":
        os._exit(0)  # a peer may be gone: skip jax.distributed's shutdown barrier
    if spec["num_processes"] > 1:
        leave_job()


if __name__ == "__main__":
    from tests import mp_worker

    mp_worker.main(json.loads(sys.argv[1]))
