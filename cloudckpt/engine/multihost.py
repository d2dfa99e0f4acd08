"""Coordination between the processes of one job, through jax.distributed.

cloudckpt adds no coordinator of its own. With ``jax.distributed`` initialised,
processes meet and report errors through JAX's distributed client (its
key-value store), with keys namespaced per save so that consecutive and
concurrent saves never cross. Without it (one process) every operation is
free: no barrier, no key-value traffic.

A meeting (``sync``) is a key per process: ``ok`` or the process's error. A
process that reports an error, or whose PID is gone on this host, makes every
other process's save fail at once with :class:`ProcessFailedError` naming it;
one that stays silent fails them after ``barrier_timeout_s``. A process that
dies on another host is detected by JAX's own coordination service (missed
heartbeats), which stops every task of the job. The client's live-node query
is not used: it is a barrier among the live tasks (it returns only once every
one of them has asked), so a process asking while a late peer had already met
it and moved on waited forever.

Identities agree across processes without depending on how many
checkpointers each process happens to create: the job's run id is set once by
process 0; a save's attempt id is a digest of the run id, the checkpoint's path
and how many saves of that path this process has started; a shared value
is keyed by its name and how often that name was shared. Every process of a
job saves the same paths in the same order (a collective save needs that
anyway), so the ids match even when one process creates an extra checkpointer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from atomicity.claims import host_identity, pid_alive

_POLL_MIN_S = 0.002
_POLL_MAX_S = 0.1
_LIVENESS_EVERY_S = 0.5
_RUN_ID_KEY = "cloudckpt/job/run-id"
_PROC_KEY = "cloudckpt/job/proc/"


class _JobState:
    """What one process knows about the job, shared by all its process groups."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.run_id: str | None = None
        self.registered = False
        self.saves: dict[str, int] = {}
        self.shares: dict[str, int] = {}

    def count(self, table: dict[str, int], name: str) -> int:
        with self.lock:
            table[name] = table.get(name, 0) + 1
            return table[name]


_JOB = _JobState()


def _distributed_client() -> Any:
    from jax._src import distributed

    return distributed.global_state.client


class ProcessFailedError(RuntimeError):
    """Another process of the job failed its part of a save (or never reported)."""


@dataclass(frozen=True)
class MultiprocessingOptions:
    """Which processes take part in saves, and which one commits.

    Attributes:
        primary_host: The process that claims, commits, deletes and cleans up.
        active_processes: Processes taking part in saves (None: all). The
            primary must be among them, and every array saved must live on
            their devices only.
        barrier_timeout_s: How long a process waits for the others.
    """

    primary_host: int = 0
    active_processes: frozenset[int] | None = None
    barrier_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.barrier_timeout_s <= 0:
            raise ValueError(f"barrier_timeout_s must be positive, got {self.barrier_timeout_s}")


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
        if any(not 0 <= p < self.process_count for p in self.members):
            raise ValueError(
                f"active_processes {sorted(self.members)} must be process indices below "
                f"{self.process_count}"
            )
        if self.options.primary_host not in self.members:
            raise ValueError(
                f"primary_host {self.options.primary_host} is not among the active processes "
                f"{list(self.members)}"
            )
        self._client = _distributed_client() if self.process_count > 1 else None
        if self.process_count > 1 and self._client is None:
            raise RuntimeError(
                "JAX reports several processes but jax.distributed is not initialised; call "
                "jax.distributed.initialize() first"
            )
        self._timeout_ms = int(self.options.barrier_timeout_s * 1000)
        self._peers: dict[int, tuple[str, int]] = {}
        self._register()
        self._run_id = self._agree_run_id()

    @property
    def is_primary(self) -> bool:
        return self.process_index == self.options.primary_host

    @property
    def is_member(self) -> bool:
        return self.process_index in self.members

    @property
    def single(self) -> bool:
        return self._client is None

    def _register(self) -> None:
        """Publishes where this process runs (once per process), so a peer that died on
        this host is noticed at once rather than after JAX's heartbeat timeout."""
        if self._client is None:
            return
        with _JOB.lock:
            if _JOB.registered:
                return
            self._client.key_value_set(
                f"{_PROC_KEY}{self.process_index}",
                f"{host_identity()} {os.getpid()}",
                allow_overwrite=True,
            )
            _JOB.registered = True

    def _agree_run_id(self) -> str:
        """The job's run id: chosen by process 0 once, read by the others once."""
        with _JOB.lock:
            if _JOB.run_id is not None:
                return _JOB.run_id
            if self._client is None:
                _JOB.run_id = uuid.uuid4().hex[:12]
            elif self.process_index == 0:
                _JOB.run_id = uuid.uuid4().hex[:12]
                self._client.key_value_set(_RUN_ID_KEY, _JOB.run_id, allow_overwrite=True)
            else:
                _JOB.run_id = self._client.blocking_key_value_get(_RUN_ID_KEY, self._timeout_ms)
            return _JOB.run_id

    def next_attempt(self, path: str) -> str:
        """An id for the next save of ``path``, the same on every process without
        communication: every process starts the saves of one path in the same order."""
        n = _JOB.count(_JOB.saves, path)
        # Opaque, and unique in any prefix of it.
        return hashlib.sha256(f"{self._run_id}|{path}|{n}".encode()).hexdigest()[:24]

    def share(self, name: str, value: Any) -> Any:
        """The primary's JSON ``value``, on every process. All call it in the same order
        for the same ``name``."""
        if self._client is None:
            return value
        n = _JOB.count(_JOB.shares, name)
        key = f"cloudckpt/share/{self._run_id}/{name}/{n}"
        if self.is_primary:
            self._client.key_value_set(key, json.dumps(value))
            return value
        return json.loads(self._client.blocking_key_value_get(key, self._timeout_ms))

    async def sync(
        self,
        attempt: str,
        stage: str,
        *,
        error: BaseException | None = None,
        wait_for: Sequence[int] | None = None,
    ) -> None:
        """Meets the members at ``stage`` of save ``attempt``.

        Reports this process's outcome first, then waits for ``wait_for``
        (default: every member; empty: only report). A process with an error
        of its own returns at once (its caller raises it); the others raise
        :class:`ProcessFailedError` naming whoever failed or vanished.
        """
        if self._client is None or not self.is_member:
            return
        client = self._client
        prefix = f"cloudckpt/save/{attempt}/{stage}/"
        status = "ok" if error is None else f"failed: {type(error).__name__}: {error}"[:2000]
        await asyncio.to_thread(client.key_value_set, f"{prefix}{self.process_index}", status)
        awaited = self.members if wait_for is None else tuple(wait_for)
        if error is not None or not awaited:
            return
        deadline = time.monotonic() + self.options.barrier_timeout_s
        next_liveness = time.monotonic() + _LIVENESS_EVERY_S
        delay = _POLL_MIN_S
        while True:
            entries = await asyncio.to_thread(client.key_value_dir_get, prefix)
            reports = {int(k.rsplit("/", 1)[-1]): v for k, v in entries}
            failed = {p: v for p, v in reports.items() if v != "ok"}
            if failed:
                raise ProcessFailedError(_describe(stage, failed))
            missing = [p for p in awaited if p not in reports]
            if not missing:
                return
            now = time.monotonic()
            if now > deadline:
                raise ProcessFailedError(
                    f"processes {missing} did not reach '{stage}' within "
                    f"{self.options.barrier_timeout_s:.0f}s (stuck or dead)"
                )
            if now > next_liveness:
                dead = await self._dead(missing)
                if dead:
                    raise ProcessFailedError(f"processes {dead} died before reaching '{stage}'")
                next_liveness = now + _LIVENESS_EVERY_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)

    async def _dead(self, processes: list[int]) -> list[int]:
        """Which of ``processes`` are known gone: those on this host whose PID has exited.

        Never asks the client for its live nodes: that call is a barrier among
        the live tasks, and the late peer this wait is for does not join it.
        """
        assert self._client is not None
        client = self._client
        if any(p not in self._peers for p in processes):
            entries = await asyncio.to_thread(client.key_value_dir_get, _PROC_KEY)
            for key, value in entries:
                host, pid = value.rsplit(" ", 1)
                self._peers[int(key.rsplit("/", 1)[-1])] = (host, int(pid))
        me = host_identity()
        dead = [
            p
            for p in processes
            if p in self._peers and self._peers[p][0] == me and not pid_alive(self._peers[p][1])
        ]
        return dead


def _describe(stage: str, failed: dict[int, str]) -> str:
    parts = [f"process {p} {v}" for p, v in sorted(failed.items())]
    return f"the save failed at '{stage}': " + "; ".join(parts)
