"""The multi-process harness parses workers' protocol lines whatever native code prints.

gloo writes "[Gloo] Rank 0 is connected..." to fd 1 from C++ while a worker
prints its RESULT line; CI once read "{...}[Gloo] Rank 0 is connected..." as
the RESULT and failed tests/test_leave_job.py.
"""

from __future__ import annotations

import subprocess
import sys

from . import noisy_worker
from .multiproc import Worker, finish, popen, stderr_of, wait_for


def test_native_writes_to_fd_1_never_reach_the_protocol_lines() -> None:
    proc, errors = popen("tests.noisy_worker")
    worker = Worker(0, proc, errors=errors)
    assert wait_for(worker, "EVENT STARTED", timeout=60) == "EVENT STARTED\n"
    finish([worker], timeout=60)
    assert proc.returncode == 0, stderr_of(errors)
    assert len(worker.lines) == 2 and worker.lines[1].startswith("RESULT "), worker.lines
    assert worker.result() == {"ok": True, "pid": proc.pid}
    noise = noisy_worker.NOISE.decode().strip()
    assert stderr_of(errors, n=10_000).count(noise) == 201


def test_lines_read_ahead_with_an_awaited_event_reach_finish() -> None:
    # One write, so the pipe hands both lines over in one read: wait_for's
    # text stream buffers the RESULT while it returns the EVENT. finish once
    # read the pipe's descriptor itself and lost that RESULT (a flaky
    # test_native_writes_to_fd_1... in make test).
    script = "import sys; sys.stdout.write('EVENT STARTED\\nRESULT {\"ok\": true}\\n')"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = Worker(0, proc)
    assert wait_for(worker, "EVENT STARTED", timeout=60) == "EVENT STARTED\n"
    finish([worker], timeout=60)
    assert proc.returncode == 0
    assert worker.lines == ["EVENT STARTED", 'RESULT {"ok": true}']


def test_a_worker_with_a_full_pipe_does_not_hold_up_the_one_waited_for() -> None:
    # The first worker exits only once the second has written 1 MiB (more than a
    # pipe holds) and exited: finish() must read the second while waiting for the first.
    second = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdout.write('x' * (1 << 20) + '\\nRESULT {}\\n')"],
        stdout=subprocess.PIPE,
        text=True,
    )
    status = f"/proc/{second.pid}/status"  # "State:\tZ": exited, not yet reaped by us
    script = f"import time\nwhile 'State:\\tZ' not in open({status!r}).read(): time.sleep(0.05)"
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = finish([Worker(0, first), Worker(1, second)], timeout=20)
    assert [w.proc.returncode for w in workers] == [0, 0], workers[0].lines
    assert workers[1].lines == ["x" * (1 << 20), "RESULT {}"]
