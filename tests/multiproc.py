"""Launches several local processes joined by jax.distributed (see tests/mp_worker.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudckpt.testing.servers import free_port

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Worker:
    process_id: int
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def result(self) -> dict[str, Any] | None:
        for line in self.lines:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])
        return None


def launch(
    num_processes: int,
    devices: int,
    scenario: str,
    urls: list[str],
    *,
    module: str = "tests.mp_worker",
    **options: Any,
) -> list[Worker]:
    """Starts ``module`` (run with ``-m``) once per process, each given its SPEC as JSON."""
    port = free_port()
    workers = []
    for i in range(num_processes):
        spec = {
            "process_id": i,
            "num_processes": num_processes,
            "devices": devices,
            "port": port,
            "scenario": scenario,
            "urls": urls,
            **options,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(spec)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        workers.append(Worker(i, proc))
    return workers


def wait_for(worker: Worker, prefix: str, timeout: float = 120) -> str:
    """Reads the worker's output until a line starting with ``prefix``."""
    assert worker.proc.stdout is not None
    deadline = time.monotonic() + timeout
    for line in worker.proc.stdout:
        worker.lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return line
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"process {worker.process_id} never printed {prefix!r}:\n" + tail(worker))


def finish(workers: list[Worker], timeout: float = 180) -> list[Worker]:
    """Waits for every worker to exit (killing stragglers) and collects their output."""
    deadline = time.monotonic() + timeout
    for w in workers:
        try:
            out, _ = w.proc.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            out, _ = w.proc.communicate()
            w.lines.append(f"<killed after {timeout:.0f}s: hung>")
        w.lines.extend(out.splitlines())
    return workers


def kill(worker: Worker) -> None:
    worker.proc.send_signal(signal.SIGKILL)


def tail(worker: Worker, n: int = 40) -> str:
    return "\n".join(worker.lines[-n:])
