"""The commit protocol under every interleaving the explorer reaches (issue 12).

Actors, all against one step of the memory backend through
:class:`tests.interleave.ScheduledStore` (every request a scheduling point):

* ``W1``, ``W2``: two writers of step 5 (claim, two data objects under their
  own attempt's names with a heartbeat between, one document under a fixed
  name written create-only, commit; on any failure, settle with ``abort``),
  the way ``cloudckpt.engine.commit.StepCommit`` drives the strategy. A
  data write may be ``late``: in flight, landing at its own scheduling point
  (``W1~0``...), possibly after its writer was fenced, timed out or gave up;
* ``C``: a restarted job's start-up clean-up; ``G``: ``gc`` run twice;
* ``R``: retention (keep 1), ``X``: an explicit delete of step 5;
* ``T``: an expiring timeout that cancels ``W1`` wherever it waits.

Step 5 starts with a crashed attempt's stale claim and debris, step 4
committed. After every schedule the invariants I1-I5 (docs/FORMAT.md) are
checked; a failing schedule is printed as a list of (actor, fault) that
``CLOUDCKPT_REPLAY`` replays. ``CLOUDCKPT_SCHEDULES`` sets how many seeded
random schedules run (default 10,000).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import pytest

import atomicity
from atomicity import CLAIM_NAME, MARKER_NAME, Claim, CommitMarkerPath, OutcomeUnknownError

from .interleave import (
    DOCUMENTS,
    Chooser,
    Outcome,
    ScheduledStore,
    Scheduler,
    check,
    document_bytes,
)

N_RANDOM = int(os.environ.get("CLOUDCKPT_SCHEDULES", "10000"))
STATS: Counter[str] = Counter()
ALL = ["W1", "W2", "C", "G", "R", "X", "T"]


@dataclass
class Run:
    params: dict[str, object]
    problems: list[str]
    trace: list[tuple[str, str]]
    labels: list[str]
    outcomes: list[Outcome]
    chooser: Chooser
    final: dict[str, bytes]
    requests: int
    #: Whether step 5 held a lone document (no claim, no marker) before the last pass.
    lone: bool = False


def _seed_state(store: ScheduledStore, root: str) -> None:
    """Step 4 committed by an old attempt; step 5 holding a crashed attempt's stale claim."""

    async def seed() -> None:
        inner = store.inner
        old = replace(Claim.new(3600, "old4"), state=atomicity.COMMITTED)
        await inner.put_versioned(f"{root}/4/{CLAIM_NAME}", old.to_bytes(), if_version=None)
        await inner.put(f"{root}/4/@old4/a", b"old")
        await inner.put_if_absent(f"{root}/4/{MARKER_NAME}", b'{"committed_attempt": "old4"}')
        crashed = Claim.new(1.0, "crashed")
        version = await inner.put_versioned(
            f"{root}/5/{CLAIM_NAME}", crashed.to_bytes(), if_version=None
        )
        store._mtimes[(f"{root}/5/{CLAIM_NAME}", version or "")] = 0
        await inner.put(f"{root}/5/@crashed/a", b"debris")

    return seed()  # type: ignore[return-value]


def run_schedule(chooser: Chooser, actors: list[str], *, grace: float) -> Run:
    """One schedule of the named actors; returns what the invariants say about it."""
    return asyncio.run(arun_schedule(chooser, actors, grace=grace))


async def arun_schedule(
    chooser: Chooser,
    actors: list[str],
    *,
    grace: float,
    timeout_after: int = 0,
    document: str = DOCUMENTS[0],
) -> Run:
    """:func:`run_schedule` on the running event loop."""
    sched = Scheduler(chooser)
    store = ScheduledStore(sched)
    root = f"explore-{uuid.uuid4().hex[:12]}"
    step = f"{root}/5"
    outcomes: list[Outcome] = []

    def writer(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            attempt = uuid.uuid4().hex[:24]  # as the checkpointer's: a hex digest
            out = Outcome(name, attempt)
            tmp = CommitMarkerPath(step, store, Claim.new(grace, attempt))  # type: ignore[arg-type]
            created = False
            try:
                await tmp.create()
                created = True
                # Under an item, as cloudckpt's handlers write: <step>/<item>/@<attempt>/...
                where = atomicity.attempt_dir(f"{step}/x", attempt)
                for key in ("a", "b"):
                    data = f"{attempt}:{key}".encode()
                    out.payload[f"{where[len(step) + 1 :]}/{key}"] = data
                    await store.put(f"{where}/{key}", data)
                    if key == "a":
                        await tmp.renew()  # a heartbeat between the writes
                out.payload[document] = document_bytes(attempt)
                if not await store.put_if_absent(f"{step}/{document}", document_bytes(attempt)):
                    raise FileExistsError(f"{step}/{document} exists: another attempt wrote it")
                await tmp.finalize()
                out.result = "committed"
            except BaseException as exc:  # a timeout arrives as CancelledError
                out.error = f"{type(exc).__name__}: {exc}"[:200]
                failed = "timed out" if isinstance(exc, asyncio.CancelledError) else "failed"
                try:
                    out.result = "committed" if created and await tmp.abort() else failed
                except OutcomeUnknownError:
                    out.result = "unknown"
            outcomes.append(out)

        return run

    async def cleanup() -> None:
        try:
            await atomicity.cleanup_uncommitted(store, root)  # type: ignore[arg-type]
        except ConnectionError:
            pass

    async def gc() -> None:
        for _ in range(2):
            await cleanup()

    async def retention() -> None:
        try:
            committed = await atomicity.list_committed(store, root)  # type: ignore[arg-type]
            for child in sorted(committed, key=lambda c: int(c.name))[:-1]:
                await atomicity.delete_checkpoint(store, child.path)  # type: ignore[arg-type]
        except (ConnectionError, FileExistsError):
            pass

    async def delete_step() -> None:
        try:
            if await atomicity.is_committed(store, step):  # type: ignore[arg-type]
                await atomicity.delete_checkpoint(store, step)  # type: ignore[arg-type]
        except (ConnectionError, FileExistsError):
            pass

    async def timeout() -> None:
        # The timeout expires after a number of scheduling steps the schedule picks.
        for _ in range(timeout_after):
            await sched.point("timeout pending")
        await sched.point("timeout fires")
        sched.cancel("W1")

    table: dict[str, Callable[[], Awaitable[None]]] = {
        "W1": writer("W1"),
        "W2": writer("W2"),
        "C": cleanup,
        "G": gc,
        "R": retention,
        "X": delete_step,
        "T": timeout,
    }

    async def steps() -> dict[str, dict[str, bytes]]:
        found: dict[str, dict[str, bytes]] = {}
        async for info in store.inner.list_prefix(root):
            name, _, rel = info.path[len(root) + 1 :].partition("/")
            found.setdefault(name, {})[rel] = await store.inner.get(info.path) or b""
        return found

    async def main() -> tuple[dict[str, dict[str, bytes]], bool]:
        await _seed_state(store, root)
        await sched.run({name: table[name] for name in actors})
        before = (await steps()).get("5", {})
        lone = document in before and not {MARKER_NAME, CLAIM_NAME} & set(before)
        # "Later": far past every grace period, a last clean-up settles what is left.
        later = Scheduler(Chooser())
        later.tick = sched.tick + 10**7
        store.s = later
        await later.run({"L": cleanup})
        return await steps(), lone

    everything, lone = await main()
    final = everything.get("5", {})
    problems = check(store, step, outcomes, final, document)
    problems += [
        f"orphans: the last clean-up left {sorted(objects)} in step {name} without a marker"
        for name, objects in everything.items()
        if name != "5" and MARKER_NAME not in objects
    ]
    return Run(
        {
            "actors": actors,
            "grace": grace,
            "timeout_after": timeout_after,
            "document": document,
        },
        problems,
        [(s.actor, s.fault) for s in sched.trace],
        [f"{s.actor}: {s.label} [{s.fault}]" for s in sched.trace],
        outcomes,
        chooser,
        final,
        store.requests,
        lone,
    )


def _fail(run: Run, what: str) -> None:
    lines = "\n".join(f"  {i:3d} {label}" for i, label in enumerate(run.labels))
    outcomes = ", ".join(f"{o.actor}={o.result}" for o in run.outcomes)
    pytest.fail(
        f"{what}: invariant violated:\n  " + "\n  ".join(run.problems) + f"\noutcomes: {outcomes}"
        f"\nschedule:\n{lines}\nreplay: CLOUDCKPT_REPLAY='"
        + json.dumps({**run.params, "trace": run.trace})
        + "' pytest tests/test_interleavings.py -k random"
    )


def _tally(run: Run) -> None:
    STATS["schedules"] += 1
    STATS["steps"] += len(run.trace)
    STATS["checks"] += 5
    STATS["lone documents removed"] += int(run.lone)
    STATS["late writes"] += sum(1 for s in run.trace if "~" in s[0])
    for out in run.outcomes:
        STATS[f"{out.actor} {out.result}"] += 1


def _preemptions(choices: list[tuple[str, str]], enabled: list[list[str]]) -> int:
    count = 0
    for i in range(1, len(choices)):
        if choices[i][0] != choices[i - 1][0] and choices[i - 1][0] in enabled[i]:
            count += 1
    return count


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("grace", "bound"), [(12.0, 2), (1000.0, 1)])
def test_interleavings_exhaustive_two_writers_and_cleanup(grace: float, bound: int) -> None:
    """Every schedule of W1, W2 and C with at most ``bound`` preemptions (CHESS-style).

    With a grace of 12 store-clock ticks a writer's claim expires mid-save in
    many schedules (clean-up may then revoke it); with 1000 it never does.
    """
    stack: list[list[tuple[str, str]]] = [[]]
    seen = 0
    outcomes: Counter[str] = Counter()
    while stack:
        prefix = stack.pop()
        chooser = Chooser(prefix)
        run = run_schedule(chooser, ["W1", "W2", "C"], grace=grace)
        seen += 1
        _tally(run)
        if run.problems:
            _fail(run, f"exhaustive schedule {seen}")
        outcomes[" ".join(sorted(f"{o.actor}={o.result}" for o in run.outcomes))] += 1
        choices = run.trace
        for i in range(len(prefix), len(choices)):
            before = _preemptions(choices[:i], chooser.enabled)
            prev = choices[i - 1][0] if i else None
            for alt in chooser.enabled[i]:
                if alt == choices[i][0]:
                    continue
                cost = before + (1 if prev in chooser.enabled[i] and alt != prev else 0)
                if cost <= bound:
                    stack.append([*choices[:i], (alt, "none")])
    print(
        f"\n[explorer] exhaustive grace={grace}: {seen} schedules, bound {bound}; {dict(outcomes)}"
    )
    assert seen > (1000 if bound == 2 else 20)
    # Both writers won in some schedule and lost in others: the race was really explored.
    assert any("W1=committed" in k for k in outcomes) and any("W2=committed" in k for k in outcomes)


@pytest.mark.timeout(max(600, N_RANDOM // 20))
def test_schedules_random_with_faults_and_timeouts() -> None:
    """Seeded random schedules of all actors with lost answers, failures and slow answers."""
    replay = os.environ.get("CLOUDCKPT_REPLAY")
    if replay:
        spec = json.loads(replay)
        chooser = Chooser([tuple(x) for x in spec["trace"]])
        run = asyncio.run(
            arun_schedule(
                chooser,
                spec["actors"],
                grace=spec["grace"],
                timeout_after=spec["timeout_after"],
                document=spec.get("document", DOCUMENTS[0]),
            )
        )
        if run.problems:
            _fail(run, "replayed schedule")
    start = time.monotonic()
    outcomes: Counter[str] = Counter()

    async def batch() -> None:
        for seed in range(N_RANDOM):
            actors = ["W1", "W2", "C", "G"]
            actors += ["R", "X"] if seed % 2 else []
            actors += ["T"] if seed % 3 == 0 else []
            grace = (4.0, 12.0, 1000.0)[seed % 3]
            chooser = Chooser(seed=seed, fault_rate=(0.0, 0.1, 0.25)[seed % 3])
            document = DOCUMENTS[(seed // 2) % 2]
            run = await arun_schedule(
                chooser, actors, grace=grace, timeout_after=seed % 13, document=document
            )
            _tally(run)
            if run.problems:
                _fail(run, f"random schedule seed={seed}")
            for out in run.outcomes:
                outcomes[f"{out.actor}={out.result}"] += 1

    asyncio.run(batch())
    print(
        f"\n[explorer] {N_RANDOM} random schedules in {time.monotonic() - start:.0f}s, "
        f"{STATS['steps']} scheduled requests, {STATS['late writes']} late data writes landed, "
        f"{STATS['lone documents removed']} lone fixed-name documents removed by the last clean-up; "
        f"outcomes {dict(outcomes)}"
    )
    assert STATS["late writes"] > 0
    assert outcomes["W1=committed"] + outcomes["W2=committed"] > 0
    assert outcomes["W1=timed out"] > 0 and outcomes["W1=committed"] > 0
    assert outcomes["W1=failed"] + outcomes["W2=failed"] > 0
