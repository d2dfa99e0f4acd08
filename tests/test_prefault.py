"""Fresh host buffers are mapped ahead of their fill (issues 14 and 18).

A restore's buffers and a save's device-to-host copies are new memory, and
on this project's machines (Firecracker VMs that hand freed memory back to
their host) filling new memory fault by fault cost 0.75 s per GiB against
0.35 s mapped in one ``MADV_POPULATE_WRITE`` call. These tests check, through
``mincore``, that :func:`prefault` does map a fresh buffer's pages, that it
never changes a byte (it runs while reads fill the same buffer), and that a
kernel refusing the advice leaves everything as it was.

Each step of the mapping also picks a page size (``host.PageSizes``): huge
pages where they map faster (memory freed a moment ago), small ones where
they do not (memory handed back to the hypervisor). The advice is read back
from ``/proc/self/smaps`` ("hg" asked for huge pages, "nh" refused them).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloudckpt.handlers.pytree import host
from cloudckpt.handlers.pytree.host import (
    PREFAULT_EXPLORE,
    PREFAULT_MIN_BYTES,
    PREFAULT_STEP,
    PageSizes,
    prefault,
)

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def _fresh(shape: tuple[int, ...], dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """A buffer of new anonymous pages, none touched yet (its own mapping, kept alive by it).

    Not ``np.empty``: in a process that has allocated and freed a lot, malloc may
    hand back memory that is still mapped, and these tests need pages that are not.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8).view(dtype).reshape(shape)


def _resident(buffer: np.ndarray) -> float:
    """Share of the whole pages inside ``buffer`` that are mapped (``mincore``)."""
    start = -(-buffer.ctypes.data // _PAGE) * _PAGE
    end = (buffer.ctypes.data + buffer.nbytes) // _PAGE * _PAGE
    pages = (end - start) // _PAGE
    vec = (ctypes.c_ubyte * pages)()
    assert _libc.mincore(start, end - start, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / pages


def test_a_fresh_buffer_is_mapped_by_one_call() -> None:
    buffer = _fresh((64 << 20,))
    before = _resident(buffer)
    prefault([buffer])
    assert before < 0.5  # new pages, never touched
    assert _resident(buffer) == 1.0


def test_small_buffers_are_left_to_their_faults() -> None:
    small = _fresh((PREFAULT_MIN_BYTES // 2,))
    big = _fresh((PREFAULT_MIN_BYTES * 2,))
    prefault([small, big])
    assert _resident(big) == 1.0


def test_contents_are_never_changed() -> None:
    rng = np.random.default_rng(14)
    data = rng.integers(0, 256, 32 << 20, dtype=np.uint8)
    buffer = _fresh(data.shape, data.dtype)
    buffer[: len(data) // 2] = data[: len(data) // 2]  # half filled, half fresh
    prefault([buffer])
    np.testing.assert_array_equal(buffer[: len(data) // 2], data[: len(data) // 2])
    buffer[len(data) // 2 :] = data[len(data) // 2 :]
    np.testing.assert_array_equal(buffer, data)


def test_a_fill_racing_the_prefault_keeps_every_byte() -> None:
    # As in a restore: the reads fill the buffer while a worker thread maps it.
    rng = np.random.default_rng(18)
    data = rng.integers(0, 256, 128 << 20, dtype=np.uint8)
    for _ in range(3):
        buffer = _fresh(data.shape, data.dtype)
        worker = threading.Thread(target=prefault, args=([buffer],))
        worker.start()
        for lo in range(0, len(data), 1 << 20):
            buffer[lo : lo + (1 << 20)] = data[lo : lo + (1 << 20)]
        worker.join()
        np.testing.assert_array_equal(buffer, data)


def test_views_map_only_their_own_pages() -> None:
    backing = _fresh((48 << 20,))
    view = backing[12345 : 12345 + (16 << 20)]  # unaligned both ends
    prefault([view])
    assert _resident(view) == 1.0
    assert _resident(backing[(20 << 20) :]) < 0.5  # past the view: untouched


def test_a_kernel_without_the_advice_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernels before 5.14 answer EINVAL; the buffers then fault in as they are filled.
    monkeypatch.setattr(host, "_MADV_POPULATE_WRITE", 0x7FFF)
    data = np.arange(8 << 20, dtype=np.uint32)
    buffers = [_fresh(data.shape, data.dtype) for _ in range(2)]
    prefault(buffers)
    for buffer in buffers:
        buffer[...] = data
        np.testing.assert_array_equal(buffer, data)


def test_other_systems_are_never_given_the_linux_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    # The advice is a number; on macOS or BSD the same number means something else.
    monkeypatch.setattr(host.sys, "platform", "darwin")
    host._madvise.cache_clear()  # looked up again, as on that system
    try:
        buffer = _fresh((32 << 20,))
        prefault([buffer])
        assert _resident(buffer) < 0.5
    finally:
        host._madvise.cache_clear()  # the next caller looks libc up again


# ------------------------------------------------------------------ page sizes
_HUGE = 2 << 20
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()


def _private(nbytes: int) -> np.ndarray:
    """Fresh private anonymous memory, as malloc hands a large array (``_fresh`` is shared)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), np.uint8)


def _aligned(nbytes: int, offset: int = 0) -> np.ndarray:
    """``nbytes`` of fresh memory starting ``offset`` bytes past a step's boundary."""
    backing = _private(nbytes + offset + PREFAULT_STEP)
    start = -backing.ctypes.data % PREFAULT_STEP + offset
    return backing[start : start + nbytes]


def _advice(buffer: np.ndarray) -> dict[str, int]:
    """Bytes of ``buffer`` advised huge pages ("hg"), small ones ("nh"), or neither."""
    first, last = buffer.ctypes.data, buffer.ctypes.data + buffer.nbytes
    out = {"hg": 0, "nh": 0, "none": 0}
    lo = hi = 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
        elif head == "VmFlags:" and lo < last and hi > first:
            flags = set(line.split()[1:])
            key = "hg" if "hg" in flags else "nh" if "nh" in flags else "none"
            out[key] += min(hi, last) - max(lo, first)
    assert sum(out.values()) == buffer.nbytes
    return out


class _Costs(PageSizes):
    """Page sizes that find huge pages ``ratio`` times as dear as small ones, whatever the clock says."""

    def __init__(self, ratio: float, watch: list[np.ndarray] | None = None) -> None:
        super().__init__()
        self.ratio = ratio
        self.tried: list[bool] = []
        self.watch = watch or []
        self.seen: list[dict[str, int]] = []  # the watched buffers' advice at the third step

    def record(self, huge: bool, seconds: float, nbytes: int) -> None:
        self.tried.append(huge)
        if len(self.tried) == 3:
            self.seen = [_advice(b) for b in self.watch]
        super().record(huge, nbytes * 1e-10 * (self.ratio if huge else 1.0), nbytes)


def test_each_size_is_measured_then_the_faster_is_used_and_the_other_retried() -> None:
    pages = PageSizes()
    assert pages.pick() is True  # huge first (numpy's own advice), then small
    pages.record(True, 3.0, 1)
    assert pages.pick() is False
    pages.record(False, 1.0, 1)
    picks = [pages.pick() for _ in range(3 * PREFAULT_EXPLORE)]
    assert picks.count(True) == 3  # the slower size retried once per PREFAULT_EXPLORE steps
    assert all(p is False for k, p in enumerate(picks, 3) if k % PREFAULT_EXPLORE)
    pages.record(True, 0.5, 1)  # huge pages got cheaper (memory freed a moment ago)
    assert pages.best() is True and pages.pick() is True


def test_steps_cover_every_whole_page_once_cut_on_step_boundaries() -> None:
    buffer = _aligned(5 * PREFAULT_STEP + 12345, offset=_PAGE + 99)
    steps = host._steps([buffer])
    first = -(-buffer.ctypes.data // _PAGE) * _PAGE
    last = (buffer.ctypes.data + buffer.nbytes) // _PAGE * _PAGE
    assert steps[0][0] == first and steps[-1][1] == last
    assert all(a[1] == b[0] for a, b in itertools.pairwise(steps))
    assert all(lo % PREFAULT_STEP == 0 for lo, _ in steps[1:])
    assert all(hi - lo <= PREFAULT_STEP for lo, hi in steps)
    assert host._merged(steps) == [(first, last)]


@pytest.mark.parametrize("ratio", [4.0, 0.25])
def test_the_rest_of_the_buffers_is_advised_the_faster_size(ratio: float) -> None:
    buffers = [_aligned(8 * PREFAULT_STEP) for _ in range(3)]
    pages = _Costs(ratio, watch=buffers)
    prefault(buffers, pages)
    huge_faster = ratio < 1
    assert pages.tried[:2] == [True, False]  # both measured on the first two steps
    explored = sum(1 for t in pages.tried[2:] if t != huge_faster)
    assert explored == len(pages.tried) // PREFAULT_EXPLORE
    for b in buffers:
        assert _resident(b) == 1.0
    if not _THP:  # a kernel without huge pages shows no size advice: nothing more to read
        return
    got = [_advice(b) for b in buffers]
    steps_of = {True: "hg", False: "nh"}
    # Every step has the faster size but the slower one's first measure and its retries.
    assert explored >= 1 and len(pages.tried) == 24
    assert sum(g[steps_of[huge_faster]] for g in got) == (24 - 1 - explored) * PREFAULT_STEP
    assert sum(g[steps_of[not huge_faster]] for g in got) == (1 + explored) * PREFAULT_STEP
    # As soon as both were measured, every step not yet mapped was advised the faster
    # size: bytes that land before the prefault gets there fault that size too.
    assert sum(g[steps_of[huge_faster]] for g in pages.seen) == 23 * PREFAULT_STEP


def test_ragged_ends_are_mapped_but_not_measured() -> None:
    # A buffer that neither starts nor ends on a huge page: its first and last steps fault
    # small pages whatever the advice, so they must not teach anything about huge ones.
    buffer = _aligned(2 * PREFAULT_STEP + 3 * _PAGE, offset=5 * _PAGE)
    pages = _Costs(4.0)
    prefault([buffer], pages)
    assert len(host._steps([buffer])) == 3 and len(pages.tried) == 1
    assert _resident(buffer) == 1.0


def test_both_sizes_are_timed_on_real_memory() -> None:
    pages = PageSizes()
    buffer = _aligned(4 * PREFAULT_STEP)
    prefault([buffer], pages)
    assert pages.cost[True] is not None and pages.cost[True] > 0
    assert pages.cost[False] is not None and pages.cost[False] > 0
    assert _resident(buffer) == 1.0


def test_a_kernel_without_huge_pages_still_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Kernels built without transparent huge pages refuse the size advice (EINVAL).
    monkeypatch.setattr(host, "_MADV_HUGEPAGE", 0x7FFE)
    monkeypatch.setattr(host, "_MADV_NOHUGEPAGE", 0x7FFD)
    data = np.random.default_rng(16).integers(0, 256, 3 * PREFAULT_STEP, dtype=np.uint8)
    buffer = _aligned(data.nbytes)
    prefault([buffer])
    assert _resident(buffer) == 1.0
    buffer[...] = data
    np.testing.assert_array_equal(buffer, data)


def _measures_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: Any, elements: int
) -> list[_Costs]:
    """The page-size measures ``module`` made in a save and a restore of four leaves.

    Each leaf holds ``elements`` float32 values; huge pages cost 4x small ones.
    """
    import cloudckpt as cc

    made: list[_Costs] = []

    def recording() -> _Costs:
        made.append(_Costs(4.0))
        return made[-1]

    monkeypatch.setattr(module, "PageSizes", recording)
    tree = {f"w{k}": np.full(elements, k, np.float32) for k in range(4)}
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckpt:
        ckpt.save(str(tmp_path / "c"), args=cc.args.StandardSave(tree))
        back = ckpt.restore(str(tmp_path / "c"), args=cc.args.StandardRestore(tree))
    for k in range(4):
        np.testing.assert_array_equal(np.asarray(back[f"w{k}"]), tree[f"w{k}"])
    return made


def test_a_save_measures_the_page_sizes_once_for_all_its_copies(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A save copies each region to the host in turn, on the path that blocks training;
    # measured per copy, half of every two-step copy went on the slower page size.
    from cloudckpt.handlers.pytree import plan

    made = _measures_made(monkeypatch, tmp_path, plan, 3 * PREFAULT_STEP // 4)
    assert len(made) == 1  # one measure for the whole save
    tried = made[0].tried
    assert len(tried) >= 4 * 2  # every copy's whole steps were measured with it
    assert tried[:2] == [True, False]
    assert tried[2:].count(True) == len(tried) // PREFAULT_EXPLORE  # no probe per copy


def test_a_restore_measures_the_page_sizes_once_for_all_its_reads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A restore maps each read group's new buffers ahead of its reads; measured per group,
    # every group put its first step on huge pages and its second on small ones.
    from cloudckpt.handlers.pytree import read

    # Four leaves of 32 MiB: a read group each, three whole steps each.
    made = _measures_made(monkeypatch, tmp_path, read, PREFAULT_STEP)
    assert len(made) == 1  # one measure for the whole restore, shared by its read groups
    tried = made[0].tried
    assert len(tried) >= 4 * 2  # every group's whole steps were measured with it
    # Huge pages (4x as dear here) went on the first steps (of the groups mapping at
    # once, before any time was known), then only on the every-PREFAULT_EXPLORE retry.
    assert False in tried
    assert tried.count(True) <= 4 + len(tried) // PREFAULT_EXPLORE
