"""Two-process jobs end cleanly: every worker exits 0 after its result (cloudckpt.testing.jobs).

jaxlib 0.10's ``jax.distributed.shutdown()`` stops the coordination service
right after the shutdown barrier; in CI the service's process once aborted in
gRPC's teardown (SIGABRT, after printing its result), and in a stress loop of
150 two-process jobs 3 workers hung in the interpreter's teardown. With
:func:`~cloudckpt.testing.jobs.leave_job` (the service stops once its peers
have exited, and every worker exits at once) the same loop ran 150 of 150
clean. A few jobs run by default; ``CLOUDCKPT_LONG=1`` runs 150.
"""

from __future__ import annotations

import os

import pytest

from .multiproc import finish, launch, tail

JOBS = 150 if os.environ.get("CLOUDCKPT_LONG") == "1" else 3


@pytest.mark.timeout(60 + 90 * JOBS)
def test_two_process_jobs_leave_cleanly() -> None:
    for job in range(JOBS):
        workers = finish(launch(2, 2, "leave", []), timeout=90)
        for w in workers:
            assert w.proc.returncode == 0 and w.result() is not None, (job, tail(w))
        # The primary's value reached every process: the job really met before leaving.
        assert [w.result()["agreed"] for w in workers] == [7, 7], job
