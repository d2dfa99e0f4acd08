"""A training loop that saves every step, for the crash campaign to SIGKILL.

Run as ``python -m tests.crash_worker URL FIRST_STEP PHASE`` (the campaign
forks it from ``tests/zygote.py``, where JAX is already imported). It prints
one line per event (``COPY n``, ``WRITES n``, ``FINALIZE n``, ``COMMITTED n``),
flushed, so the parent can kill it at a chosen instant of a chosen save. The
phase named on the command line is stretched by a sleep so that a kill lands
inside it, in every save but the first: that one must commit, and stretching
it only made each kill 3 s longer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import cloudckpt as cc  # noqa: E402

#: The phase to stretch, set by main() from the command line.
PHASE = ""
#: The first step this worker saves (from the command line): it must commit, so its
#: phases are never stretched; the parent kills a later save.
FIRST = 0
STRETCH_S = 3.0


def emit(event: str, step: int) -> None:
    print(f"{event} {step}", flush=True)


class TracerHandler(cc.AsyncCheckpointHandler):
    """An item that reports the phases of each save (and stretches one of them)."""

    def async_save(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs
    ) -> list[Awaitable[None]]:
        assert isinstance(args, TraceSave)
        emit("COPY", args.step)
        if PHASE == "copy" and args.step > FIRST:
            time.sleep(STRETCH_S)
        return [self._write(directory, args.step)]

    async def _write(self, directory: cc.StoragePath, step: int) -> None:
        emit("WRITES", step)
        await directory.backend.put((directory / "step").path, str(step).encode())

    async def finalize(self, directory: cc.StoragePath) -> None:
        step = int((await directory.backend.get((directory / "step").path)) or b"-1")
        emit("FINALIZE", step)
        if PHASE == "marker" and step > FIRST:
            time.sleep(STRETCH_S)

    async def restore(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs | None = None
    ) -> Any:
        data = await directory.backend.get((directory / "step").path)
        return None if data is None else int(data)


@cc.register_with_handler(TracerHandler, for_save=True)
@dataclass(frozen=True)
class TraceSave(cc.CheckpointArgs):
    step: int


@cc.register_with_handler(TracerHandler, for_restore=True)
@dataclass(frozen=True)
class TraceRestore(cc.CheckpointArgs):
    pass


TracerHandler.default_restore_args = TraceRestore


def expected_state(step: int) -> dict[str, Any]:
    """The train state of ``step``, as host values."""
    return {
        # 16 MiB in eight 2 MiB shards: eight chunk objects, so kills land mid-way.
        "big": np.arange(2048 * 2048, dtype=np.float32).reshape(2048, 2048) + step,
        "small": [np.full((16,), step + i, np.int32) for i in range(20)],
        "step": step,
    }


def device_state(step: int) -> dict[str, Any]:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    state = expected_state(step)
    state["big"] = jax.device_put(state["big"], NamedSharding(mesh, P("data", "model")))
    return state


OPTIONS = {"max_to_keep": 2}


def main(argv: list[str]) -> None:
    global PHASE, FIRST
    url, first, PHASE = argv[0], int(argv[1]), argv[2]
    FIRST = first
    mngr = cc.CheckpointManager(url, options=cc.CheckpointManagerOptions(**OPTIONS))
    latest = mngr.latest_step()
    for step in range(first, first + 1000):
        mngr.save(
            step,
            args=cc.args.Composite(
                state=cc.args.StandardSave(device_state(step)), trace=TraceSave(step)
            ),
        )
        deadline = time.monotonic() + 60
        while mngr.latest_step() == latest and time.monotonic() < deadline:
            time.sleep(0.002)
        latest = mngr.latest_step()
        emit("COMMITTED", step)
    mngr.close()


if __name__ == "__main__":
    # Run the copy imported as tests.crash_worker, so that the handler's recorded
    # type names a module other processes can import.
    from tests import crash_worker

    crash_worker.main(sys.argv[1:])
