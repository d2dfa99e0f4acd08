"""Two processes joined by jax.distributed against one process, saving and restoring the same bytes.

Issue 6: every process of a job writes its own replica-0 shards and reads the
bytes its devices need. This scenario starts two worker groups
(``benchmarks/mp_bench_worker.py``) and keeps them alive for the whole run:

* ``1x8``: one process with 8 CPU devices (no ``jax.distributed``);
* ``2x4``: two processes with 4 CPU devices each, joined by
  ``jax.distributed`` on 127.0.0.1 with gloo collectives.

Both build the same global 4x2 ``("data", "model")`` mesh and the same
``--mp-size-mib`` tree (the shapes and shardings of the main tree, with
values that depend only on the shard, so both topologies save identical
bytes). Per backend, each group first saves and restores a 1 MiB tree
(client start-up is not timed); then, per repetition, both groups save and
restore a fresh checkpoint, one after the other (the order alternates between
repetitions), while the other group sits idle. A group's time for a phase is
the maximum over its processes of the wall time from a barrier before the
phase to a barrier after it, measured inside the processes. Restores target
the saved shardings and check a few values per shard against the saved ones
(every byte in the first repetition).

Bytes written and read per process (issue 14) are the ``io_bytes``
scenario's (``io_bytes.py``, the same workers on 1x8, 2x4 and 4x2). The figures to steer by are
``2x4/1x8``: on this 2-core machine the two processes share the same cores
and the same server, so ~1 means the multi-process path adds no cost of its
own; on a real cluster each host brings its own cores and network.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from benchmarks.common import Context, median, ratio, samples, scenario
from benchmarks.targets import Target, list_objects, remove
from benchmarks.throughput import object_stats

REPO = Path(__file__).resolve().parent.parent
#: (name, processes, CPU devices per process); both make 8 devices.
TOPOLOGIES: tuple[tuple[str, int, int], ...] = (("1x8", 1, 8), ("2x4", 2, 4))
#: The topologies of the bytes-per-process rows (``io_bytes.py``).
BYTES_TOPOLOGIES: tuple[tuple[str, int, int], ...] = (*TOPOLOGIES, ("4x2", 4, 2))
START_TIMEOUT_S = 180.0  # import jax, join, build the tree
BARRIER_S = 300.0  # cloudckpt's and the benchmark's barriers inside the workers
QUIT_TIMEOUT_S = 30.0


class WorkerError(RuntimeError):
    """A worker answered ERROR, exited, or did not answer in time."""


class _Proc:
    """One worker process; a thread reads its output into a queue and a tail."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.process_id = spec["process_id"]
        # stderr apart from the protocol lines: gloo and tensorstore write to it from
        # their own threads and would glue text onto a READY or RESULT line.
        self.errors = tempfile.TemporaryFile(mode="a+", encoding="utf-8", errors="replace")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.mp_bench_worker", json.dumps(spec)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.messages: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=60)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            kind, _, payload = line.partition(" ")
            if kind in ("READY", "RESULT", "ERROR"):
                try:
                    self.messages.put((kind, json.loads(payload)))
                except ValueError:
                    pass
        self.messages.put(("EOF", None))

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, kind: str, deadline: float, what: str) -> dict[str, Any]:
        try:
            got, payload = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise WorkerError(self.describe(f"no answer to {what} in time")) from None
        if got != kind:
            detail = payload.get("traceback") if isinstance(payload, dict) else None
            raise WorkerError(self.describe(f"{got} instead of {kind} for {what}", detail))
        return payload

    def describe(self, why: str, detail: str | None = None) -> str:
        return (
            f"process {self.process_id} (pid {self.proc.pid}): {why}\n"
            + (detail or "")
            + "\n--- its last output ---\n"
            + "\n".join(self.tail)
            + "\n--- its stderr ---\n"
            + self._stderr()
        )

    def _stderr(self, n: int = 40) -> str:
        self.errors.seek(0)
        return "\n".join(self.errors.read().splitlines()[-n:])

    def request_quit(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.poll() is None:
                self.send({"op": "quit"})
            assert self.proc.stdin is not None
            self.proc.stdin.close()

    def wait_or_kill(self, deadline: float) -> None:
        """Waits for it to exit, killing it if it is still there at ``deadline``."""
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)


class Group:
    """The processes of one topology, started together and driven in lock step."""

    def __init__(
        self, name: str, processes: int, devices: int, size_mib: float, count_bytes: bool = False
    ) -> None:
        """``count_bytes``: each worker talks to the servers through its own byte-counting proxy."""
        from cloudckpt.testing.servers import free_port

        self.name = name
        self.processes = processes
        self.devices = devices
        port = free_port()
        self.procs: list[_Proc] = []
        self._ids = 0
        try:
            for i in range(processes):
                self.procs.append(
                    _Proc(
                        {
                            "process_id": i,
                            "num_processes": processes,
                            "devices": devices,
                            "port": port,
                            "size_mib": size_mib,
                            "barrier_s": BARRIER_S,
                            "count_bytes": count_bytes,
                        }
                    )
                )
        except BaseException:
            self.stop()
            raise
        self.started = time.monotonic()
        self.ready: list[dict[str, Any]] = []

    def wait_ready(self) -> list[dict[str, Any]]:
        deadline = self.started + START_TIMEOUT_S
        self.ready = [p.expect("READY", deadline, f"{self.name} start-up") for p in self.procs]
        return self.ready

    def command(self, op: str, timeout_s: float, **fields: Any) -> list[dict[str, Any]]:
        """Sends one command to every process; returns their answers (by process)."""
        self._ids += 1
        cmd = {"op": op, "id": f"{op}{self._ids}", **fields}
        for p in self.procs:
            p.send(cmd)
        deadline = time.monotonic() + timeout_s
        return [p.expect("RESULT", deadline, f"{self.name} {op}") for p in self.procs]

    def stop(self) -> None:
        """Asks every process to quit (together: they meet at jax.distributed's shutdown
        barrier), then kills whatever is left after ``QUIT_TIMEOUT_S``."""
        deadline = time.monotonic() + QUIT_TIMEOUT_S
        for p in self.procs:
            p.request_quit()
        for p in self.procs:
            p.wait_or_kill(deadline)


def check_verified(answers: list[dict[str, Any]], what: str) -> None:
    """Raises naming every process whose restore differed from the save."""
    bad = [a for a in answers if not a["verified"]]
    if bad:
        raise WorkerError(
            f"{what}: the restore differs from the save: "
            + "; ".join(f"process {a['process']}: {a['mismatch']}" for a in bad)
        )


def _run_timeout(size_mib: float) -> float:
    """Generous: 60 s plus 2 s per MiB (saves run at tens of MiB/s at worst here)."""
    return 60.0 + 2.0 * size_mib


def _measure(
    ctx: Context, group: Group, target: Target, check: bool, stats: dict[str, Any]
) -> dict[str, Any]:
    url = target.fresh(f"mp-{group.name}")
    try:
        answers = group.command("run", _run_timeout(ctx.config.mp_size_mib), url=url, check=check)
        if check:
            stats[group.name] = object_stats(list_objects(url), group.ready[0]["bytes"])
    finally:
        remove(url)
    check_verified(answers, f"{group.name} on {target.name}")
    return {
        "save_s": max(a["save_s"] for a in answers),
        "restore_s": max(a["restore_s"] for a in answers),
        "per_process": [
            {k: a[k] for k in ("process", "save_s", "restore_s", "checked_bytes")} for a in answers
        ],
    }


def run_backend(ctx: Context, groups: dict[str, Group], target: Target) -> dict[str, Any]:
    cfg = ctx.config
    groups = {n: g for n, g in groups.items() if n in {t[0] for t in TOPOLOGIES}}
    for group in groups.values():
        url = target.fresh(f"mp-warmup-{group.name}")
        try:
            group.command("warmup", 120.0, url=url)
        finally:
            remove(url)
    times: dict[str, dict[str, list[float]]] = {n: {"save": [], "restore": []} for n in groups}
    per_process: dict[str, list[Any]] = {n: [] for n in groups}
    objects: dict[str, Any] = {}
    checked: dict[str, int] = {}
    for rep in range(cfg.mp_reps):
        order = list(groups) if rep % 2 == 0 else list(reversed(groups))
        for name in order:
            m = _measure(ctx, groups[name], target, check=rep == 0, stats=objects)
            times[name]["save"].append(m["save_s"])
            times[name]["restore"].append(m["restore_s"])
            per_process[name].append(m["per_process"])
            if rep == 0:
                checked[name] = sum(p["checked_bytes"] for p in m["per_process"])
        ctx.log(
            f"multiprocess {target.name} rep {rep}: "
            + ", ".join(
                f"{n} save {t['save'][-1]:.2f}s restore {t['restore'][-1]:.2f}s"
                for n, t in times.items()
            )
        )
    med = {n: {k: median(v) for k, v in t.items()} for n, t in times.items()}
    mib = next(iter(groups.values())).ready[0]["bytes"] / (1 << 20)
    return {
        "times": {n: {k: samples(v) for k, v in t.items()} for n, t in times.items()},
        "save_2x4_vs_1x8": ratio(med["2x4"]["save"], med["1x8"]["save"]),
        "restore_2x4_vs_1x8": ratio(med["2x4"]["restore"], med["1x8"]["restore"]),
        "MiBps": {n: {k: ratio(mib, v) for k, v in m.items()} for n, m in med.items()},
        "per_process_s": per_process,
        "objects": objects,
        "verified": True,  # a mismatch raises
        "fully_checked_bytes": checked,
    }


@scenario("multiprocess", order=50)
def multiprocess(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config
    groups: dict[str, Group] = {}
    out: dict[str, Any] = {"topologies": {}, "backends": {}}
    try:
        start = time.monotonic()
        for name, processes, devices in TOPOLOGIES:  # start together: start-up overlaps
            groups[name] = Group(name, processes, devices, cfg.mp_size_mib)
        for name, group in groups.items():
            ready = group.wait_ready()
            out["topologies"][name] = {
                "processes": group.processes,
                "devices_per_process": group.devices,
                "replica0_bytes_per_process": [r["replica0_bytes_here"] for r in ready],
                "build_s": [r["build_s"] for r in ready],
            }
        first = groups["1x8"].ready[0]
        out["tree"] = {k: first[k] for k in ("bytes", "leaves", "arrays", "mesh")}
        out["tree"]["size_mib"] = cfg.mp_size_mib
        out["reps"] = cfg.mp_reps
        out["startup_s"] = round(time.monotonic() - start, 1)
        ctx.log(
            f"multiprocess: groups {', '.join(groups)} ready in {out['startup_s']:.0f}s "
            f"({first['bytes'] / 2**20:.0f} MiB tree)"
        )
        for target in ctx.targets:
            out["backends"][target.name] = run_backend(ctx, groups, target)
    finally:
        for group in groups.values():
            group.stop()
    return out
