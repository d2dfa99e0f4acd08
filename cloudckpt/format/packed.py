"""Packed leaves in ``pytree.json``: entry lists, and the pack grid of format 3.

A packed leaf's shards (its *cells*) are entries of pack objects
``<prefix>packs/<writer>.<n>``, each its bytes and a crc32c. Formats 1 and 2
list every entry (``[object, offset, nbytes, index]``); on a pod that is one
entry per leaf per device, ~19 million for a 1T-parameter state (~1.3 GB of
JSON that every restoring process reads). Format 3 describes a leaf whose
cells form a regular grid once (docs/FORMAT.md, "Pack grids"):

* ``cell``: the cell shape; it divides the leaf's shape, and cells are
  numbered in C order of the grid;
* ``placement``: an index into the document's ``placements``, each a list of
  the writer of every cell (shared by every leaf placed alike);
* ``runs``: ``[first_writer, writers, first_rank, count, object, offset]``:
  for each writer ``w`` in ``first_writer .. first_writer + writers - 1``,
  its cells of ranks ``first_rank .. first_rank + count - 1`` (the rank of a
  cell is its position among the writer's cells, in C order) lie back to back
  in ``packs/<w>.<object>`` from ``offset``.

Leaves whose cells are not a regular grid keep the entry list. Either way the
entries of each pack object lie back to back from offset 0 in leaf order,
checked for the whole document at once (:class:`PackRows`), and nothing is
allocated from a count before it is bounded by the document's own length.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloudckpt.format import layout

#: Up to this many cells, :meth:`PackGrid.cells_overlapping` counts them in Python (a
#: restore asks for each shard's few cells, thousands of times in a state of many leaves).
_FEW_CELLS = 64

#: The largest writer (process) number and pack object number, as names allow them.
MAX_NUMBER = 9_999_999_999
_NUMBER = r"(0|[1-9][0-9]{0,9})"
PACK_OBJECT = re.compile(rf"packs/{_NUMBER}\.{_NUMBER}")
RUN_FIELDS = 6


class Refuse(Exception):
    """A problem found while parsing; the document reader adds where it was found."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: Any, what: str, *, low: int = 0, high: int = 1 << 62) -> int:
    if type(value) is not int or not low <= value <= high:
        raise Refuse(f"{what} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


# ------------------------------------------------------------------------------ placements
@dataclass(frozen=True)
class Placement:
    """The writer of every cell (C order), with each cell's rank among its writer's cells."""

    writers: np.ndarray  # int64, per cell
    ranks: np.ndarray  # int64, per cell
    unique: np.ndarray  # sorted distinct writers
    counts: np.ndarray  # cells of each of ``unique``
    starts: np.ndarray  # where each of ``unique`` starts in ``order``
    order: np.ndarray  # cells sorted by writer, then C order

    @classmethod
    def parse(cls, raw: Any, number: int) -> Placement:
        if type(raw) is not list or not raw:
            raise Refuse(f"placement {number} must be a non-empty list of writers")
        if not all(type(w) is int and 0 <= w <= MAX_NUMBER for w in raw):
            raise Refuse(f"placement {number} must hold writer numbers in [0, {MAX_NUMBER}]")
        writers = np.asarray(raw, np.int64)
        order = np.argsort(writers, kind="stable")
        unique, starts, counts = np.unique(writers[order], return_index=True, return_counts=True)
        ranks = np.empty_like(writers)
        ranks[order] = np.arange(len(writers)) - np.repeat(starts, counts)
        return cls(writers, ranks, unique, counts, starts, order)


def parse_placements(raw: Any) -> list[Placement]:
    if type(raw) is not list:
        raise Refuse(f"placements must be a list, got {_short(raw)}")
    return [Placement.parse(p, i) for i, p in enumerate(raw)]


# ----------------------------------------------------------------------------------- grids
@dataclass(frozen=True)
class PackGrid:
    """A packed leaf stored as a regular grid of cells (format 3), located on demand."""

    shape: tuple[int, ...]
    cell: tuple[int, ...]
    cell_bytes: int
    prefix: str
    placement: Placement
    runs: np.ndarray  # (runs, 6) int64
    run_of: np.ndarray  # per cell: its run

    @functools.cached_property
    def grid(self) -> tuple[int, ...]:
        return tuple(n // c for n, c in zip(self.shape, self.cell, strict=True))

    def cells_overlapping(self, region: layout.Index) -> np.ndarray:
        """Numbers of the cells that share data with ``region`` (a valid region of the leaf)."""
        ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(region, self.cell, strict=True)]
        count = math.prod(len(r) for r in ranges)
        if count == 0:
            return np.zeros(0, np.int64)
        grid = self.grid
        if count <= _FEW_CELLS:  # a shard's few cells: plain arithmetic, no numpy set-up
            strides = [math.prod(grid[k + 1 :]) for k in range(len(grid))]
            return np.fromiter(
                (
                    sum(i * s for i, s in zip(at, strides, strict=True))
                    for at in itertools.product(*ranges)
                ),
                np.int64,
                count,
            )
        mesh = np.meshgrid(*(np.arange(r.start, r.stop) for r in ranges), indexing="ij")
        return np.ravel_multi_index([m.reshape(-1) for m in mesh], grid).astype(np.int64)

    def entry(self, cell: int) -> layout.PackEntry:
        _, _, first_rank, _, number, offset = self.runs[self.run_of[cell]].tolist()
        writer = int(self.placement.writers[cell])
        rank = int(self.placement.ranks[cell])
        coords = layout.unravel(int(cell), self.grid)
        index = tuple((i * c, (i + 1) * c) for i, c in zip(coords, self.cell, strict=True))
        at = offset + (rank - first_rank) * (self.cell_bytes + layout.CRC_BYTES)
        obj = f"{self.prefix}packs/{writer}.{number}"
        return layout.PackEntry(-1, index, -1, obj, at, self.cell_bytes)

    def entries(self, cells: Iterable[int] | None = None) -> tuple[layout.PackEntry, ...]:
        numbers = range(len(self.run_of)) if cells is None else cells
        return tuple(self.entry(int(c)) for c in numbers)


@dataclass
class PackRows:
    """Every packed entry's span, per object, for the document-wide back-to-back check.

    Grid runs are kept as writer ranges; :meth:`sizes` expands them once.
    """

    writers: list[np.ndarray] = field(default_factory=list)
    numbers: list[np.ndarray] = field(default_factory=list)
    offsets: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    leaves: list[np.ndarray] = field(default_factory=list)

    def add(self, leaf: int, writers: np.ndarray, number: int, offset: int, length: int) -> None:
        n = len(writers)
        self.writers.append(writers)
        self.numbers.append(np.full(n, number, np.int64))
        self.offsets.append(np.full(n, offset, np.int64))
        self.lengths.append(np.full(n, length, np.int64))
        self.leaves.append(np.full(n, leaf, np.int64))

    def sizes(self, prefix: str) -> dict[str, int]:
        """Each pack object's exact size; refuses entries that are not back to back in leaf order."""
        if not self.writers:
            return {}
        w, n, off, length, leaf = (
            np.concatenate(x)
            for x in (self.writers, self.numbers, self.offsets, self.lengths, self.leaves)
        )
        order = np.lexsort((off, n, w))
        w, n, off, length, leaf = w[order], n[order], off[order], length[order], leaf[order]
        first = np.ones(len(w), bool)
        first[1:] = (w[1:] != w[:-1]) | (n[1:] != n[:-1])
        expected = np.zeros(len(w), np.int64)
        expected[1:] = off[:-1] + length[:-1]
        expected[first] = 0
        later = np.ones(len(w), bool)
        later[1:] = first[1:] | (leaf[1:] >= leaf[:-1])
        bad = np.flatnonzero((off != expected) | ~later)
        if len(bad):
            k = int(bad[0])
            obj = f"{prefix}packs/{w[k]}.{n[k]}"
            raise Refuse(
                f"pack entry {obj}@{off[k]} (leaf {leaf[k]}) overlaps or leaves a gap after the "
                f"previous entry (which ends at {expected[k]}), or is out of leaf order"
            )
        last = np.ones(len(w), bool)
        last[:-1] = first[1:]
        return {
            f"{prefix}packs/{a}.{b}": int(c + d)
            for a, b, c, d in zip(w[last], n[last], off[last], length[last], strict=True)
        }


def parse_grid(
    leaf: int,
    raw: dict[str, Any],
    shape: tuple[int, ...],
    itemsize: int,
    placements: list[Placement],
    rows: PackRows,
    prefix: str,
) -> PackGrid:
    """Validates a format 3 grid record of a packed leaf (``raw``: its ``storage``)."""
    if set(raw) != {"type", "cell", "placement", "runs"}:
        raise Refuse(f"a pack grid has type, cell, placement and runs, got {sorted(raw)}")
    cell = raw["cell"]
    if type(cell) is not list or len(cell) != len(shape):
        raise Refuse(f"pack grid cell {_short(cell)} does not have {len(shape)} dimensions")
    for c, n in zip(cell, shape, strict=True):
        _int(c, "pack grid cell dimension", low=1, high=max(n, 1))
        if n % c:
            raise Refuse(
                "pack entries overlap or leave part of the array uncovered: the grid's cell "
                f"{cell} does not divide shape {list(shape)}"
            )
    cell_t = tuple(cell)
    n_cells = math.prod(n // c for n, c in zip(shape, cell_t, strict=True))
    placement = placements[_int(raw["placement"], "placement", high=len(placements) - 1)]
    # Bounded by the document before anything is sized from the grid.
    if n_cells != len(placement.writers):
        raise Refuse(f"pack grid of {n_cells} cells has a placement of {len(placement.writers)}")
    cell_bytes = math.prod(cell_t) * itemsize
    runs_raw = raw["runs"]
    if type(runs_raw) is not list or not runs_raw:
        raise Refuse("pack grid runs must be a non-empty list")
    for r in runs_raw:
        if type(r) is not list or len(r) != RUN_FIELDS or not all(type(x) is int for x in r):
            raise Refuse(
                f"a pack run must be [first_writer, writers, first_rank, count, object, "
                f"offset], got {_short(r)}"
            )
    run_of = np.full(n_cells, -1, np.int64)
    area = 0
    for k, (w0, nw, r0, count, number, offset) in enumerate(runs_raw):
        _int(w0, "run first writer", high=MAX_NUMBER)
        _int(nw, "run writers", low=1, high=MAX_NUMBER)
        _int(r0, "run first rank", high=n_cells)
        _int(count, "run count", low=1, high=n_cells)
        _int(number, "run object", high=MAX_NUMBER)
        _int(offset, "run offset")
        area += nw * count
        if area > n_cells:
            raise Refuse(f"pack grid runs hold more than its {n_cells} cells")
        u = placement
        i0 = int(np.searchsorted(u.unique, w0))
        if (
            i0 + nw > len(u.unique)
            or u.unique[i0] != w0
            or u.unique[i0 + nw - 1] != w0 + nw - 1
            or int(u.counts[i0 : i0 + nw].min()) < r0 + count
        ):
            raise Refuse(f"pack run {runs_raw[k]} names cells its placement does not have")
        cells = u.order[(u.starts[i0 : i0 + nw, None] + np.arange(r0, r0 + count)).reshape(-1)]
        if (run_of[cells] != -1).any():
            raise Refuse(f"pack run {runs_raw[k]} repeats cells of another run")
        run_of[cells] = k
        length = count * (cell_bytes + layout.CRC_BYTES)
        rows.add(leaf, np.arange(w0, w0 + nw, dtype=np.int64), number, offset, length)
    if area != n_cells:
        raise Refuse(f"pack grid runs hold {area} of its {n_cells} cells")
    runs = np.asarray(runs_raw, np.int64)  # every field bounded above
    return PackGrid(shape, cell_t, cell_bytes, prefix, placement, runs, run_of)


def parse_entries(
    leaf: int,
    raw: Any,
    shape: tuple[int, ...],
    itemsize: int,
    prefix: str,
    rows: PackRows | None,
    sizes: dict[str, int],
) -> tuple[layout.PackEntry, ...]:
    """Validates an entry list; back to back per object here (``rows`` None) or in ``rows``."""
    if type(raw) is not list:
        raise Refuse(f"entries must be a list, got {_short(raw)}")
    entries = []
    for item in raw:
        if type(item) is not list or len(item) != 4:
            raise Refuse(
                f"a pack entry must be [object, offset, nbytes, index], got {_short(item)}"
            )
        obj, offset, nbytes, index = item
        rel = obj[len(prefix) :] if type(obj) is str and obj.startswith(prefix) else None
        match = PACK_OBJECT.fullmatch(rel) if rel is not None else None
        if match is None:
            raise Refuse(f"pack object must be named {prefix}packs/<writer>.<n>, got {_short(obj)}")
        offset = _int(offset, "pack entry offset")
        ranges = index if type(index) is list else None
        if ranges is None or len(ranges) != len(shape):
            raise Refuse(f"pack entry index {_short(index)} does not have {len(shape)} dimensions")
        bounds = []
        for r, n in zip(ranges, shape, strict=True):
            if type(r) is not list or len(r) != 2:
                raise Refuse(f"pack entry index {_short(index)} must hold [start, stop] pairs")
            a = _int(r[0], "pack entry start", high=n)
            b = _int(r[1], "pack entry stop", high=n)
            if a >= b:
                raise Refuse(f"pack entry index {_short(index)} is empty or reversed")
            bounds.append((a, b))
        region = tuple(bounds)
        expected = math.prod(layout.index_shape(region)) * itemsize
        if nbytes != expected:
            raise Refuse(
                f"pack entry {obj}@{offset} holds {_short(nbytes)} bytes; its index needs {expected}"
            )
        if rows is None:  # formats 1 and 2: checked in document order, as written
            if offset != sizes.get(obj, 0):
                raise Refuse(
                    f"pack entry {obj}@{offset} overlaps or leaves a gap after the previous "
                    f"entry (which ends at {sizes.get(obj, 0)})"
                )
            sizes[obj] = offset + nbytes + layout.CRC_BYTES
        else:
            writer, number = int(match.group(1)), int(match.group(2))
            rows.add(leaf, np.asarray([writer]), number, offset, nbytes + layout.CRC_BYTES)
        entries.append(layout.PackEntry(-1, region, -1, obj, offset, nbytes))
    if not entries:
        raise Refuse("no pack entries for a non-empty array")
    if not layout.tiles([e.index for e in entries], shape):
        raise Refuse("pack entries overlap or leave part of the array uncovered")
    return tuple(entries)


# --------------------------------------------------------------------------------- writing
def _object_number(obj: str) -> int:
    return int(obj.rsplit(".", 1)[1])


def regular_cell(shape: tuple[int, ...], indices: list[layout.Index]) -> tuple[int, ...] | None:
    """The cell shape when ``indices`` are exactly the cells of a regular grid, else None."""
    if not shape:
        return None
    cell = layout.index_shape(indices[0])
    if any(c == 0 or n % c for n, c in zip(shape, cell, strict=True)):
        return None
    if len(indices) != math.prod(n // c for n, c in zip(shape, cell, strict=True)):
        return None
    for index in indices:
        for (a, b), c in zip(index, cell, strict=True):
            if a % c or b - a != c:
                return None
    return cell if len(set(indices)) == len(indices) else None


class Placements:
    """The document's ``placements``, each written once however many leaves use it."""

    def __init__(self) -> None:
        self.lists: list[list[int]] = []
        self._numbers: dict[tuple[int, ...], int] = {}

    def number(self, writers: tuple[int, ...]) -> int:
        found = self._numbers.get(writers)
        if found is None:
            found = self._numbers[writers] = len(self.lists)
            self.lists.append(list(writers))
        return found


Segment = tuple[int, int, int, int]  # (first rank, count, object number, offset)


def writer_segments(entries: list[layout.PackEntry]) -> dict[int, list[Segment]]:
    """Per writer, its cells of one leaf (``entries`` in C order) cut into back-to-back runs."""
    out: dict[int, list[Segment]] = {}
    ends: dict[int, int] = {}
    ranks: dict[int, int] = {}
    for e in entries:
        rank = ranks.get(e.writer, 0)
        ranks[e.writer] = rank + 1
        number = _object_number(e.obj)
        own = out.setdefault(e.writer, [])
        if own and own[-1][2] == number and ends[e.writer] == e.offset:
            first, count, _, offset = own[-1]
            own[-1] = (first, count + 1, number, offset)
        else:
            own.append((rank, 1, number, e.offset))
        ends[e.writer] = e.end
    return out


def merge_runs(per_writer: Iterable[tuple[int, list[Segment]]]) -> list[list[int]]:
    """The runs of a grid: consecutive writers whose segments are alike share one."""
    flat = sorted((seg, w) for w, segments in per_writer for seg in segments)
    runs: list[list[int]] = []
    for seg, w in flat:
        last = runs[-1] if runs else None
        if last is not None and last[0] + last[1] == w and tuple(last[2:]) == seg:
            last[1] += 1
        else:
            runs.append([w, 1, *seg])
    runs.sort()
    return runs


def encode_packed(
    shape: tuple[int, ...], entries: list[layout.PackEntry], placements: Placements
) -> dict[str, Any]:
    """The ``storage`` record of a packed leaf from its planned entries (writers known)."""
    cell = regular_cell(shape, [e.index for e in entries])
    if cell is None:
        return {"type": "packed", "entries": [e.to_json() for e in entries]}
    by_cell = sorted(entries, key=lambda e: e.index)  # C order of a regular grid's cells
    writers = tuple(e.writer for e in by_cell)
    return {
        "type": "packed",
        "cell": list(cell),
        "placement": placements.number(writers),
        "runs": merge_runs(writer_segments(by_cell).items()),
    }
