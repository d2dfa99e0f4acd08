"""Crash campaign: SIGKILL a saving process at chosen instants, then check what survives.

For each backend, a worker (tests/crash_worker.py) trains and saves every
step; it is killed during the copy, mid-way through the array writes, between
the last data write and the marker, or just after a commit while retention
deletes old steps. After each kill a fresh manager must list only steps that
restore completely and bit-exactly, restore the latest, and its start-up
clean-up must remove every trace of the killed save.
"""

from __future__ import annotations

import collections
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import atomicity
import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread

from . import crash_worker
from .helpers import BUCKET, unique

REPO = Path(__file__).resolve().parent.parent
PHASES = ("copy", "writes", "marker", "retention")
KILLS_PER_PHASE = 5  # per backend: 3 backends x 4 phases x 5 = 60 kills
TRIGGER = {"copy": "COPY", "writes": "WRITES", "marker": "FINALIZE", "retention": "COMMITTED"}
TALLY: collections.Counter[tuple[str, str, str]] = collections.Counter()


class Workers:
    """Worker processes, each started one kill ahead of its use.

    A worker spends ~3.6 s of CPU importing JAX before it can save: the next one
    does that while the current one saves, sleeps in its stretched phase and is
    checked, instead of after.
    """

    def __init__(self) -> None:
        self.spare = self._start()

    @staticmethod
    def _start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.crash_worker"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def take(self, *argv: str) -> subprocess.Popen[str]:
        """The spare worker, running ``argv``; a new spare starts behind it."""
        proc, self.spare = self.spare, self._start()
        assert proc.stdin is not None and proc.stdout is not None
        ready = proc.stdout.readline()
        if ready != "READY\n":
            proc.kill()
            proc.wait(30)
            stderr = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise AssertionError(f"worker did not start: {ready!r} {stderr}")
        proc.stdin.write(" ".join(argv) + "\n")
        proc.stdin.close()
        return proc

    def close(self) -> None:
        if self.spare.poll() is None:
            self.spare.kill()
        self.spare.wait(30)
        for stream in (self.spare.stdin, self.spare.stdout, self.spare.stderr):
            if stream is not None:
                stream.close()


def _kill_once(workers: Workers, url: str, first_step: int, phase: str, rng: random.Random) -> int:
    """Runs a worker until the phase's event of a save after the first; returns that step."""
    proc = workers.take(url, str(first_step), phase)
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
    leftovers = len(loop.run(atomicity.list_uncommitted(root.backend, root.path)))
    with cc.CheckpointManager(
        url, options=cc.CheckpointManagerOptions(**crash_worker.OPTIONS)
    ) as mngr:
        mngr.wait_until_finished()  # start-up clean-up runs in the background
        assert mngr.all_steps() == steps
    remaining = loop.run(atomicity.scan(root.backend, root.path))
    assert all(child.committed for child in remaining), [
        c.name for c in remaining if not c.committed
    ]
    return steps, leftovers


# 20 kills, each a fresh process (started one kill ahead): minutes on a loaded 2-core machine.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["file", "s3", "gcs"])
def test_crash_campaign(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, loop: LoopThread
) -> None:
    if kind == "file":
        url = str(tmp_path / "run")
    else:
        request.getfixturevalue("servers")
        scheme = "s3" if kind == "s3" else "gs"
        url = f"{scheme}://{BUCKET}/{unique('crash')}"
    rng = random.Random(hash(kind) & 0xFFFF)
    next_step = 1
    plan = [phase for phase in PHASES for _ in range(KILLS_PER_PHASE)]
    rng.shuffle(plan)
    workers = Workers()
    request.addfinalizer(workers.close)
    for phase in plan:
        killed_at = _kill_once(workers, url, next_step, phase, rng)
        steps, leftovers = _check_survivors(url, loop)
        assert steps, "no committed step survived"
        if phase in ("copy", "marker"):
            assert killed_at not in steps, (
                f"the save of step {killed_at} was killed before its marker"
            )
        if phase == "retention":
            outcome = "deletion cut short, cleaned" if leftovers else "deletions done first"
        elif killed_at in steps:
            outcome = "committed before the kill"
        else:
            outcome = "left debris, cleaned" if leftovers else "no debris"
        TALLY[(kind, phase, outcome)] += 1
        next_step = max(steps[-1], killed_at) + 1
    summary = ", ".join(
        f"{phase}/{outcome}: {n}" for (k, phase, outcome), n in sorted(TALLY.items()) if k == kind
    )
    print(f"\n[crash campaign {kind}] {len(plan)} kills, 0 failures; {summary}")
    assert sum(n for (k, _, _), n in TALLY.items() if k == kind) == len(plan)
