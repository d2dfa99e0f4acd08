"""A deterministic interleaving explorer for the commit protocol (see tests/test_interleavings.py).

* :class:`ScheduledStore` wraps the memory backend: every request is a
  scheduling point, where the actor making it waits until the scheduler
  picks it. A picked request runs alone, to completion, and may be given a
  fault: ``fail`` (not applied, ConnectionError), ``lost`` (applied, then
  ConnectionError: the answer was lost), ``slow`` (applied, but the answer
  arrives only at a later scheduling point, where a timeout can cancel the
  waiting actor) or, for data writes, ``late`` (the request is in flight:
  it lands at a scheduling point of its own, ``<actor>~<n>``, whenever the
  scheduler picks it, even after its writer was cancelled, fenced, or gave
  up; the writer waits for it as for an answer). Object times and ``now`` come from a virtual store clock
  that ticks once per request, so staleness is judged exactly as by a store.
* :class:`Scheduler` runs a set of actor coroutines one request at a time,
  choosing who goes next from a ``Chooser`` (a replayed prefix, then a
  seeded random or a "keep going" default), and records the trace.
* :func:`check` states the invariants I1-I5 of docs/FORMAT.md over the
  store's event log, the final store and the outcomes the actors reported.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import atomicity
from atomicity import CLAIM_NAME, MARKER_NAME, Claim, ObjectInfo, Versioned
from cloudckpt.storage.memory import MemoryBackend
from cloudckpt.storage.retry import RetryPolicy

#: Faults are the explorer's to inject; the backend under it does not retry.
NO_RETRY = RetryPolicy(max_attempts=1)

FAULTS = ("none", "fail", "lost", "slow", "late")


class InjectedFault(ConnectionError):
    """A request failure injected by the explorer."""


@dataclass
class Event:
    tick: int
    actor: str
    kind: str  # "claim" (conditional claim write), "claim-delete", "marker", "marker-delete", "data-delete"
    path: str
    old: Claim | None = None
    new: Claim | None = None
    attempt: str | None = None


@dataclass
class Step:
    actor: str
    label: str
    fault: str


class Chooser:
    """Picks the next actor and a fault: a replayed prefix first, then a policy."""

    def __init__(
        self,
        prefix: Iterable[tuple[str, str]] = (),
        *,
        seed: int | None = None,
        fault_rate: float = 0.0,
    ) -> None:
        self.prefix = list(prefix)
        self.rng = random.Random(seed) if seed is not None else None
        self.fault_rate = fault_rate
        self.enabled: list[list[str]] = []

    def pick(self, index: int, waiting: dict[str, str], last: str | None) -> tuple[str, str]:
        """``waiting`` maps each actor able to go to the request it is about to make."""
        enabled = sorted(waiting)
        self.enabled.append(enabled)
        if index < len(self.prefix):
            actor, fault = self.prefix[index]
            if actor in enabled:
                return actor, fault
        if self.rng is None:  # default: keep running the same actor (no preemption)
            return (last if last in enabled else enabled[0]), "none"
        actor = self.rng.choice(enabled)
        fault = "none"
        if self.fault_rate and self.rng.random() < self.fault_rate:
            fault = self.rng.choice(FAULTS[1:])
        return actor, fault


class Plan(Chooser):
    """Runs actors in segments: ``(actor, stop)`` runs ``actor`` until the request it is
    about to make contains ``stop`` (not granted yet; ``""`` runs it to the end), then
    the next segment. After the plan, actors run to completion in name order."""

    def __init__(self, segments: list[tuple[str, str]], faults: dict[str, str] | None = None):
        super().__init__()
        self.segments = list(segments)
        self.faults = faults or {}

    def pick(self, index: int, waiting: dict[str, str], last: str | None) -> tuple[str, str]:
        while self.segments:
            actor, stop = self.segments[0]
            if actor not in waiting or (stop and stop in waiting[actor]):
                self.segments.pop(0)
                continue
            label = waiting[actor]
            fault = next((f for key, f in self.faults.items() if key in f"{actor}:{label}"), "none")
            return actor, fault
        actor = last if last in waiting else sorted(waiting)[0]
        return actor, "none"


class Scheduler:
    """Runs actors one request at a time in the order a :class:`Chooser` picks."""

    def __init__(self, chooser: Chooser, *, max_steps: int = 400) -> None:
        self.chooser = chooser
        self.max_steps = max_steps
        self.tick = 10**6  # virtual store clock, in seconds
        self.trace: list[Step] = []
        self._waiting: dict[str, tuple[asyncio.Future[str], str]] = {}
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._names: dict[asyncio.Task[Any], str] = {}
        self._changed = asyncio.Event()
        #: Actors waiting for a request in flight (not at a point, not runnable).
        self.blocked: dict[str, asyncio.Future[Any]] = {}

    def current(self) -> str:
        task = asyncio.current_task()
        return self._names.get(task, "?") if task is not None else "?"

    async def point(self, label: str) -> str:
        """Waits until this actor is picked; returns the fault to apply."""
        name = self.current()
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[name] = (future, label)
        self._changed.set()
        try:
            return await future
        finally:
            self._waiting.pop(name, None)

    def spawn(self, name: str, coro: Awaitable[Any]) -> None:
        """Adds an actor while the schedule runs (a request in flight, landing later)."""
        task = asyncio.ensure_future(coro)
        self._tasks[name] = task
        self._names[task] = name
        task.add_done_callback(lambda _t: self._changed.set())

    def cancel(self, actor: str) -> None:
        task = self._tasks.get(actor)
        if task is not None and not task.done():
            task.cancel()

    async def run(self, actors: dict[str, Callable[[], Awaitable[Any]]]) -> None:
        for name, make in actors.items():
            task = asyncio.ensure_future(make())
            self._tasks[name] = task
            self._names[task] = name
            task.add_done_callback(lambda _t: self._changed.set())
        last: str | None = None
        while True:
            while True:  # quiescence: every live actor waits at a point
                live = [n for n, t in self._tasks.items() if not t.done()]
                held = {n for n, f in self.blocked.items() if not f.done()}
                if all(
                    n in held or (n in self._waiting and not self._waiting[n][0].done())
                    for n in live
                ):
                    break
                self._changed.clear()
                await self._changed.wait()
            if not live:
                break
            live = [n for n in live if n not in held]
            assert live, "every actor waits for a request in flight"
            if len(self.trace) >= self.max_steps:
                raise AssertionError(f"schedule exceeded {self.max_steps} steps")
            waiting = {n: self._waiting[n][1] for n in live}
            actor, fault = self.chooser.pick(len(self.trace), waiting, last)
            future, label = self._waiting.pop(actor)
            self.trace.append(Step(actor, label, fault))
            self.tick += 1
            last = actor
            future.set_result(fault)
            await asyncio.sleep(0)
        for task in self._tasks.values():
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


class ScheduledStore:
    """The memory backend, with every request a scheduling point and a virtual clock."""

    supports_atomic_rename = False
    supports_conditional_delete = True

    def __init__(self, scheduler: Scheduler, inner: MemoryBackend | None = None) -> None:
        self.s = scheduler
        self.inner = inner or MemoryBackend(retry=NO_RETRY)
        self.events: list[Event] = []
        self.requests = 0
        self.late_writes = 0
        self._mtimes: dict[tuple[str, str], int] = {}

    # --------------------------------------------------------------- machinery
    async def _request(self, label: str, path: str, act: Callable[[], Awaitable[Any]]) -> Any:
        fault = await self.s.point(f"{label} {path.rsplit('/', 2)[-2:]}")
        self.requests += 1
        if fault == "late" and label == "put":
            return await self._in_flight(label, path, act)
        if fault == "fail":
            raise InjectedFault(f"injected failure of {label}")
        result = await act()
        if fault == "lost":
            raise InjectedFault(f"injected lost answer of {label}")
        if fault == "slow":
            await self.s.point(f"answer of {label}")  # a timeout may cancel us here
        return result

    async def _in_flight(self, label: str, path: str, act: Callable[[], Awaitable[Any]]) -> Any:
        """A request that lands at a later scheduling point of its own actor."""
        landed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        landed.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        name = f"{self.s.current()}~{self.late_writes}"
        self.late_writes += 1

        async def fly() -> None:
            await self.s.point(f"late {label} {path.rsplit('/', 2)[-2:]}")
            try:
                result = await act()
            except BaseException as exc:
                if not landed.done():
                    landed.set_exception(exc)
                return
            if not landed.done():
                landed.set_result(result)

        self.s.spawn(name, fly())
        # The writer waits for its answer; a timeout cancels the wait, never the request.
        me = self.s.current()
        self.s.blocked[me] = landed
        try:
            return await asyncio.shield(landed)
        finally:
            self.s.blocked.pop(me, None)

    def _event(self, kind: str, path: str, **kw: Any) -> None:
        self.events.append(Event(self.s.tick, self.s.current(), kind, path, **kw))

    def _mtime(self, path: str, version: str) -> float:
        return float(self._mtimes.setdefault((path, version), self.s.tick))

    async def _peek_claim(self, path: str) -> Claim | None:
        data = await self.inner.get(path)
        return None if data is None else Claim.from_bytes(data)

    # ----------------------------------------------------------------- Store API
    async def now(self, path: str) -> float:
        return await self._request("now", path, self._now)

    async def _now(self) -> float:
        return float(self.s.tick)

    async def get(self, path: str) -> bytes | None:
        return await self._request("get", path, lambda: self.inner.get(path))

    async def exists(self, path: str) -> bool:
        return await self._request("exists", path, lambda: self.inner.exists(path))

    async def get_versioned(self, path: str) -> Versioned | None:
        async def act() -> Versioned | None:
            found = await self.inner.get_versioned(path)
            if found is None:
                return None
            return Versioned(found.data, found.version, self._mtime(path, found.version))

        return await self._request("get_versioned", path, act)

    async def put(self, path: str, data: bytes) -> None:
        await self._request("put", path, lambda: self.inner.put(path, data))

    async def put_if_absent(self, path: str, data: bytes) -> bool:
        async def act() -> bool:
            created = await self.inner.put_if_absent(path, data)
            if created and path.endswith("/" + MARKER_NAME):
                self._event("marker", path, attempt=atomicity.marker_attempt(data))
            return created

        return await self._request("put_if_absent", path, act)

    async def put_versioned(self, path: str, data: bytes, *, if_version: str | None) -> str | None:
        async def act() -> str | None:
            old = await self._peek_claim(path) if path.endswith(CLAIM_NAME) else None
            version = await self.inner.put_versioned(path, data, if_version=if_version)
            if version is not None:
                self._mtimes[(path, version)] = self.s.tick
                if path.endswith(CLAIM_NAME):
                    self._event("claim", path, old=old, new=Claim.from_bytes(data))
            return version

        label = "create" if if_version is None else "replace_if"
        return await self._request(label, path, act)

    async def delete_versioned(self, path: str, version: str) -> bool:
        async def act() -> bool:
            if not path.endswith("/" + CLAIM_NAME):
                done = await self.inner.delete_versioned(path, version)
                if done:
                    self._event("data-delete", path, attempt=_tag(path))
                return done
            old = await self._peek_claim(path)
            done = await self.inner.delete_versioned(path, version)
            if done:
                self._event("claim-delete", path, old=old)
            return done

        return await self._request("delete_if", path, act)

    async def _delete_one(self, path: str) -> None:
        data = await self.inner.get(path)
        if data is None:
            return
        if path.endswith("/" + MARKER_NAME):
            self._event("marker-delete", path, attempt=atomicity.marker_attempt(data))
        elif path.endswith("/" + CLAIM_NAME):
            self._event("claim-delete", path, old=Claim.from_bytes(data))
        else:
            self._event("data-delete", path, attempt=_tag(path))
        await self.inner.delete(path)

    async def delete(self, path: str) -> None:
        await self._request("delete", path, lambda: self._delete_one(path))

    async def delete_many(self, paths: Iterable[str]) -> None:
        batch = list(paths)
        if not batch:
            return

        async def act() -> None:
            for path in batch:
                await self._delete_one(path)

        await self._request("delete_many", batch[0], act)

    async def delete_prefix(self, prefix: str) -> None:
        doomed = [info.path async for info in self.list_prefix(prefix)]
        await self.delete_many(doomed)

    async def list_prefix(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        async def act() -> list[ObjectInfo]:
            return [info async for info in self.inner.list_prefix(prefix)]

        for info in await self._request("list", prefix, act):
            yield info

    async def rename(self, src: str, dst: str, *, claim_version: str | None = None) -> None:
        raise NotImplementedError("the memory store has no atomic rename")


def _tag(path: str) -> str | None:
    """The attempt tag anywhere in a full path (``.../@<attempt>/...``)."""
    return next((p[1:] for p in path.split("/") if p.startswith(atomicity.ATTEMPT_TAG)), None)


#: The object a writer writes under a fixed name (create-only), as cloudckpt's step
#: metadata, ``pytree.json`` and ``data.json`` are: one of these, per schedule.
DOCUMENTS = ("x/pytree.json", "_CHECKPOINT_METADATA")


def document_bytes(attempt: str) -> bytes:
    """A document's content, shaped as cloudckpt's (a checksummed JSON envelope)."""
    return b'{"crc32c":"00000000","data":"%s"}' % attempt.encode()


@dataclass
class Outcome:
    """What one writer reported: committed, failed, timed out, or unknown."""

    actor: str
    attempt: str
    result: str = "running"
    payload: dict[str, bytes] = field(default_factory=dict)
    error: str = ""


def check(
    store: ScheduledStore,
    step_path: str,
    outcomes: list[Outcome],
    final: dict[str, bytes],
    document: str = DOCUMENTS[0],
) -> list[str]:
    """The invariants I1-I5 over the event log, the outcomes and the final objects of a step.

    ``final`` is what the step holds after a last clean-up pass, far past every
    grace period: a committed step holds its owner's objects only, and a step
    without a marker holds nothing at all (no orphan is left forever).
    """
    problems: list[str] = []
    claim_path = f"{step_path}/{CLAIM_NAME}"
    commits: list[Event] = []
    fenced: dict[str, int] = {}
    deletions: list[int] = []
    for event in store.events:
        if event.path != claim_path:
            continue
        if event.kind == "claim" and event.new is not None:
            old, new = event.old, event.new
            if new.state == atomicity.COMMITTED and (old is None or old.state != new.state):
                commits.append(event)
            if new.state == atomicity.DELETING:
                deletions.append(event.tick)
            if (
                old is not None
                and old.state == atomicity.WRITING
                and (new.attempt != old.attempt or new.state != atomicity.WRITING)
            ) and new.state != atomicity.COMMITTED:
                fenced.setdefault(old.attempt, event.tick)
        elif (
            event.kind == "claim-delete"
            and event.old is not None
            and event.old.state == atomicity.WRITING
        ):
            fenced.setdefault(event.old.attempt, event.tick)
    # I1: at most one commit per life of the step (lives end with an explicit delete).
    for a, b in itertools.pairwise(commits):
        if not any(a.tick < t < b.tick for t in deletions):
            problems.append(
                f"I1: attempts {a.new.attempt} (t={a.tick}) and {b.new.attempt} (t={b.tick}) "  # type: ignore[union-attr]
                "both committed the step without a delete in between"
            )
    # I3: no commit of an attempt after it was fenced.
    for event in commits:
        attempt = event.new.attempt  # type: ignore[union-attr]
        if attempt in fenced and fenced[attempt] < event.tick:
            problems.append(
                f"I3: attempt {attempt} committed at t={event.tick} after being fenced at "
                f"t={fenced[attempt]}"
            )
    committed_attempts = {e.new.attempt for e in commits}  # type: ignore[union-attr]
    # I4: reported outcomes match storage.
    for out in outcomes:
        if out.result == "committed" and out.attempt not in committed_attempts:
            problems.append(f"I4: {out.actor} reported committed but never committed")
        if out.result in ("failed", "timed out") and out.attempt in committed_attempts:
            problems.append(
                f"I4: {out.actor} reported {out.result} ({out.error}) but its attempt committed"
            )
    # I5: no data of an attempt deleted before that attempt committed (by anyone).
    for event in store.events:
        if event.kind == "data-delete" and event.attempt in committed_attempts:
            commit_tick = next(c.tick for c in commits if c.new.attempt == event.attempt)  # type: ignore[union-attr]
            deleted_later = any(commit_tick < t <= event.tick for t in deletions)
            if not deleted_later:
                problems.append(
                    f"I5: {event.actor} deleted {event.path} of attempt {event.attempt} at "
                    f"t={event.tick}, which committed at t={commit_tick} and was never deleted"
                )
    # I2: the final committed step holds exactly its committing attempt's objects.
    marker = final.get(MARKER_NAME)
    last_commit = commits[-1] if commits else None
    if last_commit is not None and not any(t > last_commit.tick for t in deletions):
        owner = last_commit.new.attempt  # type: ignore[union-attr]
        if marker is None:
            problems.append(
                f"I2: committed attempt {owner}'s step lost its marker without a delete"
            )
        writer = next((o for o in outcomes if o.attempt == owner), None)
        if writer is not None:
            for rel, data in writer.payload.items():
                if final.get(rel) != data:
                    problems.append(f"I2: {rel} of committed attempt {owner} is missing or changed")
    if marker is not None:
        owner = atomicity.marker_attempt(marker)
        if owner not in committed_attempts:
            problems.append(f"I1/I3: a marker names {owner}, which never committed")
        # Ownership: after the final clean-up the committed step holds its owner's
        # objects only: its tagged data, its document, the claim and the marker. Late
        # writes of fenced attempts were swept out by exact key.
        foreign = [
            rel
            for rel in final
            if rel not in (MARKER_NAME, CLAIM_NAME, document) and atomicity.attempt_of(rel) != owner
        ]
        if foreign:
            problems.append(f"I2: committed step of {owner} holds other objects {foreign}")
        if document in final and final[document] != document_bytes(owner or ""):
            problems.append(f"I2: the committed step's {document} is {final[document]!r}")
    elif final:
        # Everything under a step without a marker is clean-up's to remove, a lone
        # fixed-name document too (a fenced writer's create that landed after the
        # step was cleaned up): recognised by its name and content, no claim needed.
        problems.append(f"orphans: the last clean-up left {sorted(final)} without a marker")
    return problems
