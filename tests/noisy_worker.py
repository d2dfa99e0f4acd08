"""Stands for a worker whose native code writes to fd 1 around its protocol lines.

Run through ``tests.protocol_stdout`` by tests/test_multiproc_harness.py: gloo
writes its "connected" log with C stdio, unbuffered by Python and without
regard for line boundaries, just as ``os.write(1, ...)`` does here.
"""

from __future__ import annotations

import json
import os
import threading

NOISE = b"[Gloo] Rank 0 is connected to 1 peer ranks. "


def main() -> None:
    print("EVENT STARTED", flush=True)
    os.write(1, NOISE)  # no newline: the next write to fd 1 would continue this line
    noisy = threading.Thread(target=lambda: [os.write(1, NOISE) for _ in range(200)])
    noisy.start()
    print("RESULT", json.dumps({"ok": True, "pid": os.getpid()}), flush=True)
    noisy.join()
    os.write(1, b"\n")


if __name__ == "__main__":
    main()
