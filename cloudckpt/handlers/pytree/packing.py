"""Every writer's pack layout at once, with numpy: what the primary needs for ``pytree.json``.

:func:`cloudckpt.handlers.pytree.layout.pack_layout` fills each writer's pack
objects one entry at a time. A process needs its own entries only (it lays
them out with ``pack_layout`` over its own shards), but the primary describes
every writer's in ``pytree.json``: on a pod that is one entry per leaf per
device (~19 million for a 1T-parameter state on 4,096 devices), too many to
build as Python objects. :class:`PackFill` runs the same greedy fill for all
writers at once, leaf by leaf, as arrays over writers; :func:`grid_runs`
turns a leaf's cells into the runs of its pack grid (format 3,
:mod:`cloudckpt.format.packed`) without building an entry. The results are
exactly ``pack_layout``'s (tests/test_plan_scale.py compares them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cloudckpt.format.layout import Index, PackEntry


@dataclass(frozen=True)
class Cells:
    """A packed leaf's cells (C order) grouped by writer: computed once per placement.

    ``depths[j]`` holds, for every writer with more than ``j`` cells, the
    writer and its ``j``-th cell (its cells in C order).
    """

    writers: np.ndarray  # int64, the writer of each cell
    order: np.ndarray  # cells sorted by writer, then C order
    ranks: np.ndarray  # per position of ``order``: the cell's rank among its writer's cells
    depths: tuple[tuple[np.ndarray, np.ndarray], ...]  # (writers, cells) per rank
    counts: np.ndarray  # cells of each writer of ``depths[0][0]``

    @classmethod
    def of(cls, writers: np.ndarray) -> Cells:
        writers = np.asarray(writers, np.int64)
        order = np.argsort(writers, kind="stable")
        unique, starts, counts = np.unique(writers[order], return_index=True, return_counts=True)
        ranks = np.arange(len(writers)) - np.repeat(starts, counts)
        depths = []
        for j in range(int(counts.max()) if len(counts) else 0):
            deep = counts > j
            depths.append((unique[deep], order[starts[deep] + j]))
        return cls(writers, order, ranks, tuple(depths), counts)


class PackFill:
    """``pack_layout``'s fill state (object number, bytes used) of every writer.

    Leaves are placed in ``pack_layout``'s order: the whole leaves' group,
    :meth:`next_group`, then the rest, each group in leaf order.
    """

    def __init__(self, max_object_bytes: int) -> None:
        self.max_object_bytes = max_object_bytes
        self.number = np.zeros(0, np.int64)
        self.used = np.zeros(0, np.int64)

    def _grow(self, writers: np.ndarray) -> None:
        top = int(writers.max()) + 1 if len(writers) else 0
        if top > len(self.used):
            extra = top - len(self.used)
            self.number = np.concatenate([self.number, np.zeros(extra, np.int64)])
            self.used = np.concatenate([self.used, np.zeros(extra, np.int64)])

    def next_group(self) -> None:
        """The next group starts an object of its own on every writer that has bytes."""
        self.number += self.used > 0
        self.used[:] = 0

    def place(self, cells: Cells, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Object number and offset of every cell; ``sizes`` per cell, crc32c included.

        Also whether some writer's cells of the leaf went to more than one object.
        """
        self._grow(cells.writers)
        number = np.empty(len(cells.writers), np.int64)
        offset = np.empty(len(cells.writers), np.int64)
        split = False
        for j, (writers, ids) in enumerate(cells.depths):
            size = sizes[ids]
            used = self.used[writers]
            full = (used > 0) & (used + size > self.max_object_bytes)
            n = self.number[writers] + full
            used = np.where(full, 0, used)
            number[ids] = n
            offset[ids] = used
            self.number[writers] = n
            self.used[writers] = used + size
            split = split or (j > 0 and bool(full.any()))
        return number, offset, split


def grid_runs(
    cells: Cells, number: np.ndarray, offset: np.ndarray, size: int, split: bool = True
) -> list[list[int]]:
    """The runs of a pack grid whose cells (all ``size`` bytes, crc32c included) lie as placed.

    A writer's cells that lie back to back in one object form a segment;
    consecutive writers with equal segments share a run; runs are sorted
    (``packed.writer_segments`` and ``packed.merge_runs``, vectorised).
    ``split`` False (from :meth:`PackFill.place`): every writer's cells are
    one segment.
    """
    if not split:
        sw, first = cells.depths[0]
        seg = np.stack([np.zeros(len(sw), np.int64), cells.counts, number[first], offset[first]])
    else:
        w = cells.writers[cells.order]
        rank = cells.ranks
        num = number[cells.order]
        off = offset[cells.order]
        start = rank == 0
        start[1:] |= (num[1:] != num[:-1]) | (off[1:] != off[:-1] + size)
        at = np.flatnonzero(start)
        count = np.diff(np.append(at, len(w)))
        seg = np.stack([rank[at], count, num[at], off[at]])
        sw = w[at]
    k = np.lexsort((sw, seg[3], seg[2], seg[1], seg[0]))  # by segment, then writer
    seg, sw = seg[:, k], sw[k]
    new = np.ones(len(sw), bool)
    new[1:] = (seg[:, 1:] != seg[:, :-1]).any(axis=0) | (sw[1:] != sw[:-1] + 1)
    first = np.flatnonzero(new)
    runs = np.stack(
        [sw[first], np.diff(np.append(first, len(sw))), *seg[:, first]], axis=1
    )  # [first_writer, writers, first_rank, count, object, offset]
    runs = runs[np.lexsort(runs.T[::-1])]
    return runs.tolist()


def cell_entries(
    leaf: int,
    indices: list[Index],
    cells: Cells,
    number: np.ndarray,
    offset: np.ndarray,
    nbytes: np.ndarray,
    prefix: str,
) -> list[PackEntry]:
    """The entries of a leaf whose cells are listed (not a regular grid), in cell order."""
    return [
        PackEntry(
            leaf,
            index,
            int(cells.writers[c]),
            f"{prefix}packs/{int(cells.writers[c])}.{int(number[c])}",
            int(offset[c]),
            int(nbytes[c]),
        )
        for c, index in enumerate(indices)
    ]
