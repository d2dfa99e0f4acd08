"""The copy phase of a save: what each process writes, and its host copies.

:func:`plan_save` runs on the caller's thread. From the tree alone (shapes,
dtypes, shardings) it decides, identically on every process, each leaf's
storage (its own zarr array, a slot in a pack object, or nothing when empty)
and which process writes each shard (replica 0's owner). It then copies this
process's shards to host memory, the only part of a save that blocks training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from cloudckpt.handlers.pytree import keys, layout
from cloudckpt.handlers.pytree.host import little_endian
from cloudckpt.handlers.pytree.tree import flatten


@dataclass(frozen=True)
class PlanOptions:
    """The handler's layout settings and the process group a plan is made for."""

    pack_below_bytes: int
    max_object_bytes: int
    inner_chunk_bytes: int
    primary_host: int = 0
    members: tuple[int, ...] = ()
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
    index: layout.Index
    data: np.ndarray | None


@dataclass
class SavePlan:
    leaves_json: list[dict[str, Any]] = field(default_factory=list)
    shardings: list[dict[str, Any] | None] = field(default_factory=list)
    skeleton: dict[str, Any] = field(default_factory=dict)
    zarr_specs: dict[int, dict[str, Any]] = field(default_factory=dict)  # leaf -> zarr metadata
    regions: list[Region] = field(default_factory=list)
    packs: dict[str, np.ndarray] = field(default_factory=dict)  # this process's pack objects
    pack_entries: list[layout.PackEntry] = field(default_factory=list)
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


def plan_save(tree: Any, opts: PlanOptions) -> SavePlan:
    plan = SavePlan(attempt=opts.attempt)
    prefix = f"@{opts.attempt}/" if opts.attempt else ""
    leaves, plan.skeleton = flatten(tree)
    _check_savable(leaves)
    me = jax.process_index()
    packed_shards: list[tuple[int, layout.Shard]] = []
    pending_copies: list[tuple[int, layout.Index, Any, bool]] = []
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
            shards = layout.global_shards(shape, dtype.itemsize, sharding)
            if sharding is None:
                shards = [layout.Shard(s.index, opts.primary_host, s.nbytes) for s in shards]
            _check_active(path, shards, opts.members)
            shard_cache[key] = shards
        if max(s.nbytes for s in shards) < opts.pack_below_bytes:
            entry["storage"] = {"type": "packed"}
            packed_shards.extend((i, s) for s in shards)
            to_pack = True
        else:
            stored = layout.storage_dtype(dtype)
            chunk = layout.chunk_grid(shape, shards, dtype.itemsize, opts.max_object_bytes)
            inner = layout.split_to_fit(chunk, dtype.itemsize, opts.inner_chunk_bytes)
            meta = layout.zarr_metadata(shape, stored, chunk, inner)
            plan.zarr_specs[i] = meta
            entry["storage"] = {"type": "zarr", "key": f"{prefix}arrays/{i}", "metadata": meta}
            to_pack = False
        own = [s.index for s in shards if s.writer == me]
        if not own:
            continue
        if kind != "jax" or (len(shards) == 1 and array.is_fully_replicated):
            # One region, the whole value: any local replica is the replica-0 data.
            pending_copies.extend((i, idx, array, to_pack) for idx in own)
            continue
        by_index = {
            layout.normalize_index(sh.index, shape): sh.data
            for sh in array.addressable_shards
            if sh.replica_id == 0
        }
        if set(by_index) != set(own):  # jax's replica ids disagree with the layout
            raise RuntimeError(
                f"leaf {path}: this process addresses replica-0 shards {sorted(by_index)} but "
                f"the layout assigns it {sorted(own)}; please report this sharding"
            )
        pending_copies.extend((i, idx, by_index[idx], to_pack) for idx in own)
    plan.pack_entries = layout.pack_layout(packed_shards, opts.max_object_bytes, prefix)
    slots: dict[tuple[int, layout.Index], layout.PackEntry] = {}
    sizes: dict[str, int] = {}
    for e in plan.pack_entries:
        plan.leaves_json[e.leaf]["storage"].setdefault("entries", []).append(e.to_json())
        if e.writer == me:
            slots[(e.leaf, e.index)] = e
            sizes[e.obj] = max(sizes.get(e.obj, 0), e.offset + e.nbytes + layout.CRC_BYTES)
    plan.packs = {obj: np.empty(size, np.uint8) for obj, size in sizes.items()}
    # Start every device-to-host transfer before waiting on any of them.
    for _, _, source, _ in pending_copies:
        if isinstance(source, jax.Array) and not _on_cpu(source):
            source.copy_to_host_async()
    for leaf, index, source, to_pack in pending_copies:
        if to_pack:  # straight into this process's pack object: one copy
            e = slots[(leaf, index)]
            host = np.ascontiguousarray(_host_view(source)).reshape(-1).view(np.uint8)
            plan.packs[e.obj][e.offset : e.offset + e.nbytes] = host
        else:
            plan.regions.append(Region(leaf, index, _host_copy(source)))
    return plan


def _check_active(path: str, shards: list[layout.Shard], members: tuple[int, ...]) -> None:
    outside = {s.writer for s in shards} - set(members or {s.writer for s in shards})
    if outside:
        raise ValueError(
            f"leaf {path} has shards on processes {sorted(outside)}, which are not among the "
            f"active processes {list(members)}; only their devices can be saved"
        )
