"""The fork server the suite's workers start from (tests/zygote.py) behaves like ``python -m``.

Workers forked from it must not share what a fresh interpreter would not:
its environment, arguments, streams, random state and exit status are each
worker's own, and a signal reaches only the worker it names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from . import zygote

SCRIPT = "tests.zygote_probe"


def _probe(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    done = zygote.run(SCRIPT, list(args), env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_each_worker_gets_its_own_arguments_environment_and_random_state() -> None:
    env = {**os.environ, "ZYGOTE_PROBE": "one"}
    first = _probe("a", "b c", env=env)
    second = _probe("d", env={**os.environ, "ZYGOTE_PROBE": "two"})
    # As with ``python -m``, argv[0] is the module's file.
    assert first["argv"] == [str(zygote.REPO / "tests" / "zygote_probe.py"), "a", "b c"]
    assert second["argv"][1:] == ["d"]
    assert (first["env"], second["env"]) == ("one", "two")
    assert first["pid"] != second["pid"] != os.getpid()
    # Python reseeds ``random`` at fork and uuid4 reads os.urandom: no two workers agree.
    assert first["random"] != second["random"] and first["uuid"] != second["uuid"]
    assert first["name"] == "__main__"
    # JAX comes imported (the point of the zygote); cloudckpt does not (it refuses forks).
    assert first["jax_loaded"] is True and first["cloudckpt_loaded"] is False


def test_exit_status_stderr_and_atexit_are_those_of_a_python_process() -> None:
    done = zygote.run(SCRIPT, ["exit", "7"], timeout=60)
    assert done.returncode == 7
    assert "atexit ran" in done.stdout  # the worker's atexit handlers run at its exit
    failed = zygote.run(SCRIPT, ["raise"], timeout=60)
    assert failed.returncode == 1 and "ValueError: probe failure" in failed.stderr
    missing = zygote.run("tests.no_such_module", [], timeout=60)
    assert missing.returncode == 1 and "No module named" in missing.stderr


def test_stdin_lines_reach_the_worker_and_a_kill_reaches_only_it() -> None:
    child = zygote.spawn(SCRIPT, ["echo"])
    bystander = zygote.spawn(SCRIPT, ["echo"])
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("hello\n")
        child.stdin.flush()
        assert child.stdout.readline() == "hello\n"
        child.kill()
        assert child.wait(30) == -signal.SIGKILL
        assert bystander.poll() is None  # still running, still answering
        assert bystander.stdin is not None and bystander.stdout is not None
        bystander.stdin.write("still here\n")
        bystander.stdin.flush()
        assert bystander.stdout.readline() == "still here\n"
    finally:
        for proc in (child, bystander):
            proc.kill()
            proc.wait(30)
    child.kill()  # after it was reaped: a no-op, never another process's signal
    assert child.returncode == -signal.SIGKILL


def test_a_worker_that_outlives_its_timeout_is_reported_and_can_be_killed() -> None:
    child = zygote.spawn(SCRIPT, ["sleep", "60"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            child.communicate(timeout=0.5)
        assert child.poll() is None
    finally:
        child.kill()
    assert child.wait(30) == -signal.SIGKILL
