"""Where every leaf of a save goes, from shapes and shardings alone: :func:`plan_layout`.

Every process decides the same layout (each leaf's storage, and which process
writes each part of each shard: replicated shards are spread over their
replicas, see :func:`_place`) without talking to the others. The cost of
deciding is kept to what this process writes, plus a little per leaf and per
distinct (sharding, shape, itemsize):

* a leaf's shards are computed once per distinct (sharding, shape, itemsize)
  (:class:`_Shards`); a leaf none of whose shards is replicated uses them as
  they are, with no per-shard work;
* a process lays out only its own pack entries (``layout.pack_layout`` of its
  own shards: each writer's objects depend on its shards alone);
* the primary, which describes every writer's packs in ``pytree.json``, fills
  them for all writers at once with numpy (:mod:`.packing`), never building an
  entry of a leaf stored as a pack grid.

A 1T-parameter state on 1,024 processes x 4 devices has ~19 million packed
shards; this is what keeps planning it at seconds on each process
(``make bench``'s scale model prints planning time and peak memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloudckpt.format.layout import (
    CRC_BYTES,
    Index,
    PackEntry,
    index_shape,
    storage_dtype,
    zarr_metadata,
)
from cloudckpt.format.packed import Placements, regular_cell
from cloudckpt.handlers.pytree import layout, packing


@dataclass(frozen=True)
class PlanOptions:
    """The handler's layout settings and the process group a layout is made for.

    ``pack_below_bytes`` None: :func:`layout.pack_threshold` of the tree's bytes.
    """

    pack_below_bytes: int | None
    max_object_bytes: int
    inner_chunk_bytes: int
    primary_host: int = 0
    members: tuple[int, ...] = ()
    replica_parallel: bool = True
    #: The save attempt: every data object is named under ``@<attempt>/`` (docs/FORMAT.md).
    attempt: str = ""


@dataclass(frozen=True)
class LeafSpec:
    """What one leaf's layout is decided from: no data. ``sharding`` None: a host value."""

    leaf: int  # its position among the tree's leaves
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: Any


@dataclass(eq=False)
class _Shards:
    """The shards of every leaf of one (sharding, shape, itemsize), and what follows from them."""

    shards: list[layout.Shard]
    replicated: bool = False  # some shard has several replicas
    max_bytes: int = 0
    _writers: np.ndarray | None = None
    _cells: packing.Cells | None = None
    _own: dict[int, list[layout.Shard]] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.replicated = any(len(s.replicas) > 1 for s in self.shards)
        self.max_bytes = max(s.nbytes for s in self.shards)

    @property
    def writers(self) -> np.ndarray:
        if self._writers is None:
            self._writers = np.fromiter((s.writer for s in self.shards), np.int64, len(self.shards))
        return self._writers

    def cells(self) -> packing.Cells:
        if self._cells is None:
            self._cells = packing.Cells.of(self.writers)
        return self._cells

    def own_shards(self, me: int) -> list[layout.Shard]:
        """The shards ``me`` writes, when each shard is one part written by its writer."""
        found = self._own.get(me)
        if found is None:
            found = self._own[me] = [self.shards[k] for k in np.flatnonzero(self.writers == me)]
        return found

    def own(self, me: int) -> list[tuple[Index, Index]]:
        """(part, shard) of the shards ``me`` writes, when each shard is one part."""
        return self.cached(f"own{me}", lambda: [(s.index, s.index) for s in self.own_shards(me)])

    def cached(self, name: str, make: Any) -> Any:
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]


@dataclass(eq=False)
class _Placed:
    """A leaf with bytes, between deciding its storage and placing its parts."""

    spec: LeafSpec
    table: _Shards
    to_pack: bool = False
    #: (part index, index of the shard it is part of, writer); None: each shard is one
    #: part, written by the shard's own writer (nothing replicated to spread).
    parts: list[tuple[Index, Index, int]] | None = None

    @property
    def shards(self) -> list[layout.Shard]:
        return self.table.shards

    def own(self, me: int) -> list[tuple[Index, Index]]:
        if self.parts is None:
            return self.table.own(me)
        return [(index, within) for index, within, writer in self.parts if writer == me]

    def own_shards(self, me: int) -> list[tuple[int, layout.Shard]]:
        """(leaf, shard) of the shards ``me`` writes whole (a packed leaf's parts are its shards)."""
        i = self.spec.leaf
        if self.parts is None:
            return [(i, s) for s in self.table.own_shards(me)]
        return [
            (i, layout.Shard(within, me, s.nbytes))
            for (_, within, writer), s in zip(self.parts, self.shards, strict=True)
            if writer == me
        ]

    def writers(self) -> np.ndarray:
        if self.parts is None:
            return self.table.writers
        return np.fromiter((w for _, _, w in self.parts), np.int64, len(self.parts))


@dataclass
class Layout:
    """What :func:`plan_layout` decided, for the process ``me`` it was made on."""

    #: leaf -> its ``storage`` record; a packed leaf's is complete on the primary only
    #: (once described: see ``describe``).
    storage: dict[int, dict[str, Any]] = field(default_factory=dict)
    zarr_specs: dict[int, dict[str, Any]] = field(default_factory=dict)  # leaf -> zarr metadata
    #: leaf -> (part, shard it is part of) that ``me`` writes, in leaf order.
    own: dict[int, list[tuple[Index, Index]]] = field(default_factory=dict)
    packed: set[int] = field(default_factory=set)
    #: This process's pack entries, and each of its pack objects' size.
    pack_entries: list[PackEntry] = field(default_factory=list)
    pack_sizes: dict[str, int] = field(default_factory=dict)
    #: ``pytree.json``'s placements (the primary's), which its pack grids index.
    placements: list[list[int]] = field(default_factory=list)
    #: leaf -> its shards (every process's), for the copy phase.
    shards: dict[int, list[layout.Shard]] = field(default_factory=dict)
    #: On the primary, when ``plan_layout`` was asked to defer it: completes the packed
    #: leaves' ``storage`` records and ``placements`` in place (only ``pytree.json`` needs
    #: them), once.
    describe: Callable[[], None] | None = None


def plan_layout(
    specs: list[LeafSpec], opts: PlanOptions, me: int, processes: int, *, defer: bool = False
) -> tuple[Layout, int]:
    """The layout of the leaves with bytes, as process ``me`` of ``processes`` needs it.

    Returns the layout and the leaves' total bytes. Deterministic in its
    arguments but ``me``: every process decides the same placement. ``defer``:
    the packed leaves' records for ``pytree.json`` (the primary's) are left to
    ``Layout.describe``, for the save's background part: the copies need only
    this process's pack entries, and with 10,000 packed leaves the records were
    most of the time an async save blocked training.
    """
    out = Layout()
    prefix = f"@{opts.attempt}/" if opts.attempt else ""
    tables: dict[tuple[Any, tuple[int, ...], int], _Shards] = {}
    # Shards by (sharding, shape): the costly part (every device's index), whatever the dtype.
    geometry: dict[tuple[Any, tuple[int, ...]], list[layout.Shard]] = {}
    placed: list[_Placed] = []
    total = 0
    for spec in specs:
        itemsize = spec.dtype.itemsize
        total += math.prod(spec.shape) * itemsize
        key = (spec.sharding, spec.shape, itemsize)
        table = tables.get(key)
        if table is None:
            base = geometry.get(key[:2])
            if base is None:
                base = geometry[key[:2]] = layout.global_shards(spec.shape, 1, spec.sharding)
            shards = [
                layout.Shard(s.index, s.writer, s.nbytes * itemsize, s.replicas) for s in base
            ]
            shards = _writable_shards(spec.path, shards, spec.sharding, opts)
            table = tables[key] = _Shards(shards)
        placed.append(_Placed(spec, table))
    # The threshold may depend on the whole tree's (global) bytes: decided after the walk.
    threshold = opts.pack_below_bytes
    if threshold is None:
        threshold = layout.pack_threshold(total, opts.max_object_bytes)
    for leaf in placed:
        leaf.to_pack = layout.is_packed(leaf.spec.shape, leaf.table.max_bytes, threshold)
    _place(placed, total, opts, processes)
    own_packed: list[tuple[int, layout.Shard]] = []
    for leaf in placed:
        i, shape, itemsize = leaf.spec.leaf, leaf.spec.shape, leaf.spec.dtype.itemsize
        out.shards[i] = leaf.shards
        own = leaf.own(me)
        if own:
            out.own[i] = own
        if leaf.to_pack:
            out.packed.add(i)
            out.storage[i] = {"type": "packed"}
            # A packed shard is never split: its parts are its shards, in order.
            own_packed.extend(leaf.own_shards(me))
            continue

        def grid(leaf: _Placed = leaf, itemsize: int = itemsize) -> tuple[list[int], list[int]]:
            parts = leaf.shards if leaf.parts is None else [
                layout.Shard(index, writer, 0) for index, _, writer in leaf.parts
            ]  # fmt: skip
            chunk = layout.chunk_grid(leaf.spec.shape, parts, itemsize, opts.max_object_bytes)
            return chunk, layout.split_to_fit(chunk, itemsize, opts.inner_chunk_bytes)

        # The chunk grid depends on the parts' indices only: alike for the leaves of a table
        # when nothing is spread (writers differ, indices do not).
        chunk, inner = grid() if leaf.parts is not None else leaf.table.cached("grid", grid)
        meta = zarr_metadata(shape, storage_dtype(leaf.spec.dtype), chunk, inner)
        out.zarr_specs[i] = meta
        out.storage[i] = {"type": "zarr", "key": f"{prefix}arrays/{i}", "metadata": meta}
    packed = [leaf for leaf in placed if leaf.to_pack]
    whole = {leaf.spec.leaf for leaf in packed if len(leaf.shards) == 1}
    out.pack_entries = layout.pack_layout(
        own_packed, opts.max_object_bytes, whole.__contains__, prefix
    )
    for e in out.pack_entries:
        out.pack_sizes[e.obj] = max(out.pack_sizes.get(e.obj, 0), e.end)
    if me == opts.primary_host:  # only the primary writes pytree.json

        def describe() -> None:
            # In place: whoever holds the records or the placements list sees them complete.
            out.placements.extend(_describe_packs(packed, whole, out.storage, opts, prefix))
            out.describe = None

        if defer:
            out.describe = describe
        else:
            describe()
    return out, total


def _describe_packs(
    packed: list[_Placed],
    whole: set[int],
    storage: dict[int, dict[str, Any]],
    opts: PlanOptions,
    prefix: str,
) -> list[list[int]]:
    """Completes every packed leaf's ``storage`` record in place (a grid where its cells are
    one); returns the placements.

    Fills every writer's packs as ``layout.pack_layout`` does (whole leaves
    first), with numpy, so no leaf stored as a grid has an entry built.
    """
    fill = packing.PackFill(opts.max_object_bytes)
    placements = Placements()
    numbered: dict[int, tuple[np.ndarray, int]] = {}  # id(writers) -> (writers, placement)
    groups = [
        [x for x in packed if x.spec.leaf in whole],
        [x for x in packed if x.spec.leaf not in whole],
    ]
    for g, group in enumerate(groups):
        if g:  # the rest starts an object of its own
            fill.next_group()
        for leaf in group:
            table, itemsize = leaf.table, leaf.spec.dtype.itemsize
            sizes = table.cached(
                f"sizes{itemsize}",
                lambda t=table: np.fromiter((s.nbytes for s in t.shards), np.int64, len(t.shards)),
            )
            if leaf.parts is None:
                writers, cells = table.writers, table.cells()
            else:
                writers = leaf.writers()
                cells = packing.Cells.of(writers)
            number, offset, split = fill.place(cells, sizes + CRC_BYTES)
            shape = leaf.spec.shape
            cell = table.cached(
                "cell", lambda t=table, s=shape: regular_cell(s, [x.index for x in t.shards])
            )
            i = leaf.spec.leaf
            if cell is None:
                entries = packing.cell_entries(
                    i, [s.index for s in table.shards], cells, number, offset, sizes, prefix
                )
                storage[i]["entries"] = [e.to_json() for e in entries]
                continue
            known = numbered.get(id(writers))
            if known is None or known[0] is not writers:
                known = numbered[id(writers)] = (
                    writers,
                    placements.number(tuple(writers.tolist())),
                )
            cell_bytes = math.prod(cell) * itemsize + CRC_BYTES
            storage[i].update(
                cell=list(cell),
                placement=known[1],
                runs=packing.grid_runs(cells, number, offset, cell_bytes, split),
            )
    return placements.lists


def _writable_shards(
    path: str, shards: list[layout.Shard], sharding: Any, opts: PlanOptions
) -> list[layout.Shard]:
    """The leaf's shards (``layout.global_shards``), replicas narrowed to the saving processes."""
    if sharding is None:  # a host value: the primary's copy is the one saved
        p = opts.primary_host
        return [layout.Shard(s.index, p, s.nbytes, (p,)) for s in shards]
    if not opts.replica_parallel:
        _check_active(path, shards, opts.members)
        return shards
    if opts.members:
        members = set(opts.members)
        narrowed = []
        for s in shards:
            replicas = tuple(p for p in s.replicas if p in members)
            if not replicas:
                _check_active(path, [s], opts.members)
            narrowed.append(layout.Shard(s.index, replicas[0], s.nbytes, replicas))
        shards = narrowed
    return shards


#: Parts are at least 1/this of the mean bytes per process: few enough objects on a
#: large pod, and small enough that greedy placement ends within ~2/this of even.
PARTS_PER_PROCESS = 32


def _place(placed: list[_Placed], total_bytes: int, opts: PlanOptions, processes: int) -> None:
    """Decides every leaf's parts and their writers, identically on every process.

    Without replica-parallel writes each shard is one part, written by its
    replica-0 process. With them, shards held by one process stay with it;
    the others are assigned, largest first, greedy by bytes over the
    processes holding them: a packed shard whole, an array shard split into
    up to one part per replica, none smaller than ``layout.MIN_PART_BYTES``
    or than 1/PARTS_PER_PROCESS of the mean bytes per process (so splitting
    adds at most about that many objects per process, however large the pod).
    Leaves with nothing replicated keep ``parts`` None: their bytes count per
    table, not per shard.
    """
    if not opts.replica_parallel:
        return
    writers = len(opts.members) or processes
    min_part = max(layout.MIN_PART_BYTES, total_bytes // (PARTS_PER_PROCESS * max(writers, 1)))
    loads = layout.WriterLoads()
    Split = list[tuple[list[Index], list[int]]]  # per shard: its parts and their bytes
    spread: list[tuple[int, int, int, tuple[list[Index], list[int]]]] = []
    alike: dict[_Shards, int] = {}  # tables of leaves with nothing replicated -> their leaves
    for n, leaf in enumerate(placed):
        table = leaf.table
        if not table.replicated:
            alike[table] = alike.get(table, 0) + 1
            continue
        leaf.parts = [(s.index, s.index, s.writer) for s in leaf.shards]

        def make_split(leaf: _Placed = leaf) -> Split:
            if leaf.to_pack:  # a pack entry is one shard, whole
                return [([s.index], [s.nbytes]) for s in leaf.shards]
            counts = [min(len(s.replicas), max(1, s.nbytes // min_part)) for s in leaf.shards]
            itemsize = leaf.spec.dtype.itemsize
            return [
                (parts, [math.prod(index_shape(ix)) * itemsize for ix in parts])
                for parts in layout.split_shards(leaf.spec.shape, leaf.shards, counts)
            ]

        split: Split = table.cached("split", make_split)  # to_pack is alike per table
        for k, s in enumerate(leaf.shards):
            if len(s.replicas) <= 1:
                loads.add(s.writer, s.nbytes)
            else:
                spread.append((-s.nbytes, n, k, split[k]))
    for table, count in alike.items():  # bytes add up in any order: once per table
        for s in table.shards:
            loads.add(s.writer, s.nbytes * count)
    # Held-by-one shards are counted first, so replicated bytes even out around them.
    spread.sort(key=lambda t: t[:3])
    chosen_parts: dict[int, dict[int, list[tuple[Index, Index, int]]]] = {}
    for _, n, k, (indices, sizes) in spread:
        shard = placed[n].shards[k]
        chosen = loads.assign(shard.replicas, sizes)
        chosen_parts.setdefault(n, {})[k] = [
            (ix, shard.index, w) for ix, w in zip(indices, chosen, strict=True)
        ]
    for n, by_shard in chosen_parts.items():
        leaf = placed[n]
        assert leaf.parts is not None
        leaf.parts = [q for k, p in enumerate(leaf.parts) for q in by_shard.get(k, [p])]


def _check_active(path: str, shards: list[layout.Shard], members: tuple[int, ...]) -> None:
    outside = {s.writer for s in shards} - set(members or {s.writer for s in shards})
    if outside:
        raise ValueError(
            f"leaf {path} has shards on processes {sorted(outside)}, which are not among the "
            f"active processes {list(members)}; only their devices can be saved"
        )
