"""Several local processes joined by jax.distributed, saving to S3, GCS and files."""

from __future__ import annotations

from pathlib import Path

import pytest

import atomicity
import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread
from cloudckpt.testing.servers import LocalServers

from . import mp_worker
from .helpers import BUCKET, unique
from .multiproc import finish, kill, launch, tail, wait_for

TOTAL_BYTES = sum(a.nbytes for a in mp_worker.expected_arrays().values())


@pytest.fixture(scope="module")
def roots(servers: LocalServers, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return [
        str(tmp_path_factory.mktemp("mh") / "run"),
        f"s3://{BUCKET}/{unique('mh')}",
        f"gs://{BUCKET}/{unique('mh')}",
    ]


def results(workers) -> list[dict]:
    out = []
    for w in workers:
        result = w.result()
        assert w.proc.returncode == 0 and result is not None, tail(w)
        out.append(result)
    return out


def test_a_peer_meeting_late_on_the_last_meeting_does_not_hang_the_others() -> None:
    """Waiting longer than the liveness period asked JAX for its live nodes, a barrier the
    late peer (already past the meeting) never joined: the early process hung forever
    in the job's last meeting, and so did jax.distributed's shutdown."""
    workers = finish(launch(2, 1, "late", [], late_s=3), timeout=90)
    out = results(workers)
    waited = {r["process"]: r["waited_s"] for r in out}
    assert waited[0] >= 2.5 and waited[1] < waited[0], waited  # process 0 really waited


def test_save_on_2x4_restore_on_1x8_1x2_4x2(roots: list[str]) -> None:
    saved = results(finish(launch(2, 4, "save", roots)))
    for url in roots:
        primary, other = saved[0][url], saved[1][url]
        assert primary["steps"] == other["steps"] == [2]  # max_to_keep=1 on both processes
        assert primary["checked_bytes"] > 0 and other["checked_bytes"] > 0
        # Only the primary lists and deletes; the other process only reads and writes data.
        assert other["calls"].get("list", 0) == 0
        assert not {"delete", "delete_prefix", "rename"} & set(other["calls"])
        assert primary["calls"].get("list", 0) >= 1
    for processes, devices in ((1, 8), (1, 2), (4, 2)):
        restored = results(finish(launch(processes, devices, "restore", roots)))
        for url in roots:
            assert all(r[url]["step"] == 2 for r in restored)
            checked = sum(r[url]["checked_bytes"] for r in restored)
            # Every process checks the shards its devices hold: all bytes, once per replica.
            assert checked >= TOTAL_BYTES, (processes, devices, url, checked)


def _after_fault(url: str, loop: LoopThread) -> None:
    """A fresh single process finds step 1 committed and nothing of step 2 after clean-up."""
    with cc.CheckpointManager(url) as mngr:
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1]
    root = cc.StoragePath.from_url(url)
    try:
        assert [c.name for c in loop.run(atomicity.scan(root.backend, root.path))] == ["1"]
    finally:
        loop.run(root.backend.aclose())  # its client lives on the test's loop


@pytest.fixture
def s3_root(servers: LocalServers) -> str:
    return f"s3://{BUCKET}/{unique('fault')}"


def test_a_process_raising_fails_every_save(s3_root: str, loop: LoopThread) -> None:
    out = results(finish(launch(2, 2, "fault", [s3_root], raise_on=1), timeout=120))
    assert "process 1 failed: OSError: injected failure on process 1" in out[0]["error"]
    assert s3_root + "/2" in out[0]["error"]
    assert "injected failure on process 1" in out[1]["error"] and s3_root + "/2" in out[1]["error"]
    assert out[0]["steps"] == out[1]["steps"] == [1]
    _after_fault(s3_root, loop)


def test_a_process_killed_mid_write(s3_root: str, loop: LoopThread) -> None:
    workers = launch(2, 2, "fault", [s3_root], stall_on=1, barrier_s=60)
    wait_for(workers[1], "EVENT COMMITTED")
    wait_for(workers[1], "EVENT WRITES")
    kill(workers[1])
    finish(workers, timeout=90)
    survivor = workers[0].result()
    assert survivor is not None, tail(workers[0])
    assert (
        "process" in survivor["error"]
        and "[1]" in survivor["error"]
        and s3_root + "/2" in survivor["error"]
    )
    assert survivor["steps"] == [1]
    _after_fault(s3_root, loop)


def test_primary_killed_before_the_marker(s3_root: str, loop: LoopThread) -> None:
    workers = launch(2, 2, "fault", [s3_root], stall_finalize_on=0, barrier_s=60)
    wait_for(workers[0], "EVENT COMMITTED")
    wait_for(workers[0], "EVENT FINALIZE")
    kill(workers[0])
    finish(workers, timeout=90)
    # The other process must not hang: it fails (or JAX ends it) once the primary is gone.
    assert workers[1].proc.returncode is not None
    assert not any("hung" in line for line in workers[1].lines), tail(workers[1])
    root = cc.StoragePath.from_url(s3_root)
    try:
        assert not loop.run(atomicity.is_committed(root.backend, f"{root.path}/2"))
    finally:
        loop.run(root.backend.aclose())
    _after_fault(s3_root, loop)


def test_active_processes_must_include_the_primary() -> None:
    with pytest.raises(ValueError, match="primary_host 1 is not among the active processes"):
        cc.Checkpointer(
            cc.CompositeCheckpointHandler(),
            multiprocessing_options=cc.MultiprocessingOptions(
                primary_host=1, active_processes=frozenset({0})
            ),
        )


def test_single_process_needs_no_distributed(tmp_path: Path) -> None:
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ck:
        assert ck.process_group.single
        ck.save(str(tmp_path / "x"), args=cc.args.Composite(meta=cc.args.JsonSave(1)))
