"""A scale model of one save and restore on a pod: objects and requests per step (issue 14).

Drives the pytree handler's own planner (``_layout.global_shards``,
``array_layout``, ``pack_layout``, with a default
``StandardCheckpointHandler``'s settings) over shapes and shardings alone,
for a mesh no machine here has: ``processes`` x ``devices_per_process``
devices on a ``("data", "model")`` mesh, ``model`` within a process (tensor
parallelism), ``data`` across processes (FSDP: weights sharded over both).
A training state is bf16 weights plus fp32 master weights and fp32 Adam
``m`` and ``v`` (14 bytes per parameter) of a transformer's layer list.

It prints objects per step, bytes per object, PUTs and GETs per process and
the seconds the request-rate limits impose on one step:

* GCS, per bucket: about 1,000 object writes/s and 5,000 reads/s at first,
  doubling every 20 minutes of sustained load;
* S3, per partitioned prefix: 3,500 PUT/s and 5,500 GET/s. Every key of a
  step shares ``<root>/<step>/``, which S3 serves as one partition until it
  splits it under load, so the model charges the whole step to one prefix.

Restores are modelled on the saving topology: each process reads the
shards its devices hold (replicas included) and, as the reader does, fetches
the packed entries of one object that lie back to back with one ranged GET
and each zarr chunk with one GET (two where the chunk has inner chunks: its
index, then the data). Processes that write alike (the same shard sizes of
every leaf) are planned once and counted as many times as they occur, so a
1,024-process model runs in seconds.
"""

from __future__ import annotations

import gc
import json
import math
import statistics
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from benchmarks.common import Context, scenario
from cloudckpt.format import jsonio, packed
from cloudckpt.format.layout import storage_dtype, zarr_metadata
from cloudckpt.handlers.pytree import StandardCheckpointHandler, layout
from cloudckpt.handlers.pytree.placement import LeafSpec, PlanOptions, plan_layout
from cloudckpt.handlers.pytree.tree import flatten

GCS_WRITES_PER_S = 1000
GCS_READS_PER_S = 5000
S3_PUTS_PER_S = 3500
S3_GETS_PER_S = 5500
GOAL_S = 60.0
#: Requests of one save besides the arrays: the commit protocol (7, docs/FORMAT.md),
#: pytree.json, and one zarr.json per array (the primary's).
PROTOCOL_REQUESTS = 8

Spec = tuple[Any, ...]  # per dimension: None, a mesh axis name, or a tuple of names


@dataclass(frozen=True)
class _Device:
    id: int
    process_index: int


class SpecSharding:
    """``NamedSharding(mesh, PartitionSpec(*spec))`` over a mesh of devices that need not exist.

    Devices are numbered in the mesh's row-major order; device ``i`` belongs
    to process ``i // devices_per_process``. ``devices_indices_map`` follows
    NamedSharding (tests/test_scale_model.py compares the two on a real mesh).
    """

    def __init__(self, axes: dict[str, int], spec: Spec, devices_per_process: int) -> None:
        self.axes = dict(axes)
        self.spec = spec
        n = math.prod(axes.values())
        self.devices = [_Device(i, i // devices_per_process) for i in range(n)]
        self._memo: dict[tuple[int, ...], dict[_Device, tuple[slice, ...]]] = {}

    def devices_indices_map(self, shape: tuple[int, ...]) -> dict[_Device, tuple[slice, ...]]:
        found = self._memo.get(shape)
        if found is None:
            found = self._memo[shape] = self._indices(shape)
        return found

    def _indices(self, shape: tuple[int, ...]) -> dict[_Device, tuple[slice, ...]]:
        names = list(self.axes)
        coords = np.unravel_index(np.arange(len(self.devices)), [self.axes[a] for a in names])
        spec = tuple(self.spec) + (None,) * (len(shape) - len(self.spec))
        per_dim: list[list[slice]] = []
        for n, entry in zip(shape, spec, strict=True):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            blocks, block = 1, np.zeros(len(self.devices), np.int64)
            for axis in axes:  # major to minor, as PartitionSpec(("a", "b")) orders them
                blocks *= self.axes[axis]
                block = block * self.axes[axis] + coords[names.index(axis)]
            if n % blocks:
                raise ValueError(f"dimension {n} does not divide over {blocks} shards")
            size = n // blocks
            per_dim.append([slice(int(b) * size, (int(b) + 1) * size) for b in block])
        return {d: tuple(dim[d.id] for dim in per_dim) for d in self.devices}


@dataclass(frozen=True)
class Transformer:
    """A decoder-only transformer's parameters (no biases; untied embeddings)."""

    name: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int

    def params(self) -> list[tuple[str, tuple[int, ...], Spec]]:
        """(path, shape, spec) per parameter: FSDP over ``data``, tensor parallel over ``model``."""
        d, q, kv, ff = (
            self.d_model,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.d_ff,
        )
        out: list[tuple[str, tuple[int, ...], Spec]] = [
            ("embed", (self.vocab, d), ("model", "data"))
        ]
        for i in range(self.layers):
            p = f"layers/{i}"
            out += [
                (f"{p}/attn_norm", (d,), ()),
                (f"{p}/wq", (d, q), ("data", "model")),
                (f"{p}/wk", (d, kv), ("data", "model")),
                (f"{p}/wv", (d, kv), ("data", "model")),
                (f"{p}/wo", (q, d), ("model", "data")),
                (f"{p}/mlp_norm", (d,), ()),
                (f"{p}/w_gate", (d, ff), ("data", "model")),
                (f"{p}/w_up", (d, ff), ("data", "model")),
                (f"{p}/w_down", (ff, d), ("model", "data")),
            ]
        out += [("final_norm", (d,), ()), ("lm_head", (d, self.vocab), ("data", "model"))]
        return out

    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.params())


MODELS = [
    # Llama-2-70B's shapes.
    Transformer(
        "70B", layers=80, d_model=8192, heads=64, kv_heads=8, head_dim=128, d_ff=28672, vocab=32000
    ),
    # A 1T dense model: 128 layers of width 25,600 (200 heads of 128, 16 KV heads).
    Transformer(
        "1T",
        layers=128,
        d_model=25600,
        heads=200,
        kv_heads=16,
        head_dim=128,
        d_ff=81920,
        vocab=256000,
    ),
]

#: The training state: (name, itemsize) per copy of the parameters; 14 bytes per parameter.
STATE = [("params", 2), ("master", 4), ("adam_m", 4), ("adam_v", 4)]


@dataclass
class _Leaf:
    path: str
    shape: tuple[int, ...]
    itemsize: int
    key: tuple[Any, ...]  # (spec, shape, itemsize): leaves with one key plan alike
    packed: bool = False
    chunk: list[int] = field(default_factory=list)
    inner: list[int] = field(default_factory=list)


def model(
    transformer: Transformer,
    processes: int,
    devices_per_process: int,
    handler: StandardCheckpointHandler | None = None,
    *,
    keep_document: bool = False,
) -> dict[str, Any]:
    """Objects and requests of one step of ``transformer``'s training state.

    ``handler`` supplies the planner's settings (default: the defaults);
    ``keep_document`` adds the modelled ``pytree.json`` payload as ``document``.
    """
    started = time.perf_counter()
    handler = handler or StandardCheckpointHandler()
    state_bytes = sum(
        math.prod(shape) * itemsize for _, itemsize in STATE for _, shape, _ in transformer.params()
    )
    threshold = handler.pack_below_bytes
    if threshold is None:  # the default: chosen from the state, as plan_save does
        threshold = layout.pack_threshold(state_bytes, handler.max_object_bytes)
    axes = {"data": processes, "model": devices_per_process}
    shardings: dict[Spec, SpecSharding] = {}
    shards_of: dict[tuple[Any, ...], list[layout.Shard]] = {}
    readers_of: dict[tuple[Any, ...], dict[int, set[layout.Index]]] = {}
    by_writer: dict[tuple[Any, ...], dict[int, list[layout.Shard]]] = {}
    grids_of: dict[tuple[Any, ...], tuple[list[int], list[int]] | None] = {}
    leaves: list[_Leaf] = []
    for state, itemsize in STATE:
        for path, shape, spec in transformer.params():
            key = (spec, shape, itemsize)
            if key not in shards_of:
                sharding = shardings.get(spec) or shardings.setdefault(
                    spec, SpecSharding(axes, spec, devices_per_process)
                )
                indices = sharding.devices_indices_map(shape)
                shards_of[key] = layout.global_shards(shape, itemsize, sharding)
                wanted: dict[int, set[layout.Index]] = {}
                for device, idx in indices.items():
                    wanted.setdefault(device.process_index, set()).add(
                        layout.normalize_index(idx, shape)
                    )
                readers_of[key] = wanted
                for shard in shards_of[key]:
                    by_writer.setdefault(key, {}).setdefault(shard.writer, []).append(shard)
            leaf = _Leaf(f"{state}/{path}", shape, itemsize, key)
            if key not in grids_of:
                grids_of[key] = layout.array_layout(
                    shape,
                    itemsize,
                    shards_of[key],
                    pack_below_bytes=threshold,
                    max_object_bytes=handler.max_object_bytes,
                    inner_chunk_bytes=handler.inner_chunk_bytes,
                )
            grids = grids_of[key]
            if grids is None:
                leaf.packed = True
            else:
                leaf.chunk, leaf.inner = grids
            leaves.append(leaf)

    # Writers alike: the same (shard sizes) of every distinct key.
    keys = list(shards_of)
    classes: dict[tuple[Any, ...], list[int]] = {}
    for p in range(processes):
        signature = tuple(tuple(s.nbytes for s in by_writer[k].get(p, ())) for k in keys)
        classes.setdefault(signature, []).append(p)

    def pack_plan(writer: int) -> list[layout.PackEntry]:
        """The real pack planner, on ``writer``'s packed shards in leaf order."""
        packed = [
            (i, s)
            for i, leaf in enumerate(leaves)
            if leaf.packed
            for s in by_writer[leaf.key].get(writer, ())
        ]
        return layout.pack_layout(
            packed, handler.max_object_bytes, lambda i: len(shards_of[leaves[i].key]) == 1
        )

    object_sizes: Counter[int] = Counter()  # bytes -> objects of that size, over the step
    puts: dict[int, int] = {}
    gets: dict[int, int] = {}
    plans: dict[int, list[layout.PackEntry]] = {}
    for members in classes.values():
        p = members[0]
        entries = plans[p] = pack_plan(p)
        pack_bytes: dict[str, int] = {}
        for e in entries:
            pack_bytes[e.obj] = max(
                pack_bytes.get(e.obj, 0), e.offset + e.nbytes + layout.CRC_BYTES
            )
        chunk_objects = 0
        for leaf in leaves:
            if leaf.packed:
                continue
            for shard in by_writer[leaf.key].get(p, ()):
                n = math.prod(
                    (b - a) // c for (a, b), c in zip(shard.index, leaf.chunk, strict=True)
                )
                chunk_objects += n
                object_sizes[math.prod(leaf.chunk) * leaf.itemsize] += n * len(members)
        for size in pack_bytes.values():
            object_sizes[size] += len(members)
        puts[p] = len(pack_bytes) + chunk_objects
        # Every process reads pytree.json, then its data.
        gets[p] = 1 + _restore_gets(p, leaves, shards_of, readers_of, {p: entries}, pack_plan)
        for q in members[1:]:
            puts[q], gets[q] = puts[p], gets[p]
    for p in (0,):  # the primary also writes zarr.json per array, pytree.json and the protocol
        puts[p] += PROTOCOL_REQUESTS + sum(1 for leaf in leaves if not leaf.packed)

    document = _document(transformer, leaves, shards_of, by_writer, classes, plans, axes)
    payload = document.pop("payload")
    n_entries = sum(len(shards_of[leaf.key]) for leaf in leaves if leaf.packed)
    n_objects = sum(object_sizes.values())
    all_sizes = sorted(object_sizes.elements())
    total_puts, total_gets = sum(puts.values()), sum(gets.values())
    assert state_bytes == sum(math.prod(leaf.shape) * leaf.itemsize for leaf in leaves)
    out = {
        "model": transformer.name,
        "params": transformer.n_params(),
        "state_bytes": state_bytes,
        "pack_below_bytes": threshold,
        "leaves": len(leaves),
        "packed_leaves": sum(leaf.packed for leaf in leaves),
        "mesh": f"{processes} processes x {devices_per_process} devices",
        "objects_per_step": n_objects,
        "object_bytes_total": sum(size * n for size, n in object_sizes.items()),
        "object_bytes": {
            "min": all_sizes[0],
            "median": statistics.median(all_sizes),
            "max": all_sizes[-1],
            "mean": state_bytes / n_objects,
        },
        "puts_per_process": {"max": max(puts.values()), "mean": total_puts / processes},
        "gets_per_process": {"max": max(gets.values()), "mean": total_gets / processes},
        "puts": total_puts,
        "gets": total_gets,
        "writer_classes": len(classes),
        "pack_entries": n_entries,
        **document,
        "gcs_write_s": total_puts / GCS_WRITES_PER_S,
        "gcs_read_s": total_gets / GCS_READS_PER_S,
        "s3_put_s": total_puts / S3_PUTS_PER_S,
        "s3_get_s": total_gets / S3_GETS_PER_S,
        # Rate asked of the step's one S3 prefix if its PUTs (GETs) spread over the goal.
        "s3_put_rate_in_goal": total_puts / GOAL_S,
        "s3_get_rate_in_goal": total_gets / GOAL_S,
        "model_seconds": time.perf_counter() - started,
    }
    if keep_document:
        out["document"] = payload
    out["save_fits"] = out["gcs_write_s"] <= GOAL_S and out["s3_put_rate_in_goal"] <= S3_PUTS_PER_S
    out["restore_fits"] = (
        out["gcs_read_s"] <= GOAL_S and out["s3_get_rate_in_goal"] <= S3_GETS_PER_S
    )
    return out


#: The attempt id in every data key of the modelled document (24 hex digits, as saves make).
ATTEMPT = "0123456789abcdef01234567"


def _document(
    transformer: Transformer,
    leaves: list[_Leaf],
    shards_of: dict[tuple[Any, ...], list[layout.Shard]],
    by_writer: dict[tuple[Any, ...], dict[int, list[layout.Shard]]],
    classes: dict[tuple[Any, ...], list[int]],
    plans: dict[int, list[layout.PackEntry]],
    axes: dict[str, int],
) -> dict[str, Any]:
    """``pytree.json`` as the primary writes it (format 3: pack grids), and its size.

    Built with the writer's own encoders (``packed.writer_segments``,
    ``packed.merge_runs``, ``jsonio.dumps``) from the representative plans: a
    writer lays out its cells as its class's representative does. The format 2
    size (every packed shard an entry ``[object, offset, nbytes, index]``) is
    that document with the grids replaced by entry lists, whose length is taken
    from the representatives' entries with the real key prefix.
    """
    prefix = f"@{ATTEMPT}/"
    rep_of = {q: members[0] for members in classes.values() for q in members}
    by_leaf: dict[int, dict[int, list[layout.PackEntry]]] = {}
    for p, entries in plans.items():
        for e in entries:
            by_leaf.setdefault(p, {}).setdefault(e.leaf, []).append(e)
    tree: dict[str, Any] = {}
    for state, _ in STATE:
        for path, _, _ in transformer.params():
            node = tree.setdefault(state, {})
            *parents, name = path.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = 0
    paths, skeleton = flatten(tree)
    specs: dict[Spec, int] = {}
    placements = packed.Placements()
    grid_of: dict[tuple[Any, ...], tuple[list[int], int]] = {}
    records: list[dict[str, Any]] = []
    grid_bytes = 0
    segment_cache: dict[tuple[int, int], list[packed.Segment]] = {}
    for i, leaf in enumerate(leaves):
        spec, shape, itemsize = leaf.key
        name = "bfloat16" if itemsize == 2 else "float32"
        record: dict[str, Any] = {
            "path": paths[i][0],
            "kind": "jax",
            "dtype": name,
            "shape": list(shape),
            "sharding": specs.setdefault(spec, len(specs)),
        }
        if leaf.packed:
            shards = shards_of[leaf.key]
            if leaf.key not in grid_of:
                cell = packed.regular_cell(shape, [sh.index for sh in shards])
                assert cell is not None, "an FSDP x TP sharding's shards form a regular grid"
                grid_of[leaf.key] = (
                    list(cell),
                    placements.number(tuple(sh.writer for sh in shards)),
                )
            cell, placement = grid_of[leaf.key]
            per_writer = []
            for w in sorted(by_writer[leaf.key]):
                rep = rep_of[w]
                segments = segment_cache.get((rep, i))
                if segments is None:
                    own = by_leaf[rep][i]
                    segments = segment_cache[(rep, i)] = packed.writer_segments(own)[rep]
                per_writer.append((w, segments))
            storage = {
                "type": "packed",
                "cell": cell,
                "placement": placement,
                "runs": packed.merge_runs(per_writer),
            }
            grid_bytes += len(json.dumps(storage, separators=(",", ":"))) - len('{"type":"packed"}')
        else:
            stored = storage_dtype(np.dtype(ml_dtypes.bfloat16 if itemsize == 2 else np.float32))
            meta = zarr_metadata(shape, stored, leaf.chunk, leaf.inner)
            storage = {"type": "zarr", "key": f"{prefix}arrays/{i}", "metadata": meta}
        record["storage"] = storage
        records.append(record)
    shardings = [
        {
            "type": "NamedSharding",
            "mesh": dict(axes),
            "spec": [list(x) if isinstance(x, tuple) else x for x in spec],
        }
        for spec in specs
    ]
    document = {
        "format": 3,
        "attempt": ATTEMPT,
        "skeleton": skeleton,
        "shardings": shardings,
        "placements": placements.lists,
        "leaves": records,
    }
    size = len(jsonio.dumps(document))
    # Format 2: each packed cell an entry instead; each entry's length from the plans.
    sample = [
        len(
            json.dumps(
                [f"{prefix}{e.obj}", e.offset, e.nbytes, [list(r) for r in e.index]],
                separators=(",", ":"),
            )
        )
        + 1
        for entries in plans.values()
        for e in entries[:2000]
    ]
    n_entries = sum(len(shards_of[leaf.key]) for leaf in leaves if leaf.packed)
    per_entry = sum(sample) / len(sample) if sample else 0.0
    placements_bytes = len(json.dumps(placements.lists, separators=(",", ":")))
    format2 = (
        size
        - grid_bytes
        - placements_bytes
        + n_entries * per_entry
        + 12 * sum(leaf.packed for leaf in leaves)
    )
    return {
        "payload": document,
        "pytree_json_bytes": size,
        "pytree_json_format2_bytes": format2,
        "pytree_json_parts": {
            "placements": placements_bytes,
            "pack_grids": grid_bytes,
            "format2_entries": n_entries * per_entry,
            "format2_bytes_per_entry": per_entry,
        },
        "placements": len(placements.lists),
        "runs": sum(len(r["storage"].get("runs", ())) for r in records),
    }


def _restore_gets(
    p: int,
    leaves: list[_Leaf],
    shards_of: dict[tuple[Any, ...], list[layout.Shard]],
    readers_of: dict[tuple[Any, ...], dict[int, set[layout.Index]]],
    plans: dict[int, list[layout.PackEntry]],
    pack_plan: Any,
) -> int:
    """GETs process ``p`` makes to restore onto the saving topology.

    There each region a device reads is exactly one saved shard. Packed
    entries it needs from another writer are placed by that writer's own
    pack plan.
    """
    wanted_packed: dict[int, set[tuple[int, layout.Index]]] = {}  # writer -> (leaf, index)
    gets = 0
    by_index: dict[tuple[Any, ...], dict[layout.Index, layout.Shard]] = {}
    for i, leaf in enumerate(leaves):
        index_map = by_index.get(leaf.key)
        if index_map is None:
            index_map = by_index[leaf.key] = {s.index: s for s in shards_of[leaf.key]}
        for region in readers_of[leaf.key].get(p, ()):
            shard = index_map[region]
            if leaf.packed:
                wanted_packed.setdefault(shard.writer, set()).add((i, shard.index))
            else:
                n = math.prod(
                    (b - a) // c for (a, b), c in zip(shard.index, leaf.chunk, strict=True)
                )
                gets += n * (1 if leaf.inner == leaf.chunk else 2)
    for writer, needed in wanted_packed.items():
        if writer not in plans:
            plans[writer] = pack_plan(writer)
        gets += _runs(plans[writer], needed)
    return gets


def _runs(entries: list[layout.PackEntry], needed: set[tuple[int, layout.Index]]) -> int:
    """Ranged GETs to fetch ``needed`` entries: back-to-back entries of one object share one."""
    runs = 0
    last: dict[str, int] = {}  # object -> end of the current run
    for e in sorted(
        (e for e in entries if (e.leaf, e.index) in needed), key=lambda e: (e.obj, e.offset)
    ):
        if last.get(e.obj) != e.offset:
            runs += 1
        last[e.obj] = e.offset + e.nbytes + layout.CRC_BYTES
    return runs


def _leaf_specs(
    transformer: Transformer, processes: int, devices_per_process: int
) -> list[LeafSpec]:
    """The training state's leaves as the planner sees them, on fresh stand-in shardings."""
    axes = {"data": processes, "model": devices_per_process}
    shardings: dict[Spec, SpecSharding] = {}
    dtypes = {2: np.dtype(ml_dtypes.bfloat16), 4: np.dtype(np.float32)}
    specs = []
    for _, itemsize in STATE:
        for path, shape, spec in transformer.params():
            sharding = shardings.get(spec) or shardings.setdefault(
                spec, SpecSharding(axes, spec, devices_per_process)
            )
            specs.append(LeafSpec(len(specs), path, shape, dtypes[itemsize], sharding))
    return specs


def planning(
    transformer: Transformer,
    processes: int,
    devices_per_process: int,
    handler: StandardCheckpointHandler,
    process: int,
) -> dict[str, float]:
    """Seconds and peak bytes of the real planner's layout on ``process`` (0: the primary).

    ``plan_layout`` is all of a save's planning but the host copies: storage
    of every leaf, writers of every part, this process's pack entries and, on
    the primary, ``pytree.json``'s pack grids. Timed once as it runs, then
    once more under ``tracemalloc`` for the peak of what it allocates
    (Python objects and numpy buffers), each on fresh shardings.
    """
    opts = PlanOptions(
        pack_below_bytes=handler.pack_below_bytes,
        max_object_bytes=handler.max_object_bytes,
        inner_chunk_bytes=handler.inner_chunk_bytes,
        attempt=ATTEMPT,
    )
    collecting = gc.isenabled()
    gc.disable()  # as the handler plans
    try:
        specs = _leaf_specs(transformer, processes, devices_per_process)
        started = time.perf_counter()
        decided, _ = plan_layout(specs, opts, process, processes)
        seconds = time.perf_counter() - started
        own = sum(len(parts) for parts in decided.own.values())
        del decided
        specs = _leaf_specs(transformer, processes, devices_per_process)
        tracemalloc.start()
        try:
            plan_layout(specs, opts, process, processes)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        if collecting:
            gc.enable()
    return {"process": process, "seconds": seconds, "peak_bytes": peak, "own_parts": own}


#: The planner's settings modelled: the defaults (the packing threshold chosen from the
#: state, ``layout.pack_threshold``: 32 MiB for 1T) and the fixed 2 MiB threshold of before.
#: Under FSDP a pod's shards are a few MiB, and a zarr chunk never spans two shards, so every
#: shard of a zarr leaf is an object of its own; packing coalesces shards of many leaves into
#: objects of up to ``max_object_bytes``.
VARIANTS: list[tuple[str, dict[str, int]]] = [
    ("defaults", {}),
    ("pack_below_bytes=2 MiB (before)", {"pack_below_bytes": 2 << 20}),
]


@scenario("scale_model", order=1)
def run(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"processes": 1024, "devices_per_process": 4, "models": []}
    for transformer in MODELS:
        for label, settings in VARIANTS:
            handler = StandardCheckpointHandler(**settings)
            result = model(transformer, out["processes"], out["devices_per_process"], handler)
            result["settings"] = label
            # Planning on the primary (it also describes every writer's packs) and on the last
            # process (its own parts only).
            result["planning"] = [
                planning(transformer, out["processes"], out["devices_per_process"], handler, p)
                for p in (0, out["processes"] - 1)
            ]
            ctx.log(
                f"scale model {transformer.name} ({label}): {result['objects_per_step']:,} "
                f"objects, {result['puts']:,} PUTs, {result['gets']:,} GETs "
                f"({result['model_seconds']:.1f}s); planning "
                + ", ".join(
                    f"process {x['process']} {x['seconds']:.2f}s {_bytes(x['peak_bytes'])} peak"
                    for x in result["planning"]
                )
            )
            out["models"].append(result)
    return out


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table_lines(result: dict[str, Any]) -> list[str]:
    """The summary rows for ``report.table``."""
    lines = [
        f"\n== Scale model: one step on {result['processes']} processes x "
        f"{result['devices_per_process']} devices (FSDP x TP), 14 bytes/parameter; "
        f"seconds of one step's requests at the initial rate limits (goal <= {GOAL_S:.0f} s) =="
    ]
    header = ["model", "planner", "pack below", "state", "objects", "obj min/med/mean/max",
              "PUT/proc max/mean", "GET/proc max/mean", "pytree.json", "(format 2)",
              "GCS write s", "GCS read s", "S3 PUT s", "S3 GET s", "S3 PUT/s in 60s",
              "fits", "plan s p0/last", "plan peak p0/last"]  # fmt: skip
    rows = []
    for m in result["models"]:
        ob = m["object_bytes"]
        pp, gp = m["puts_per_process"], m["gets_per_process"]
        rows.append([
            m["model"], m.get("settings", "defaults"), _bytes(m["pack_below_bytes"]),
            _bytes(m["state_bytes"]), f"{m['objects_per_step']:,}",
            f"{_bytes(ob['min'])}/{_bytes(ob['median'])}/{_bytes(ob['mean'])}/{_bytes(ob['max'])}",
            f"{pp['max']}/{pp['mean']:.1f}", f"{gp['max']}/{gp['mean']:.1f}",
            _bytes(m["pytree_json_bytes"]), _bytes(m["pytree_json_format2_bytes"]),
            f"{m['gcs_write_s']:.1f}", f"{m['gcs_read_s']:.1f}",
            f"{m['s3_put_s']:.1f}", f"{m['s3_get_s']:.1f}",
            f"{m['s3_put_rate_in_goal']:.0f}",
            f"save {'ok' if m['save_fits'] else 'MISSES'}, "
            f"restore {'ok' if m['restore_fits'] else 'MISSES'}",
            "/".join(f"{x['seconds']:.2f}" for x in m.get("planning", ())) or "-",
            "/".join(_bytes(x["peak_bytes"]) for x in m.get("planning", ())) or "-",
        ])  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    lines.append(
        f"limits: GCS {GCS_WRITES_PER_S} writes/s, {GCS_READS_PER_S} reads/s per bucket (initial; "
        f"doubling every 20 min); S3 {S3_PUTS_PER_S} PUT/s, {S3_GETS_PER_S} GET/s per prefix "
        "(a step's keys share one). PUTs: data objects, plus the primary's zarr.json, "
        "pytree.json and commit protocol; GETs: pytree.json and the data of a restore onto the "
        "saving topology. pytree.json: format 3 (pack grids), which every process reads on "
        "restore; (format 2): the same with one entry per packed shard, as before. plan: "
        "the real planner's layout (plan_layout: all of a save's planning but the host copies) "
        "on process 0 (the primary, which also describes every writer's packs) and on the last "
        "process: seconds, and peak bytes it allocates (tracemalloc)"
    )
    return lines
