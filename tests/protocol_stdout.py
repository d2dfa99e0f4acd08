"""Runs a test worker with its stdout kept for the lines its parent parses.

``python -m tests.protocol_stdout MODULE ARGS...`` runs ``python -m MODULE ARGS...``
after moving file descriptor 1 onto the worker's stderr. Native libraries in
the workers write to fd 1 from their own threads whenever they like: gloo's
"[Gloo] Rank 0 is connected to 1 peer ranks..." arrived in the middle of a
worker's ``RESULT {...}`` line, and the parent could not parse it. Python's
``sys.stdout`` keeps the original pipe, so the worker's ``print`` reaches the
parent and nothing native does.
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    module, *args = sys.argv[1:]
    protocol = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(protocol, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 (the process's stdout)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
