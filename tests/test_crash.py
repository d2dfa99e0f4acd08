"""Crash campaign: SIGKILL a saving process at chosen instants, then check what survives.

For each backend, a worker (tests/crash_worker.py) trains and saves every
step; it is killed during the copy, mid-way through the array writes, between
the last data write and the marker, or just after a commit while retention
deletes old steps. After each kill a fresh manager must list only steps that
restore completely and bit-exactly, restore the latest, and its start-up
clean-up must remove every trace of the killed save. The object-store
workers reach their server through a proxy, and each check starts once every
request the killed worker had sent has landed, as a restarted job's would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import atomicity
import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread
from cloudckpt.testing.faultproxy import LoopbackProxy
from cloudckpt.testing.servers import LocalServers

from . import crash_worker, zygote
from .helpers import BUCKET, run_at_once, unique
from .test_stragglers import worker_env

PHASES = ("copy", "writes", "marker", "retention")
KILLS_PER_PHASE = 5  # per backend: 3 backends x 4 phases x 5 = 60 kills
TRIGGER = {"copy": "COPY", "writes": "WRITES", "marker": "FINALIZE", "retention": "COMMITTED"}


class LandingProxy(LoopbackProxy):
    """A pass-through proxy that knows when every request it was sent has landed.

    A killed worker's requests do not die with it: one the server had received
    (a retention's marker DELETE, say) is carried out after the kill, and a
    checker that looked at once could list a step whose deletion was still
    landing (seen on fake-gcs-server under load). A restarted job comes back
    after its dead one's requests have landed; ``wait_landed`` is that moment.
    The proxy reads each request whole before forwarding it, and goes on with
    it when its client has gone, as a server does.
    """

    def __init__(self, upstream: str, flavor: str) -> None:
        super().__init__(upstream, flavor)
        self.in_flight = 0

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        self.in_flight += 1  # only the proxy's loop touches it
        try:
            body = await request.read()
            status, headers, payload = await self._pass_through(request, body)
            return self._respond(request.method, status, headers, payload)
        finally:
            self.in_flight -= 1

    def wait_landed(self, timeout_s: float = 60.0) -> None:
        """Returns once no request is in flight over three turns of the proxy's loop."""

        async def count() -> int:
            await asyncio.sleep(0.02)  # bytes already sent get read and handled first
            return self.in_flight

        deadline = time.monotonic() + timeout_s
        quiet = 0
        while quiet < 3:
            busy = asyncio.run_coroutine_threadsafe(count(), self._loop).result(timeout_s)
            quiet = 0 if busy else quiet + 1
            if time.monotonic() > deadline:
                raise AssertionError(f"{busy} requests still in flight after {timeout_s} s")


def _start(*argv: str, env: dict[str, str] | None = None) -> zygote.Child:
    """A worker running ``argv``, forked from the zygote (JAX is already imported there)."""
    return zygote.spawn("tests.crash_worker", list(argv), env=env, stdin=False)


def _kill_once(
    url: str, first_step: int, phase: str, rng: random.Random, env: dict[str, str] | None
) -> int:
    """Runs a worker until the phase's event of a save after the first; returns that step."""
    proc = _start(url, str(first_step), phase, env=env)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            event, step = line.split()
            if event == TRIGGER[phase] and int(step) > first_step:
                if phase == "writes":
                    time.sleep(rng.uniform(0.0, 0.04))
                elif phase == "retention":
                    time.sleep(rng.uniform(0.0, 0.03))
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return int(step)
            if time.monotonic() > deadline:
                break
        raise AssertionError(
            f"worker never reached {phase}: {proc.stderr.read()[-3000:] if proc.stderr else ''}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _check_survivors(url: str, loop: LoopThread) -> tuple[list[int], int]:
    """Verifies every listed step and cleans up; returns (steps, uncommitted found)."""
    opts = cc.CheckpointManagerOptions(cleanup_uncommitted_on_start=False, **crash_worker.OPTIONS)
    with cc.CheckpointManager(url, options=opts) as mngr:
        steps = mngr.all_steps()
        for step in steps:
            restored = mngr.restore(step)
            expected = crash_worker.expected_state(step)
            np.testing.assert_array_equal(restored.state["big"], expected["big"])
            for got, want in zip(restored.state["small"], expected["small"], strict=True):
                np.testing.assert_array_equal(got, want)
            assert restored.state["step"] == step and restored.trace == step
    root = cc.StoragePath.from_url(url)
    try:
        leftovers = len(loop.run(atomicity.list_uncommitted(root.backend, root.path)))
        with cc.CheckpointManager(
            url, options=cc.CheckpointManagerOptions(**crash_worker.OPTIONS)
        ) as mngr:
            mngr.wait_until_finished()  # start-up clean-up runs in the background
            assert mngr.all_steps() == steps
        remaining = loop.run(atomicity.scan(root.backend, root.path))
    finally:
        loop.run(root.backend.aclose())
    assert all(child.committed for child in remaining), [
        c.name for c in remaining if not c.committed
    ]
    return steps, leftovers


def _campaign(
    kind: str, url: str, loop: LoopThread, servers: LocalServers | None
) -> collections.Counter[tuple[str, str]]:
    """20 kills on one backend, one after another; returns (phase, outcome) counts."""
    tally: collections.Counter[tuple[str, str]] = collections.Counter()
    rng = random.Random(hash(kind) & 0xFFFF)
    next_step = 1
    plan = [phase for phase in PHASES for _ in range(KILLS_PER_PHASE)]
    rng.shuffle(plan)
    with contextlib.ExitStack() as stack:
        proxy, env = None, None
        if servers is not None:  # the workers reach the object store through the proxy
            upstream = servers.s3.endpoint if kind == "s3" else servers.gcs.endpoint
            proxy = stack.enter_context(LandingProxy(upstream, kind))
            env = worker_env(kind, proxy.endpoint)
        for phase in plan:
            killed_at = _kill_once(url, next_step, phase, rng, env)
            if proxy is not None:
                proxy.wait_landed()
            steps, leftovers = _check_survivors(url, loop)
            assert steps, f"{kind}: no committed step survived"
            if phase in ("copy", "marker"):
                assert killed_at not in steps, (
                    f"{kind}: the save of step {killed_at} was killed before its marker"
                )
            if phase == "retention":
                outcome = "deletion cut short, cleaned" if leftovers else "deletions done first"
            elif killed_at in steps:
                outcome = "committed before the kill"
            else:
                outcome = "left debris, cleaned" if leftovers else "no debris"
            tally[(phase, outcome)] += 1
            next_step = max(steps[-1], killed_at) + 1
    return tally


# 60 kills, each a fresh process: a minute or two on a loaded 2-core machine.
@pytest.mark.timeout(900)
def test_crash_campaign(servers: LocalServers, tmp_path: Path, loop: LoopThread) -> None:
    """The three backends' campaigns run at once, each on its own run with its own
    workers; a failure names its backend.
    """
    urls = {
        "file": str(tmp_path / "run"),
        "s3": f"s3://{BUCKET}/{unique('crash')}",
        "gcs": f"gs://{BUCKET}/{unique('crash')}",
    }
    tallies = run_at_once(
        {
            kind: functools.partial(_campaign, kind, url, loop, None if kind == "file" else servers)
            for kind, url in urls.items()
        }
    )
    for kind, tally in tallies.items():
        summary = ", ".join(
            f"{phase}/{outcome}: {n}" for (phase, outcome), n in sorted(tally.items())
        )
        print(f"\n[crash campaign {kind}] {tally.total()} kills, 0 failures; {summary}")
        assert tally.total() == len(PHASES) * KILLS_PER_PHASE
