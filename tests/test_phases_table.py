"""The restore_phases benchmark's per-run record of who had the cores, and its table rows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from benchmarks.phases import _machine_ticks, _proc_cpu_s
from benchmarks.phases_table import table_lines


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_process_cpu_grows_with_the_work_it_does() -> None:
    before = _proc_cpu_s(os.getpid())
    assert before is not None
    _spin(0.2)
    after = _proc_cpu_s(os.getpid())
    assert after is not None and after - before >= 0.15


def test_no_process_no_cpu() -> None:
    assert _proc_cpu_s(None) is None
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert _proc_cpu_s(int(done.stdout)) is None  # exited and reaped: no such process


def test_machine_ticks_count_busy_time_apart_from_idle() -> None:
    first = _machine_ticks()
    assert first is not None
    _spin(0.3)
    second = _machine_ticks()
    assert second is not None
    total, idle, steal = (b - a for a, b in zip(first, second, strict=True))
    assert total > 0 and 0 <= idle < total and 0 <= steal <= total
    assert total - idle >= 0.2 * os.sysconf("SC_CLK_TCK")  # the spin was busy time


def _backend(cpu: dict[str, dict[str, list[float]]]) -> dict[str, object]:
    return {
        "times": {"restore": {"median_s": 0.5}},
        "ratios": {},
        "requests": {},
        "rss": {"multiple": 1.0},
        "phase_sum_s": 0.4,
        "cpu": cpu,
    }


def test_the_table_shows_each_runs_server_cpu_idle_and_steal() -> None:
    gcs = _backend(
        {
            "resharded": {
                "user_s": [0.5, 0.6],
                "sys_s": [0.3, 0.4],
                "minor_faults": [1000, 2000],
                "server_s": [0.41, 0.55],
                "idle_share": [0.21, 0.3],
                "steal_share": [0.0, 0.04],
            }
        }
    )
    file = _backend({"resharded": {"user_s": [0.2], "sys_s": [0.1], "minor_faults": [5]}})
    lines = table_lines({"bytes": 2**30, "backends": {"gcs": gcs, "file": file}})
    # Label and cells are set apart by two spaces or more; labels have single spaces.
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines if line.startswith("each run")]
    rows = {label: values for label, *values in cells}
    assert rows["each run: server CPU s, 2x4"] == ["0.41/0.55", "-"]
    assert rows["each run: machine idle, 2x4"] == ["21%/30%", "-"]
    assert rows["each run: steal, 2x4"] == ["0%/4%", "-"]
    assert rows["each run: minor faults k, 2x4"] == ["1/2", "0"]  # thousands
