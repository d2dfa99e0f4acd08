"""The copy phase of a save: what each process writes, and its host copies.

:func:`plan_save` runs on the caller's thread. From the tree alone (shapes,
dtypes, shardings) it decides, identically on every process, each leaf's
storage (its own zarr array, a slot in a pack object, or nothing when empty)
and which process writes each part of each shard (replicated shards are
spread over their replicas; :func:`.placement.plan_layout`). It then copies
this process's parts to host memory, the only part of a save that blocks
training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from cloudckpt.format.layout import Index, PackEntry, normalize_index
from cloudckpt.handlers.pytree import keys, layout
from cloudckpt.handlers.pytree.host import PageSizes, little_endian, prefault
from cloudckpt.handlers.pytree.placement import LeafSpec, PlanOptions, plan_layout
from cloudckpt.handlers.pytree.tree import flatten


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
    pack_entries: list[PackEntry] = field(default_factory=list)  # this process's, in order
    #: ``pytree.json``'s placements, which its pack grids index (format 3).
    placements: list[list[int]] = field(default_factory=list)
    nbytes: int = 0
    attempt: str = ""
    #: On the primary: completes the packed leaves' records in ``leaves_json`` and
    #: ``placements`` in place, off the blocking part of a save (``write_plan`` runs it
    #: beside the data writes).
    describe: Callable[[], None] | None = None


def _on_cpu(array: jax.Array) -> bool:
    # With the CPU as JAX's backend every array is in host memory: skip the per-array query.
    return jax.default_backend() == "cpu" or next(iter(array.devices())).platform == "cpu"


def _host_view(value: Any) -> np.ndarray:
    """The value on the host: a transfer from an accelerator, a view of CPU device memory."""
    return np.asarray(value)


def _host_copy(value: Any, pages: PageSizes) -> np.ndarray:
    """A host copy the caller cannot change afterwards (CPU arrays alias device memory).

    ``pages``: what the save's earlier copies measured of the page sizes (a
    save's copies come one at a time, each too short to measure both anew).
    """
    host = _host_view(value)
    if isinstance(value, jax.Array) and not _on_cpu(value):
        return host  # already a fresh buffer from the transfer
    copy = np.empty(host.shape, host.dtype)
    prefault([copy], pages)  # new memory: mapped ahead, with the faster page size
    np.copyto(copy, host)
    return copy


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


def plan_save(tree: Any, opts: PlanOptions) -> SavePlan:
    plan = SavePlan(attempt=opts.attempt)
    leaves, plan.skeleton = flatten(tree)
    _check_savable(leaves)
    me = jax.process_index()
    specs: list[LeafSpec] = []
    values: dict[int, tuple[str, Any]] = {}  # leaf -> (kind, array) of the leaves with bytes
    sharding_ids: dict[Any, int] = {}
    for i, (path, value) in enumerate(leaves):
        if isinstance(value, str):
            plan.leaves_json.append({"path": path, "kind": "str", "value": value})
            continue
        kind, array = _as_array(path, value)
        array = little_endian(array)
        dtype = np.dtype(array.dtype)
        shape = tuple(int(n) for n in array.shape)
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
        if math.prod(shape) == 0:
            entry["storage"] = {"type": "empty"}
            continue
        specs.append(LeafSpec(i, path, shape, dtype, sharding))
        values[i] = (kind, array)
    decided, plan.nbytes = plan_layout(specs, opts, me, jax.process_count(), defer=True)
    for i, storage in decided.storage.items():
        plan.leaves_json[i]["storage"] = storage
    plan.zarr_specs = decided.zarr_specs
    # The primary's packed records and placements are completed in place by describe,
    # which write_plan runs in the save's background part.
    plan.placements = decided.placements
    plan.describe = decided.describe
    plan.pack_entries = decided.pack_entries
    slots = {(e.leaf, e.index): e for e in decided.pack_entries}
    plan.packs = {obj: np.empty(size, np.uint8) for obj, size in decided.pack_sizes.items()}
    # One measure of the page sizes for all of this save's new memory, packs and copies:
    # measured per copy, half of every short copy would go on the slower size.
    pages = PageSizes()
    prefault(list(plan.packs.values()), pages)
    pending_copies: list[tuple[int, Index, Any, bool]] = []
    for spec in specs:
        own = decided.own.get(spec.leaf)
        if own:
            kind, array = values[spec.leaf]
            shards = decided.shards[spec.leaf]
            to_pack = spec.leaf in decided.packed
            pending_copies.extend(
                (spec.leaf, index, source, to_pack)
                for index, source in _sources(spec, kind, array, shards, own)
            )
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
            plan.regions.append(Region(leaf_id, index, _host_copy(source, pages)))
    return plan


def _sources(
    spec: LeafSpec,
    kind: str,
    array: Any,
    shards: list[layout.Shard],
    own: list[tuple[Index, Index]],
) -> list[tuple[Index, Any]]:
    """What to copy to host for each part this process writes: only that part's bytes."""
    if kind != "jax":
        return [(index, _part_of(array, within, index)) for index, within in own]
    if len(shards) == 1 and array.is_fully_replicated:
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
        local.setdefault(normalize_index(sh.index, spec.shape), sh.data)
    missing = sorted({within for _, within in own} - set(local))
    if missing:  # jax's placement disagrees with the layout
        raise RuntimeError(
            f"leaf {spec.path}: the layout assigns this process parts of shards {missing}, "
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
