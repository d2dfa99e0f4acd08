"""Every cloudckpt operation against one root, in its own process, phase by phase.

Run as ``python -m tests.cloud_worker ROOT_URL PHASE_URL`` with the client
environment pointing at a :class:`cloudckpt.testing.cloudproxy.CloudProxy`. Before each
operation it tells the proxy the phase's name (``GET PHASE_URL/<name>``), so
the proxy can file every request under the operation that made it. Prints one
JSON line of results; any failed operation raises (non-zero exit).

A separate process because tensorstore reads its GCS endpoint once per process.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import urllib.request

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

import cloudckpt as cc  # noqa: E402
from cloudckpt.cli import main as cli_main  # noqa: E402
from cloudckpt.engine.loop import LoopThread  # noqa: E402
from cloudckpt.storage.path import StoragePath  # noqa: E402

from .test_cli import assert_same_tree, make_tree, restore, save  # noqa: E402


def phase(base: str, name: str) -> None:
    urllib.request.urlopen(f"{base}/{name}", timeout=10).close()


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def listed(url: str) -> list[str]:
    root = StoragePath.from_url(url)

    async def run() -> list[str]:
        return sorted([i.path async for i in root.backend.list_prefix(root.path)])

    with LoopThread("worker-list") as loop:
        return loop.run(run())


def main(root: str, phases: str) -> dict[str, object]:
    results: dict[str, object] = {}
    tree = make_tree()

    phase(phases, "save")
    save(f"{root}/ckpt/1", tree)

    phase(phases, "restore")
    assert_same_tree(restore(f"{root}/ckpt/1")["state"], tree)

    phase(phases, "manager-save-retention")
    options = cc.CheckpointManagerOptions(max_to_keep=2)
    with cc.CheckpointManager(f"{root}/run", options=options) as mngr:
        for step in (1, 2, 3):
            mngr.save(step, args=cc.args.Composite(state=cc.args.StandardSave(tree)))
        mngr.wait_until_finished()
        results["all_steps_after_retention"] = mngr.all_steps()

    phase(phases, "manager-restore")
    with cc.CheckpointManager(f"{root}/run", options=options) as mngr:
        results["all_steps_reopened"] = mngr.all_steps()
        got = mngr.restore(mngr.latest_step())
        assert np.asarray(got["state"]["params"]["w"]).tobytes() == (
            np.asarray(tree["params"]["w"]).tobytes()
        )

    phase(phases, "clean-up")
    # A crashed save: the step's objects without a commit marker.
    half = StoragePath.from_url(f"{root}/run/9")
    with LoopThread("worker-crash") as loop:
        tmp = half.backend.default_temporary_path_class().from_final(
            half.path, half.backend, grace_s=0.0
        )
        where = loop.run(tmp.create())
        loop.run(half.backend.put(f"{where}/state/pytree.json", b"half-written"))
    # Staleness is judged by the store's clock, which S3 and GCS report in whole
    # seconds: let the zero-grace claim be visibly older than its grace.
    time.sleep(1.1)
    no_grace = cc.CheckpointManagerOptions(max_to_keep=2, enable_async=False, grace_s=0.0)
    with cc.CheckpointManager(f"{root}/run", options=no_grace) as mngr:
        mngr.wait_until_finished()
    results["crashed_left"] = [p for p in listed(f"{root}/run") if "/9" in p]

    for name, argv in (
        ("cli-ls", ("ls", "--json", f"{root}/run")),
        ("cli-inspect", ("inspect", "--json", f"{root}/ckpt/1")),
        ("cli-verify", ("verify", f"{root}/ckpt/1")),
        ("cli-cp", ("cp", f"{root}/ckpt/1", f"{root}/copy/1")),
        ("cli-gc", ("gc", "--yes", "--include-live", f"{root}/run")),
        ("cli-rm", ("rm", "--yes", f"{root}/copy/1")),
    ):
        phase(phases, name)
        code, out, err = cli(*argv)
        if code != 0:
            raise RuntimeError(f"cloudckpt {' '.join(argv)} exited {code}: {err}")
        if name == "cli-ls":
            results["ls"] = out
    results["copy_left"] = listed(f"{root}/copy")
    results["objects"] = len(listed(root))
    phase(phases, "done")
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
