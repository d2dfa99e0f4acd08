"""Waiting for the machine to be quiet before a timed measurement.

The object-store emulators keep their objects in files. The raw channel's
yardstick PUTs a tree's worth of bytes and deletes them, and the kernel writes
those pages back and discards the freed blocks afterwards: measured at 4 GiB
on GCS, about 100 MB/s of writeback through each PUT-and-GET, and 4.3 GB of
discards with 12-15% iowait in the three seconds before the restore timed
next. ``settle`` flushes dirty pages and waits for idle disks and CPUs before
each timed measurement, so that none starts inside that work.

It is hygiene, not the cause of the variance it was written for: in the first
4 GiB run with it, 37 of 40 waits ended at the 0.5 s minimum, and the restore
timed after the raw GET still took 4.3-6.8 s against 3.5-4.6 s for the
handler restore of the same repetition. Alone, a restore right after the raw
channel's 4 GiB of bodies were allocated and freed was slower whether it went
through the Checkpointer or the handler, with more system time: the cost is
the memory, not the disk.
"""

from __future__ import annotations

import os
import time

#: The machine counts as quiet once no disk was busy and the CPUs were mostly idle for this long.
QUIET_S = 0.5
#: Busy share of all CPUs (user, system, iowait...) below which they count as idle.
IDLE_BELOW = 0.25
#: The longest wait: a machine busy with someone else's work is measured as it is.
MAX_S = 20.0
_POLL_S = 0.1


def _disk_ticks() -> int | None:
    """Milliseconds the whole disks have been busy, summed (None without /proc/diskstats)."""
    try:
        with open("/proc/diskstats") as f:
            lines = [line.split() for line in f]
        disks = set(os.listdir("/sys/block"))  # whole disks: a partition's time is its disk's
    except OSError:
        return None
    return sum(
        int(fields[12])  # io_ticks
        for fields in lines
        if len(fields) >= 14 and fields[2] in disks and not fields[2].startswith(("loop", "ram"))
    )


def _cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs since boot (None without /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3]
    return sum(fields) - idle, sum(fields)


def settle(max_s: float = MAX_S, idle_below: float = IDLE_BELOW) -> float:
    """Flushes dirty pages, then waits until disks and CPUs have been quiet for ``QUIET_S``.

    CPUs count as quiet while their busy share stays below ``idle_below``.

    Returns the seconds it took (at most about ``max_s`` after the flush).
    Where /proc is missing (not Linux), only the flush happens.
    """
    start = time.monotonic()
    os.sync()
    disk, cpu = _disk_ticks(), _cpu()
    if disk is None or cpu is None:
        return time.monotonic() - start
    quiet_since = time.monotonic()
    while time.monotonic() - start < max_s:
        time.sleep(_POLL_S)
        now_disk, now_cpu = _disk_ticks(), _cpu()
        if now_disk is None or now_cpu is None:
            break
        busy = (now_cpu[0] - cpu[0]) / max(now_cpu[1] - cpu[1], 1)
        if now_disk != disk or busy >= idle_below:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            break
        disk, cpu = now_disk, now_cpu
    return time.monotonic() - start
