"""Save (then restore) one tree, pausing after each until told to go on: the hedge-cancel client.

Run as ``python -m tests.hedge_cancel_worker URL FLOOR_S ATTEMPTS HEDGE_FLOOR_S`` with the
client environment pointing at a :class:`cloudckpt.testing.stallproxy.StallProxy`
(``tests/test_hedge_cancel.py``). After the save returns, and again after the
restore returns, it prints one JSON line and waits for a line on stdin, so
that the test can look at the proxy while this process (and its connections)
still lives. A separate process because tensorstore reads its stall bound
once per process.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from tests.stall_worker import checkpointer, make_tree, target_of


def _pause(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)
    sys.stdin.readline()


def main(url: str, floor_s: float) -> dict[str, object]:
    import cloudckpt as cc

    tree = make_tree()
    target = target_of(tree)
    ckpt = checkpointer(floor_s)
    try:
        ckpt.save(url, args=cc.args.StandardSave(tree))
        _pause({"saved": True})
        restored = ckpt.restore(url, args=cc.args.StandardRestore(target))
        equal = set(tree) == set(restored) and all(
            np.array_equal(np.asarray(tree[k]), np.asarray(restored[k])) for k in tree
        )
        _pause({"restored": True, "equal": equal})
    finally:
        ckpt.close()
    return {"equal": equal}


if __name__ == "__main__":
    try:
        result = main(sys.argv[1], float(sys.argv[2]))
    except Exception as exc:  # reported to the test, which asserts on it
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
        sys.exit(3)
    print(json.dumps(result), flush=True)
