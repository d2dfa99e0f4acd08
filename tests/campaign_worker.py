"""A process of the multi-writer campaign (tests/test_protocol_campaign.py).

``python -m tests.campaign_worker writer ROOT ID [restart]`` reads lines
``save <step> <grace_s> <seed>`` from stdin and saves that step with a payload
of its own, printing one JSON line per save: its outcome as the caller sees
it. With ``restart`` it first opens a CheckpointManager on ROOT (whose
start-up clean-up runs, as a restarted job's does).

``python -m tests.campaign_worker gc ROOT`` runs ``cloudckpt gc --yes ROOT``
in a loop until stdin closes.
"""

from __future__ import annotations

import io
import json
import random
import select
import sys
from typing import Any

import atomicity
import cloudckpt as cc
from cloudckpt import cli


def payload(writer: str, step: int, seed: int) -> dict[str, Any]:
    rng = random.Random(f"{writer}/{step}/{seed}")
    return {"writer": writer, "step": step, "data": [rng.randrange(2**31) for _ in range(64)]}


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "committed"
    if isinstance(exc, atomicity.OutcomeUnknownError):
        return "unknown"
    if isinstance(exc, FileExistsError):
        return "refused"
    return "failed"


def writer(root: str, name: str, restart: bool) -> None:
    if restart:
        opts = cc.CheckpointManagerOptions(enable_async=False, cleanup_uncommitted_on_start=True)
        with cc.CheckpointManager(root, options=opts) as mngr:
            mngr.wait_until_finished()
    print(json.dumps({"ready": name}), flush=True)
    for line in sys.stdin:
        _, step_text, grace_text, seed_text = line.split()
        step, grace, seed = int(step_text), float(grace_text), int(seed_text)
        data = payload(name, step, seed)
        error: BaseException | None = None
        with cc.Checkpointer(cc.CompositeCheckpointHandler(), grace_s=grace) as ck:
            try:
                ck.save(f"{root}/{step}", args=cc.args.Composite(meta=cc.args.JsonSave(data)))
            except Exception as exc:
                error = exc
        print(
            json.dumps(
                {
                    "writer": name,
                    "step": step,
                    "outcome": outcome_of(error),
                    "error": "" if error is None else f"{type(error).__name__}: {error}"[:300],
                    "payload": data,
                }
            ),
            flush=True,
        )


def gc_loop(root: str) -> None:
    runs = 0
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.05)
        if ready and not sys.stdin.readline():
            break
        cli.main(["gc", "--yes", "--json", root], stdout=io.StringIO(), stderr=io.StringIO())
        runs += 1
    print(json.dumps({"gc_runs": runs}), flush=True)


if __name__ == "__main__":
    role, root = sys.argv[1], sys.argv[2]
    if role == "gc":
        gc_loop(root)
    else:
        writer(root, sys.argv[3], len(sys.argv) > 4 and sys.argv[4] == "restart")
