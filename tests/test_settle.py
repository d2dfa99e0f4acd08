"""The phase benchmark's wait for a quiet machine (``benchmarks/settle.py``).

It must not call a busy machine quiet (a timed restore would again start in
someone else's work), and must give up at its cap on one that stays busy.
"""

from __future__ import annotations

import os
import threading
import time

from benchmarks.settle import QUIET_S, settle


def test_a_busy_cpu_is_not_quiet_and_the_wait_stops_at_its_cap() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        # One spinning thread keeps about 1/ncpu of the CPUs busy: over half of that is busy.
        took = settle(max_s=1.5, idle_below=0.5 / (os.cpu_count() or 1))
    finally:
        stop.set()
        spinner.join()
    assert 1.5 <= took < 3.0, took


def test_an_idle_machine_is_quiet_after_the_quiet_window() -> None:
    start = time.monotonic()
    took = settle(max_s=10.0, idle_below=1.01)  # CPUs never count as busy: disks only
    assert QUIET_S <= took < 10.0 and time.monotonic() - start >= QUIET_S, took
