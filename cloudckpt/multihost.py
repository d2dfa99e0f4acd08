"""Coordination between the processes of one job, through jax.distributed.

cloudckpt adds no coordinator of its own. With ``jax.distributed`` initialised,
barriers and error reports go through JAX's distributed client (its
key-value store), with keys namespaced per save. Without it (one process),
every operation is free: no barrier, no key-value traffic.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

_POLL_S = 0.02


def _distributed_client():  # type: ignore[no-untyped-def]
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - jax always ships it
        return None
    return distributed.global_state.client


class ProcessFailedError(RuntimeError):
    """Another process of the job failed its part of a save (or never reported)."""


@dataclass(frozen=True)
class MultiprocessingOptions:
    """Which processes take part in saves, and which one commits.

    Attributes:
        primary_host: The process that creates, finalizes, deletes and cleans up.
        active_processes: Processes taking part in saves (None: all). The
            primary must be among them.
        barrier_timeout_s: How long a process waits for the others at a barrier.
    """

    primary_host: int = 0
    active_processes: frozenset[int] | None = None
    barrier_timeout_s: float = 600.0


class ProcessGroup:
    """The processes taking part in checkpointing, and how they synchronise."""

    def __init__(self, options: MultiprocessingOptions | None = None) -> None:
        import jax

        self.options = options or MultiprocessingOptions()
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        active = self.options.active_processes
        self.members: tuple[int, ...] = (
            tuple(sorted(active)) if active else tuple(range(self.process_count))
        )
        if self.options.primary_host not in self.members:
            raise ValueError(
                f"primary_host {self.options.primary_host} is not among the active processes "
                f"{list(self.members)}"
            )
        self._client = _distributed_client() if len(self.members) > 1 else None
        if len(self.members) > 1 and self._client is None:
            raise RuntimeError(
                "several processes are active but jax.distributed is not initialised; call "
                "jax.distributed.initialize() first"
            )
        self._run_id = self._agree_run_id()
        self._counter = 0
        self._shares = 0

    @property
    def is_primary(self) -> bool:
        return self.process_index == self.options.primary_host

    @property
    def is_member(self) -> bool:
        return self.process_index in self.members

    @property
    def single(self) -> bool:
        return self._client is None

    def _agree_run_id(self) -> str:
        mine = uuid.uuid4().hex[:12]
        if self._client is None:
            return mine
        key = f"cloudckpt/run-id/{self.options.primary_host}/{'-'.join(map(str, self.members))}"
        if self.is_primary:
            self._client.key_value_set(key, mine, allow_overwrite=True)
            self._client.wait_at_barrier(
                key + "/set", int(self.options.barrier_timeout_s * 1000), list(self.members)
            )
            return mine
        self._client.wait_at_barrier(
            key + "/set", int(self.options.barrier_timeout_s * 1000), list(self.members)
        )
        return self._client.blocking_key_value_get(key, int(self.options.barrier_timeout_s * 1000))

    def share(self, name: str, value: Any) -> Any:
        """The primary's ``value`` (JSON), on every member. All members call it in the same order."""
        if self._client is None:
            return value
        self._shares += 1
        key = f"cloudckpt/share/{self._run_id}/{self._shares}/{name}"
        timeout_ms = int(self.options.barrier_timeout_s * 1000)
        if self.is_primary:
            self._client.key_value_set(key, json.dumps(value))
            return value
        return json.loads(self._client.blocking_key_value_get(key, timeout_ms))

    def next_attempt(self) -> str:
        """An id for the next save, the same on every process without communication."""
        self._counter += 1
        return f"{self._run_id}{self._counter:06d}"

    async def sync(self, attempt: str, stage: str, *, error: BaseException | None = None) -> None:
        """Waits until every member has reached ``stage`` of save ``attempt``.

        Each member reports success or its error; if any member failed (or does
        not report within the timeout) every member raises
        :class:`ProcessFailedError` naming the failing processes.
        """
        if self._client is None:
            return
        client = self._client
        prefix = f"cloudckpt/{attempt}/{stage}/"
        status = "ok" if error is None else f"error: {type(error).__name__}: {error}"[:2000]
        await asyncio.to_thread(client.key_value_set, f"{prefix}{self.process_index}", status)
        deadline = time.monotonic() + self.options.barrier_timeout_s
        while True:
            entries = dict(await asyncio.to_thread(client.key_value_dir_get, prefix))
            reports = {int(k.rsplit("/", 1)[-1]): v for k, v in entries.items()}
            failed = {p: v for p, v in reports.items() if v != "ok" and p != self.process_index}
            if failed:
                raise ProcessFailedError(_describe_failures(stage, failed))
            if all(p in reports for p in self.members):
                return
            if time.monotonic() > deadline:
                missing = [p for p in self.members if p not in reports]
                raise ProcessFailedError(
                    f"processes {missing} did not reach '{stage}' within "
                    f"{self.options.barrier_timeout_s:.0f}s (dead or stuck)"
                )
            await asyncio.sleep(_POLL_S)


def _describe_failures(stage: str, failed: dict[int, str]) -> str:
    parts = [f"process {p} {v}" for p, v in sorted(failed.items())]
    return f"save failed at '{stage}' on another process: " + "; ".join(parts)
