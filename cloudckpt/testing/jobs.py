"""Leaving a ``jax.distributed`` job without tripping over its coordination service.

``jax.distributed.shutdown()`` on the process that hosts the coordination
service stops its gRPC server right after the shutdown barrier, while the
other processes may still be talking to it (their own shutdown answers,
heartbeats, error polls). jaxlib 0.10's server then sometimes aborts the
process in gRPC's teardown (``server.cc: Check failed: queue.Pop() ==
nullptr``, SIGABRT) after all its work is done: seen once in a CI run of a
two-process restore. :func:`leave_job` keeps the same order of events but
stops the service only once every other process of the job has exited, so
that no request can arrive while the server is torn down.

Test and benchmark workers end with it instead of ``jax.distributed.shutdown()``.
"""

from __future__ import annotations

import os
import sys
import time

from atomicity.claims import host_identity, pid_alive

_KEY = "cloudckpt-testing/leave/"


def leave_job(timeout_s: float = 60.0, *, exit_code: int | None = 0) -> None:
    """Leaves the job: every process shuts its client down (JAX's shutdown barrier);
    the service's process then waits up to ``timeout_s`` for the others' PIDs to
    exit before stopping the service.

    Peers are waited for only when they run on this host (a multi-process test
    or benchmark); elsewhere the service stops as ``jax.distributed`` would.
    With ``exit_code`` (the default), the process then flushes its output and
    exits at once: the interpreter's own teardown of jaxlib's objects once hung
    a worker whose job had ended (1 run in 93 of a two-process stress loop).
    """
    import jax
    from jax._src import distributed

    state = distributed.global_state
    if state.client is None:
        return
    me = jax.process_index()
    client = state.client
    client.key_value_set(f"{_KEY}{me}", f"{host_identity()} {os.getpid()}")
    peers: list[int] = []
    service, state.service = state.service, None
    if service is not None:
        for p in range(jax.process_count()):
            if p == me:
                continue
            host, pid = client.blocking_key_value_get(f"{_KEY}{p}", int(timeout_s * 1000)).rsplit(
                " ", 1
            )
            if host == host_identity():
                peers.append(int(pid))
    state.shutdown()  # the preemption manager, then the client (the shutdown barrier)
    if service is not None:
        deadline = time.monotonic() + timeout_s
        while any(pid_alive(pid) for pid in peers) and time.monotonic() < deadline:
            time.sleep(0.01)
        service.shutdown()
    if exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
