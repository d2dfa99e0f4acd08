"""A worker for tests/test_zygote.py: reports what a forked worker sees, or acts as told.

``python -m tests.zygote_probe [exit N | raise | echo | sleep S | ARGS...]``.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import sys
import time
import uuid


def main(args: list[str]) -> None:
    if args[:1] == ["exit"]:
        atexit.register(lambda: print("atexit ran", flush=True))
        sys.exit(int(args[1]))
    if args[:1] == ["raise"]:
        raise ValueError("probe failure")
    if args[:1] == ["echo"]:
        for line in sys.stdin:
            print(line, end="", flush=True)
        return
    if args[:1] == ["sleep"]:
        time.sleep(float(args[1]))
        return
    report = {
        "argv": sys.argv,
        "env": os.environ.get("ZYGOTE_PROBE"),
        "pid": os.getpid(),
        "random": random.random(),
        "uuid": uuid.uuid4().hex,
        "name": __name__,
        # cloudckpt refuses a process forked from one that loaded it: the zygote must not.
        "cloudckpt_loaded": "cloudckpt" in sys.modules,
        "jax_loaded": "jax" in sys.modules,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
