"""Launches several local processes joined by jax.distributed (see tests/mp_worker.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cloudckpt.testing.servers import free_port

from . import zygote

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Worker:
    process_id: int
    proc: zygote.Child
    lines: list[str] = field(default_factory=list)
    #: The process's stderr, kept apart from the stdout lines the tests parse.
    errors: IO[str] | None = None

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
        proc, errors = popen(module, json.dumps(spec))
        workers.append(Worker(i, proc, errors=errors))
    return workers


def popen(module: str, *args: str) -> tuple[zygote.Child, IO[str]]:
    """Starts ``python -m module args`` as a worker (forked from tests/zygote.py), and its stderr.

    C++ libraries in the workers (gloo, tensorstore's logging) write from their
    own threads at any time, to stderr and to fd 1: on a shared pipe their
    text was glued onto protocol lines ("[Gloo] Rank RESULT {...}", or an
    ``EVENT WRITING`` the parent never recognised, so it never sent its
    signal). The worker runs under tests/protocol_stdout.py, which moves fd 1
    onto stderr, and stderr goes to a temporary file in append mode, so the
    parent can read it (``tail``) while the child writes.
    """
    errors = tempfile.TemporaryFile(mode="a+", encoding="utf-8", errors="replace")  # noqa: SIM115 (the worker's, for its lifetime)
    proc = zygote.spawn(
        "tests.protocol_stdout",
        [module, *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=False,
        stderr=errors,
    )
    return proc, errors


def stderr_of(errors: IO[str] | None, n: int = 40) -> str:
    """The last ``n`` lines a worker wrote to stderr."""
    if errors is None:
        return ""
    errors.seek(0)
    return "\n".join(errors.read().splitlines()[-n:])


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
    """Waits for every worker to exit (killing stragglers) and collects their output.

    The rest of stdout is read through the text stream ``wait_for`` iterated,
    so the lines it had already read ahead come first. ``communicate`` with a
    timeout reads the pipe's descriptor itself: a ``RESULT`` printed right
    after the awaited ``EVENT`` line, read ahead with it, was lost.
    """
    deadline = time.monotonic() + timeout
    # Every worker's output is read from now on, while any of them runs: a worker
    # waiting on a full pipe would otherwise hold up the one waited for (a barrier).
    readers: list[tuple[threading.Thread, list[str]]] = []
    for w in workers:
        assert w.proc.stdout is not None
        rest: list[str] = []
        reader = threading.Thread(target=_read_rest, args=(w.proc.stdout, rest))
        reader.start()
        readers.append((reader, rest))
    for w, (reader, rest) in zip(workers, readers, strict=True):
        try:
            w.proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
            w.lines.append(f"<killed after {timeout:.0f}s: hung>")
        reader.join()
        w.lines.extend("".join(rest).splitlines())
    return workers


def _read_rest(stream: IO[str], into: list[str]) -> None:
    into.append(stream.read())


def kill(worker: Worker) -> None:
    worker.proc.send_signal(signal.SIGKILL)


def tail(worker: Worker, n: int = 40) -> str:
    out = "\n".join(worker.lines[-n:])
    return f"{out}\n--- stderr ---\n{stderr_of(worker.errors, n)}" if worker.errors else out
