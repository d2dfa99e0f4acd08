"""The copy phase of a save: what each process writes, and its host copies.

:func:`plan_save` runs on the caller's thread. From the tree alone (shapes,
dtypes, shardings) it decides, identically on every process, each leaf's
storage (its own zarr array, a slot in a pack object, or nothing when empty)
and which process writes each part of each shard (replicated shards are
spread over their replicas; see :func:`_place`). It then copies this
process's parts to host memory, the only part of a save that blocks training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from cloudckpt.format.layout import (
    CRC_BYTES,
    Index,
    PackEntry,
    index_shape,
    normalize_index,
    storage_dtype,
    zarr_metadata,
)
from cloudckpt.format.packed import Placements, encode_packed
from cloudckpt.handlers.pytree import keys, layout
from cloudckpt.handlers.pytree.host import little_endian
from cloudckpt.handlers.pytree.tree import flatten


@dataclass(frozen=True)
class PlanOptions:
    """The handler's layout settings and the process group a plan is made for.

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


def _describe_sharding(sharding: Any) -> dict[str, Any] | None:
    if sharding is None:
        return None
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = [list(p) if isinstance(p, tuple) else p for p in sharding.spec]
        return {
            "type": "NamedSharding",
            "mesh": dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape, strict=True)),
            "spec": spec,
        }
    return {"type": type(sharding).__name__, "num_devices": len(sharding.device_set)}


@dataclass
class Region:
    """A zarr region this process writes, with its host copy."""

    leaf: int
    index: Index
    data: np.ndarray | None


@dataclass
class SavePlan:
    leaves_json: list[dict[str, Any]] = field(default_factory=list)
    shardings: list[dict[str, Any] | None] = field(default_factory=list)
    skeleton: dict[str, Any] = field(default_factory=dict)
    zarr_specs: dict[int, dict[str, Any]] = field(default_factory=dict)  # leaf -> zarr metadata
    regions: list[Region] = field(default_factory=list)
    packs: dict[str, np.ndarray] = field(default_factory=dict)  # this process's pack objects
    pack_entries: list[PackEntry] = field(default_factory=list)
    #: ``pytree.json``'s placements, which its pack grids index (format 3).
    placements: list[list[int]] = field(default_factory=list)
    nbytes: int = 0
    attempt: str = ""


def _on_cpu(array: jax.Array) -> bool:
    # With the CPU as JAX's backend every array is in host memory: skip the per-array query.
    return jax.default_backend() == "cpu" or next(iter(array.devices())).platform == "cpu"


def _host_view(value: Any) -> np.ndarray:
    """The value on the host: a transfer from an accelerator, a view of CPU device memory."""
    return np.asarray(value)


def _host_copy(value: Any) -> np.ndarray:
    """A host copy the caller cannot change afterwards (CPU arrays alias device memory)."""
    host = _host_view(value)
    if isinstance(value, jax.Array) and not _on_cpu(value):
        return host  # already a fresh buffer from the transfer
    return host.copy()


_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


def _as_array(path: str, value: Any) -> tuple[str, Any]:
    """Classifies a leaf; returns (kind, array-like)."""
    if isinstance(value, jax.Array):
        if value.is_deleted():
            raise ValueError(f"leaf {path}: the array was deleted or donated before save")
        if keys.is_key(value):  # typed PRNG keys: their uint32 key data is what is stored
            return "jax", keys.key_data(value)
        return "jax", value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"leaf {path}: object arrays cannot be saved; use numeric dtypes")
        return "ndarray", value
    if isinstance(value, np.generic):
        return "np_scalar", np.asarray(value)
    if isinstance(value, bool):
        return "py", np.asarray(value, dtype=np.bool_)
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"leaf {path}: int {value} does not fit in int64")
        return "py", np.asarray(value, dtype=np.int64)
    if isinstance(value, float):
        return "py", np.asarray(value, dtype=np.float64)
    if isinstance(value, complex):
        return "py", np.asarray(value, dtype=np.complex128)
    raise ValueError(
        f"leaf {path}: cannot save a {type(value).__name__}; leaves must be jax.Array, numpy "
        "arrays or scalars, Python scalars or strings"
    )


# What _as_array accepts (str is stored inline).
_SAVABLE = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def _check_savable(leaves: list[tuple[str, Any]]) -> None:
    """Names every leaf no handler can store, before anything is copied or written."""
    bad = [
        f"leaf {path}: cannot save a {type(value).__name__} ({type(value).__module__})"
        for path, value in leaves
        if not isinstance(value, (str, *_SAVABLE))
    ]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(
            "; ".join(bad[:5])
            + more
            + ". Leaves must be jax.Array, numpy arrays or scalars, Python scalars or strings. "
            "Leave functions and other objects out of the saved tree: mark dataclass fields "
            "static (flax.struct.field(pytree_node=False), "
            "dataclasses.field(metadata=dict(static=True))), filter the state "
            "(nnx.state(model, nnx.Param, ...)), or save a dict of the array parts only"
        )


@dataclass
class _Stored:
    """A leaf with bytes, between classifying it and placing its parts."""

    leaf: int
    path: str
    kind: str
    array: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    sharding: Any
    shards: list[layout.Shard]
    to_pack: bool
    # (part index, index of the shard it is part of, writer), set by _place
    parts: list[tuple[Index, Index, int]] = field(default_factory=list)


def plan_save(tree: Any, opts: PlanOptions) -> SavePlan:
    plan = SavePlan(attempt=opts.attempt)
    prefix = f"@{opts.attempt}/" if opts.attempt else ""
    leaves, plan.skeleton = flatten(tree)
    _check_savable(leaves)
    me = jax.process_index()
    stored: list[_Stored] = []
    # Trees repeat a few shardings and dtypes many times over: compute each once.
    shard_cache: dict[tuple[Any, tuple[int, ...], int], list[layout.Shard]] = {}
    sharding_ids: dict[Any, int] = {}
    for i, (path, value) in enumerate(leaves):
        if isinstance(value, str):
            plan.leaves_json.append({"path": path, "kind": "str", "value": value})
            continue
        kind, array = _as_array(path, value)
        array = little_endian(array)
        dtype = np.dtype(array.dtype)
        shape = tuple(int(n) for n in array.shape)
        nbytes = math.prod(shape) * dtype.itemsize
        plan.nbytes += nbytes
        sharding = array.sharding if kind == "jax" else None
        entry: dict[str, Any] = {
            "path": path,
            "kind": kind,
            "dtype": _dtype_name(dtype),
            "shape": list(shape),
            "sharding": None,
        }
        if sharding is not None:
            if sharding not in sharding_ids:
                sharding_ids[sharding] = len(plan.shardings)
                plan.shardings.append(_describe_sharding(sharding))
            entry["sharding"] = sharding_ids[sharding]
        if kind == "py":
            entry["py_type"] = type(value).__name__
        elif array is not value and keys.is_key(value):  # _as_array swapped in key data
            entry[keys.IMPL_FIELD] = keys.impl_name(value)
        plan.leaves_json.append(entry)
        if nbytes == 0:
            entry["storage"] = {"type": "empty"}
            continue
        key = (sharding, shape, dtype.itemsize)
        shards = shard_cache.get(key)
        if shards is None:
            shards = _writable_shards(path, shape, dtype.itemsize, sharding, opts)
            shard_cache[key] = shards
        stored.append(_Stored(i, path, kind, array, shape, dtype, sharding, shards, False))
    # The threshold may depend on the whole tree's (global) bytes: decided after the walk.
    threshold = opts.pack_below_bytes
    if threshold is None:
        threshold = layout.pack_threshold(plan.nbytes, opts.max_object_bytes)
    for leaf in stored:
        leaf.to_pack = max(s.nbytes for s in leaf.shards) < threshold
    _place(stored, plan.nbytes, opts)
    packed_shards: list[tuple[int, layout.Shard]] = []
    whole: set[int] = set()  # packed leaves of one shard: every restoring process reads them
    pending_copies: list[tuple[int, Index, Any, bool]] = []
    for leaf in stored:
        i, shape, dtype = leaf.leaf, leaf.shape, leaf.dtype
        entry = plan.leaves_json[i]
        if leaf.to_pack:
            entry["storage"] = {"type": "packed"}
            if len(leaf.shards) == 1:
                whole.add(i)
            # A packed shard is never split: its parts are its shards, in order.
            packed_shards.extend(
                (i, layout.Shard(s.index, writer, s.nbytes))
                for s, (_, _, writer) in zip(leaf.shards, leaf.parts, strict=True)
            )
        else:
            parts = [layout.Shard(index, writer, 0) for index, _, writer in leaf.parts]
            chunk = layout.chunk_grid(shape, parts, dtype.itemsize, opts.max_object_bytes)
            inner = layout.split_to_fit(chunk, dtype.itemsize, opts.inner_chunk_bytes)
            meta = zarr_metadata(shape, storage_dtype(dtype), chunk, inner)
            plan.zarr_specs[i] = meta
            entry["storage"] = {"type": "zarr", "key": f"{prefix}arrays/{i}", "metadata": meta}
        own = [(index, within) for index, within, writer in leaf.parts if writer == me]
        if own:
            pending_copies.extend(
                (i, index, source, leaf.to_pack) for index, source in _sources(leaf, own)
            )
    plan.pack_entries = layout.pack_layout(
        packed_shards, opts.max_object_bytes, whole.__contains__, prefix
    )
    slots: dict[tuple[int, Index], PackEntry] = {}
    sizes: dict[str, int] = {}
    by_leaf: dict[int, list[PackEntry]] = {}
    for e in plan.pack_entries:
        by_leaf.setdefault(e.leaf, []).append(e)
        if e.writer == me:
            slots[(e.leaf, e.index)] = e
            sizes[e.obj] = max(sizes.get(e.obj, 0), e.offset + e.nbytes + CRC_BYTES)
    if me == opts.primary_host:  # only the primary writes pytree.json
        placements = Placements()
        for i, entries in by_leaf.items():  # a grid described once, or entries one by one
            shape = tuple(plan.leaves_json[i]["shape"])
            plan.leaves_json[i]["storage"] = encode_packed(shape, entries, placements)
        plan.placements = placements.lists
    plan.packs = {obj: np.empty(size, np.uint8) for obj, size in sizes.items()}
    # Start every device-to-host transfer before waiting on any of them.
    for _, _, source, _ in pending_copies:
        if isinstance(source, jax.Array) and not _on_cpu(source):
            source.copy_to_host_async()
    for leaf_id, index, source, to_pack in pending_copies:
        if to_pack:  # straight into this process's pack object: one copy
            e = slots[(leaf_id, index)]
            host = np.ascontiguousarray(_host_view(source)).reshape(-1).view(np.uint8)
            plan.packs[e.obj][e.offset : e.offset + e.nbytes] = host
        else:
            plan.regions.append(Region(leaf_id, index, _host_copy(source)))
    return plan


def _writable_shards(
    path: str, shape: tuple[int, ...], itemsize: int, sharding: Any, opts: PlanOptions
) -> list[layout.Shard]:
    """The leaf's shards, their replicas narrowed to the processes taking part in the save."""
    shards = layout.global_shards(shape, itemsize, sharding)
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


def _place(stored: list[_Stored], total_bytes: int, opts: PlanOptions) -> None:
    """Decides every leaf's parts and their writers, identically on every process.

    Without replica-parallel writes each shard is one part, written by its
    replica-0 process. With them, shards held by one process stay with it;
    the others are assigned, largest first, greedy by bytes over the
    processes holding them: a packed shard whole, an array shard split into
    up to one part per replica, none smaller than ``layout.MIN_PART_BYTES``
    or than 1/PARTS_PER_PROCESS of the mean bytes per process (so splitting
    adds at most about that many objects per process, however large the pod).
    """
    if not opts.replica_parallel:
        for leaf in stored:
            leaf.parts = [(s.index, s.index, s.writer) for s in leaf.shards]
        return
    writers = len(opts.members) or jax.process_count()
    min_part = max(layout.MIN_PART_BYTES, total_bytes // (PARTS_PER_PROCESS * max(writers, 1)))
    loads = layout.WriterLoads()
    Split = list[tuple[list[Index], list[int]]]  # per shard: its parts and their bytes
    spread: list[tuple[int, int, int, tuple[list[Index], list[int]]]] = []
    split_cache: dict[tuple[Any, tuple[int, ...], int], Split] = {}
    for n, leaf in enumerate(stored):
        leaf.parts = [(s.index, s.index, s.writer) for s in leaf.shards]
        if all(len(s.replicas) <= 1 for s in leaf.shards):
            for s in leaf.shards:
                loads.add(s.writer, s.nbytes)
            continue
        key = (leaf.sharding, leaf.shape, leaf.dtype.itemsize)
        split = split_cache.get(key)
        if split is None:
            if leaf.to_pack:  # a pack entry is one shard, whole
                split = [([s.index], [s.nbytes]) for s in leaf.shards]
            else:
                counts = [min(len(s.replicas), max(1, s.nbytes // min_part)) for s in leaf.shards]
                itemsize = leaf.dtype.itemsize
                split = [
                    (parts, [math.prod(index_shape(ix)) * itemsize for ix in parts])
                    for parts in layout.split_shards(leaf.shape, leaf.shards, counts)
                ]
            split_cache[key] = split
        for k, s in enumerate(leaf.shards):
            if len(s.replicas) <= 1:
                loads.add(s.writer, s.nbytes)
            else:
                spread.append((-s.nbytes, n, k, split[k]))
    # Held-by-one shards are counted first, so replicated bytes even out around them.
    spread.sort(key=lambda t: t[:3])
    placed: dict[int, dict[int, list[tuple[Index, Index, int]]]] = {}
    for _, n, k, (indices, sizes) in spread:
        shard = stored[n].shards[k]
        chosen = loads.assign(shard.replicas, sizes)
        placed.setdefault(n, {})[k] = [
            (ix, shard.index, w) for ix, w in zip(indices, chosen, strict=True)
        ]
    for n, by_shard in placed.items():
        leaf = stored[n]
        leaf.parts = [q for k, p in enumerate(leaf.parts) for q in by_shard.get(k, [p])]


def _sources(leaf: _Stored, own: list[tuple[Index, Index]]) -> list[tuple[Index, Any]]:
    """What to copy to host for each part this process writes: only that part's bytes."""
    array = leaf.array
    if leaf.kind != "jax":
        return [(index, _part_of(array, within, index)) for index, within in own]
    if len(leaf.shards) == 1 and array.is_fully_replicated:
        # One region, the whole value: any local replica holds the data.
        return [
            (
                index,
                array if index == within else _part_of(array.addressable_data(0), within, index),
            )
            for index, within in own
        ]
    local: dict[Index, Any] = {}
    for sh in array.addressable_shards:
        local.setdefault(normalize_index(sh.index, leaf.shape), sh.data)
    missing = sorted({within for _, within in own} - set(local))
    if missing:  # jax's placement disagrees with the layout
        raise RuntimeError(
            f"leaf {leaf.path}: the layout assigns this process parts of shards {missing}, "
            f"which none of its devices holds; please report this sharding"
        )
    return [(index, _part_of(local[within], within, index)) for index, within in own]


def _part_of(data: Any, within: Index, index: Index) -> Any:
    """``index`` (global) of the shard ``data`` holding region ``within``, without copying it all."""
    if index == within:
        return data
    local = tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(index, within, strict=True))
    if isinstance(data, jax.Array) and not _on_cpu(data):
        # Slice on the device, so only the part crosses to the host.
        return jax.lax.slice(data, [s.start for s in local], [s.stop for s in local])
    return _host_view(data)[local]


def _check_active(path: str, shards: list[layout.Shard], members: tuple[int, ...]) -> None:
    outside = {s.writer for s in shards} - set(members or {s.writer for s in shards})
    if outside:
        raise ValueError(
            f"leaf {path} has shards on processes {sorted(outside)}, which are not among the "
            f"active processes {list(members)}; only their devices can be saved"
        )
