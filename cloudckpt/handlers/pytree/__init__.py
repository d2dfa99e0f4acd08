"""Sharded ``jax.Array`` pytrees, written straight to storage through tensorstore.

Save: on the caller's thread each process copies the shards it writes
(``replica_id == 0``) to host memory; in the background tensorstore writes
them as zarr v3 arrays (crc32c on every chunk) or, for small arrays, as packed
objects, with a bounded number of bytes in flight. The primary process writes
``pytree.json``: the tree's skeleton, and per leaf its dtype, shape, sharding
and where its bytes are. See docs/FORMAT.md.

Restore: each array is read straight into the target's sharding; each process
reads only the regions its devices need. Arrays the target does not name are
never read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import warnings
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import tensorstore as ts

from cloudckpt import _jsonio
from cloudckpt._args_base import CheckpointArgs
from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.handlers.base import AsyncCheckpointHandler
from cloudckpt.handlers.pytree import _backing, _document
from cloudckpt.handlers.pytree import _keys as keys
from cloudckpt.handlers.pytree import _layout as layout
from cloudckpt.handlers.pytree._budget import ByteBudget
from cloudckpt.handlers.pytree._document import PYTREE_FORMAT, Leaf, PytreeDocument
from cloudckpt.handlers.pytree._host import little_endian
from cloudckpt.handlers.pytree._tree import flatten, rebuild, unflatten_like
from cloudckpt.metadata import write_object
from cloudckpt.path import StoragePath
from cloudckpt.registry import register_with_handler

logger = logging.getLogger(__name__)

METADATA_NAME = "pytree.json"
_MiB = 1 << 20


@dataclass(frozen=True)
class ArrayMetadata:
    """What a saved array is, without its data (a ``jax.ShapeDtypeStruct`` look-alike).

    Attributes:
        shape: Global shape.
        dtype: numpy dtype, or jax's key dtype (``key<fry>``) for typed PRNG keys.
        sharding: How it was sharded when saved (mesh axes and partition
            spec for a ``NamedSharding``), or None for host values.
        kind: ``jax``, ``ndarray``, ``np_scalar`` or ``py`` (Python scalar).
        nbytes: Size in bytes.
    """

    shape: tuple[int, ...]
    dtype: Any  # np.dtype, or a jax PRNG key dtype
    sharding: dict[str, Any] | None = None
    kind: str = "jax"
    nbytes: int = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


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


# ------------------------------------------------------------------------------ save plan
@dataclass
class _Region:
    """A zarr region this process writes, with its host copy."""

    leaf: int
    index: layout.Index
    data: np.ndarray | None


@dataclass
class _SavePlan:
    leaves_json: list[dict[str, Any]] = field(default_factory=list)
    shardings: list[dict[str, Any] | None] = field(default_factory=list)
    skeleton: dict[str, Any] = field(default_factory=dict)
    zarr_specs: dict[int, dict[str, Any]] = field(default_factory=dict)  # leaf -> zarr metadata
    regions: list[_Region] = field(default_factory=list)
    packs: dict[str, np.ndarray] = field(default_factory=dict)  # this process's pack objects
    pack_entries: list[layout.PackEntry] = field(default_factory=list)
    nbytes: int = 0


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


class StandardCheckpointHandler(AsyncCheckpointHandler):
    """Saves and restores pytrees of sharded arrays, scalars and strings.

    Args:
        pack_below_bytes: Arrays whose largest shard is smaller are packed
            with other small shards into a few objects instead of getting
            objects of their own.
        max_object_bytes: Largest object written (chunks and packs are split
            to fit), bounding object size for upload and request rate.
        inner_chunk_bytes: Target size of the independently readable pieces
            inside a chunk, which a restore onto another sharding can fetch
            alone with ranged reads.
        max_inflight_bytes: Bytes being encoded, written or read at once;
            host memory during a save stays near the data being saved plus
            this.
    """

    def __init__(
        self,
        *,
        pack_below_bytes: int = 2 * _MiB,
        max_object_bytes: int = 256 * _MiB,
        inner_chunk_bytes: int = 8 * _MiB,
        max_inflight_bytes: int = 256 * _MiB,
    ) -> None:
        for name, value in (
            ("pack_below_bytes", pack_below_bytes),
            ("max_object_bytes", max_object_bytes),
            ("inner_chunk_bytes", inner_chunk_bytes),
            ("max_inflight_bytes", max_inflight_bytes),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.pack_below_bytes = pack_below_bytes
        self.max_object_bytes = max_object_bytes
        self.inner_chunk_bytes = min(inner_chunk_bytes, max_object_bytes)
        self.max_inflight_bytes = max_inflight_bytes
        self._primary_host = 0
        self._members: tuple[int, ...] = ()

    def bind_process_group(self, primary_host: int, members: Sequence[int]) -> None:
        self._primary_host = primary_host
        self._members = tuple(members)

    # ------------------------------------------------------------------- copy phase
    def _plan(self, tree: Any) -> _SavePlan:
        plan = _SavePlan()
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
                    shards = [layout.Shard(s.index, self._primary_host, s.nbytes) for s in shards]
                self._check_active(path, shards)
                shard_cache[key] = shards
            if max(s.nbytes for s in shards) < self.pack_below_bytes:
                entry["storage"] = {"type": "packed"}
                packed_shards.extend((i, s) for s in shards)
                to_pack = True
            else:
                stored = layout.storage_dtype(dtype)
                chunk = layout.chunk_grid(shape, shards, dtype.itemsize, self.max_object_bytes)
                inner = layout.split_to_fit(chunk, dtype.itemsize, self.inner_chunk_bytes)
                meta = layout.zarr_metadata(shape, stored, chunk, inner)
                plan.zarr_specs[i] = meta
                entry["storage"] = {"type": "zarr", "key": f"arrays/{i}", "metadata": meta}
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
        plan.pack_entries = layout.pack_layout(packed_shards, self.max_object_bytes)
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
                plan.regions.append(_Region(leaf, index, _host_copy(source)))
        return plan

    def _check_active(self, path: str, shards: list[layout.Shard]) -> None:
        outside = {s.writer for s in shards} - set(self._members or {s.writer for s in shards})
        if outside:
            raise ValueError(
                f"leaf {path} has shards on processes {sorted(outside)}, which are not among the "
                f"active processes {list(self._members)}; only their devices can be saved"
            )

    def async_save(self, directory: StoragePath, args: CheckpointArgs) -> Sequence[Awaitable[None]]:
        if not isinstance(args, StandardSave):
            raise TypeError(
                f"StandardCheckpointHandler saves StandardSave args, got {type(args).__name__}"
            )
        # Planning allocates a few objects per leaf; with large trees the cyclic
        # collector's passes over them dominate, and nothing here makes cycles.
        collecting = gc.isenabled()
        gc.disable()
        try:
            plan = self._plan(args.item)
        finally:
            if collecting:
                gc.enable()
        return [self._write(directory, plan)]

    # ----------------------------------------------------------------- commit phase
    async def _write(self, directory: StoragePath, plan: _SavePlan) -> None:
        backend = directory.backend
        context = backend.tensorstore_context()
        primary = jax.process_index() == self._primary_host
        budget = ByteBudget(self.max_inflight_bytes)
        stores: dict[int, asyncio.Future[Any]] = {}

        def open_array(leaf: int) -> Awaitable[Any]:
            if leaf not in stores:
                spec = {
                    "driver": "zarr3",
                    "kvstore": (directory / f"arrays/{leaf}").kvstore_spec(),
                    "metadata": plan.zarr_specs[leaf],
                    "store_data_equal_to_fill_value": True,
                }
                if primary:
                    spec["create"] = True
                else:
                    spec["assume_metadata"] = True
                stores[leaf] = asyncio.ensure_future(_ts_open(spec, context))
            return stores[leaf]

        async def write_region(region: _Region) -> None:
            assert region.data is not None
            nbytes = region.data.nbytes
            store = await open_array(region.leaf)
            data = region.data
            stored = np.dtype(plan.zarr_specs[region.leaf]["data_type"])
            if data.dtype != stored:
                data = data.view(stored)
            async with budget.hold(nbytes):
                await store[layout.index_slices(region.index)].write(
                    data, can_reference_source_data_indefinitely=True
                )
            region.data = None  # free the host copy as soon as it is stored

        async def create_metadata_only(leaf: int) -> None:
            await open_array(leaf)

        tasks: list[Awaitable[None]] = [write_region(r) for r in plan.regions]
        if primary:
            tasks += [create_metadata_only(leaf) for leaf in plan.zarr_specs]
        tasks += [self._write_packs(directory, plan, context)]
        await asyncio.gather(*tasks)
        if primary:
            document = {
                "format": PYTREE_FORMAT,
                "skeleton": plan.skeleton,
                "shardings": plan.shardings,
                "leaves": plan.leaves_json,
            }
            await write_object(
                directory / METADATA_NAME, _jsonio.dumps(document, what="pytree metadata")
            )

    async def _write_packs(
        self, directory: StoragePath, plan: _SavePlan, context: ts.Context
    ) -> None:
        if not plan.packs:
            return
        me = jax.process_index()
        for e in plan.pack_entries:
            if e.writer == me:
                buffer = plan.packs[e.obj]
                data = buffer[e.offset : e.offset + e.nbytes]
                data.flags.writeable = False
                end = e.offset + e.nbytes
                buffer[end : end + layout.CRC_BYTES] = np.frombuffer(
                    layout.entry_crc(data), np.uint8
                )
        kvstore = await ts.KvStore.open(directory.kvstore_spec(), context=context)
        packs, plan.packs = plan.packs, {}
        await asyncio.gather(*(kvstore.write(name, buf.tobytes()) for name, buf in packs.items()))

    # ---------------------------------------------------------------------- restore
    async def _read_document(self, directory: StoragePath) -> PytreeDocument:
        target = directory / METADATA_NAME
        data = await target.backend.get(target.path)
        if data is None:
            raise FileNotFoundError(f"no pytree at {directory} ({METADATA_NAME} is missing)")
        return _document.parse_pytree(_jsonio.loads(data, where=str(target)), where=str(target))

    async def metadata(self, directory: StoragePath) -> Any:
        document = await self._read_document(directory)
        values = [_leaf_metadata(leaf, document.shardings) for leaf in document.leaves]
        return rebuild(document.skeleton, values)

    async def restore(self, directory: StoragePath, args: CheckpointArgs | None = None) -> Any:
        if args is None:
            args = StandardRestore()
        if not isinstance(args, StandardRestore):
            raise TypeError(
                f"StandardCheckpointHandler restores with StandardRestore args, got {type(args).__name__}"
            )
        document = await self._read_document(directory)
        saved = document.leaves
        reader = _Reader(directory, saved, ByteBudget(self.max_inflight_bytes))
        if args.target is None:
            await _backing.check_stored(directory, document, range(len(saved)))
            await reader.prefetch_packed(
                (i, reader.regions_for(i, None)) for i in range(len(saved))
            )
            values = await asyncio.gather(*(reader.leaf_to_host(i) for i in range(len(saved))))
            return rebuild(document.skeleton, list(values))
        by_path = {leaf.path: i for i, leaf in enumerate(saved)}
        targets, _ = flatten(args.target)
        plan = _match(directory, targets, saved, by_path, strict=args.strict)
        # A target's own shape bounds what is allocated for it; a shape taken from the
        # checkpoint (no shape, or its own ArrayMetadata) must first be backed by storage.
        await _backing.check_stored(
            directory,
            document,
            (i for i, t in plan.reads if isinstance(t, ArrayMetadata) or not hasattr(t, "shape")),
        )
        await reader.prefetch_packed((i, reader.regions_for(i, t)) for i, t in plan.reads)
        results = await asyncio.gather(*(reader.leaf_like(i, t) for i, t in plan.reads))
        values = {path: value for (path, _), value in zip(plan.paths, results, strict=True)}
        values.update(plan.untouched)
        return unflatten_like(args.target, values)


def _leaf_metadata(leaf: Leaf, shardings: list[Any]) -> Any:
    if leaf.dtype is None:
        return leaf.value
    if keys.is_key_leaf(leaf):
        return _key_metadata(leaf, shardings)
    return ArrayMetadata(
        shape=leaf.shape,
        dtype=leaf.dtype,
        sharding=None if leaf.sharding is None else shardings[leaf.sharding],
        kind=leaf.kind,
        nbytes=leaf.nbytes,
    )


def _key_metadata(leaf: Leaf, shardings: list[Any]) -> ArrayMetadata:
    _, dtype, _ = keys.impl_facts(leaf)
    shape = keys.key_shape_of(leaf)
    sharding = None if leaf.sharding is None else shardings[leaf.sharding]
    return ArrayMetadata(
        shape=shape,
        dtype=dtype,
        sharding=keys.logical_sharding(sharding, len(shape)),
        kind=leaf.kind,
        nbytes=leaf.nbytes,  # the uint32 key data
    )


async def _ts_open(spec: dict[str, Any], context: ts.Context) -> Any:
    try:
        return await ts.open(spec, context=context)
    except Exception as exc:
        raise _storage_error(exc, spec) from exc


def _storage_error(exc: Exception, spec: dict[str, Any]) -> Exception:
    text = str(exc)
    where = json_location(spec)
    if "DATA_LOSS" in text or "checksum" in text.lower() or "digest" in text.lower():
        return CorruptCheckpointError(f"corrupt data in {where}: {text.splitlines()[0]}")
    if "NOT_FOUND" in text:
        return CorruptCheckpointError(f"missing data in {where}: {text.splitlines()[0]}")
    return exc


def json_location(spec: dict[str, Any]) -> str:
    kv = spec.get("kvstore", spec)
    bucket = kv.get("bucket")
    return f"{kv['driver']}://{bucket + '/' if bucket else ''}{kv.get('path', '')}"


# ------------------------------------------------------------------------------ matching
@dataclass
class _MatchPlan:
    reads: list[tuple[int, Any]]
    paths: list[tuple[str, Any]]
    untouched: dict[str, Any]


def _match(
    directory: StoragePath,
    targets: list[tuple[str, Any]],
    saved: Sequence[Leaf],
    by_path: dict[str, int],
    *,
    strict: bool,
) -> _MatchPlan:
    missing, shapes, dtypes, kinds = [], [], [], []
    plan = _MatchPlan([], [], {})
    for path, target in targets:
        i = by_path.get(path)
        if i is None:
            missing.append(path)
            plan.untouched[path] = target
            continue
        leaf = saved[i]
        if keys.is_key_leaf(leaf) or keys.is_key(target):
            problem = keys.mismatch(path, leaf, target)
            if problem is not None:
                (shapes if problem[0] == "shape" else kinds).append(problem[1])
                continue
        elif leaf.kind == "str" or isinstance(target, str):
            if not (leaf.kind == "str" and isinstance(target, str)):
                kinds.append(f"{path} (saved {leaf.kind}, target {type(target).__name__})")
                continue
        elif hasattr(target, "shape") and hasattr(target, "dtype"):
            if tuple(target.shape) != leaf.shape:
                shapes.append(f"{path}: target {tuple(target.shape)} vs saved {leaf.shape}")
                continue
            if np.dtype(target.dtype) != leaf.dtype:
                dtypes.append(
                    f"{path}: target {np.dtype(target.dtype).name} vs saved {leaf.dtype_name}"
                )
        plan.reads.append((i, target))
        plan.paths.append((path, target))
    problems = []
    if missing and strict:
        problems.append(_few(f"{len(missing)} leaves missing from the checkpoint", missing))
    if shapes:
        problems.append(_few(f"{len(shapes)} shape mismatches", shapes))
    if dtypes and strict:
        problems.append(_few(f"{len(dtypes)} dtype mismatches", dtypes))
    if kinds:
        problems.append(_few(f"{len(kinds)} kind mismatches", kinds))
    if problems:
        hint = "" if not strict else "; strict=False casts dtypes and skips missing leaves"
        raise ValueError(
            f"restore target does not match the checkpoint at {directory}: "
            + "; ".join(problems)
            + hint
        )
    if missing or dtypes:
        warnings.warn(
            f"partial restore from {directory}: "
            + "; ".join(
                p
                for p in (
                    _few(
                        f"{len(missing)} target leaves not in the checkpoint (left as given)",
                        missing,
                    )
                    if missing
                    else "",
                    _few(f"{len(dtypes)} leaves cast", dtypes) if dtypes else "",
                )
                if p
            ),
            stacklevel=4,
        )
    return plan


def _few(title: str, items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return f"{title}: {', '.join(items[:n])}{more}"


# ------------------------------------------------------------------------------- reading
class _Reader:
    """Reads saved leaves, region by region, within a byte budget."""

    def __init__(self, directory: StoragePath, saved: Sequence[Leaf], budget: ByteBudget) -> None:
        self.directory = directory
        self.saved = saved
        self.budget = budget
        self.context = directory.backend.tensorstore_context()
        self._stores: dict[int, asyncio.Future[Any]] = {}
        self._kvstore: asyncio.Future[Any] | None = None
        self._packed: dict[tuple[int, layout.Index], bytes] = {}

    def regions_for(self, leaf: int, target: Any) -> list[layout.Index]:
        """The regions of ``leaf`` this process reads for ``target`` (None: all of it)."""
        info = self.saved[leaf]
        if info.kind == "str":
            return []
        if keys.is_key_leaf(info):
            return keys.regions(info, target)
        shape = info.shape
        sharding = getattr(target, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding):
            return [layout.full_index(shape)]
        return sorted(
            {
                layout.normalize_index(idx, shape)
                for idx in sharding.addressable_devices_indices_map(shape).values()
            }
        )

    async def prefetch_packed(self, requests: Any) -> None:
        """Reads the packed entries these (leaf, regions) need: one ranged read per run.

        Entries of one object that lie back to back are fetched together, so a
        full restore reads each pack once, while a partial one reads only the
        entries it needs.
        """
        wanted: dict[str, list[layout.PackEntry]] = {}
        for leaf, regions in requests:
            storage = self.saved[leaf].storage
            if not isinstance(storage, _document.PackedStorage):
                continue
            for entry in storage.entries:
                entry = dataclasses.replace(entry, leaf=leaf)
                if (leaf, entry.index) in self._packed:
                    continue
                if any(_overlap(entry.index, r) is not None for r in regions):
                    wanted.setdefault(entry.obj, []).append(entry)
        runs: list[list[layout.PackEntry]] = []
        for entries in wanted.values():
            entries.sort(key=lambda e: e.offset)
            run = [entries[0]]
            for entry in entries[1:]:
                last = run[-1]
                if entry.offset == last.offset + last.nbytes + layout.CRC_BYTES:
                    run.append(entry)
                else:
                    runs.append(run)
                    run = [entry]
            runs.append(run)
        if runs:
            kvstore = await self._packs()
            await asyncio.gather(*(self._read_run(kvstore, run) for run in runs))

    async def _read_run(self, kvstore: Any, run: list[layout.PackEntry]) -> None:
        start = run[0].offset
        end = run[-1].offset + run[-1].nbytes + layout.CRC_BYTES
        async with self.budget.hold(end - start):
            result = await kvstore.read(run[0].obj, byte_range=slice(start, end))
        if result.state == "missing":
            raise CorruptCheckpointError(
                f"missing data: {self.directory / run[0].obj} does not exist"
            )
        blob = bytes(result.value)
        for entry in run:
            lo = entry.offset - start
            self._packed[(entry.leaf, entry.index)] = self._verified(
                entry, blob[lo : lo + entry.nbytes + layout.CRC_BYTES]
            )

    def _verified(self, entry: layout.PackEntry, blob: bytes) -> bytes:
        data = layout.entry_data(blob, 0, entry.nbytes)
        end = entry.offset + entry.nbytes + layout.CRC_BYTES
        if data is None or len(blob) != entry.nbytes + layout.CRC_BYTES:
            raise CorruptCheckpointError(
                f"checksum mismatch in {self.directory / entry.obj} bytes {entry.offset}-{end}: "
                "the packed data is corrupt"
            )
        return data

    def _open(self, leaf: int) -> Awaitable[Any]:
        if leaf not in self._stores:
            storage = self.saved[leaf].storage
            assert isinstance(storage, _document.ZarrStorage)
            spec = {
                "driver": "zarr3",
                "kvstore": (self.directory / storage.key).kvstore_spec(),
                "metadata": storage.metadata,
                "assume_metadata": True,
                "fill_missing_data_reads": False,
                "recheck_cached_data": False,
            }
            self._stores[leaf] = asyncio.ensure_future(_ts_open(spec, self.context))
        return self._stores[leaf]

    def _packs(self) -> Awaitable[Any]:
        if self._kvstore is None:
            self._kvstore = asyncio.ensure_future(
                ts.KvStore.open(self.directory.kvstore_spec(), context=self.context)
            )
        return self._kvstore

    async def region(self, leaf: int, index: layout.Index) -> np.ndarray:
        """The saved values of ``leaf`` over ``index``, as a host array of the saved dtype."""
        info = self.saved[leaf]
        dtype = info.dtype
        assert dtype is not None
        shape = layout.index_shape(index)
        storage = info.storage
        if isinstance(storage, _document.EmptyStorage) or math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        if isinstance(storage, _document.PackedStorage):
            return await self._packed_region(leaf, index, dtype)
        store = await self._open(leaf)
        nbytes = math.prod(shape) * dtype.itemsize
        async with self.budget.hold(nbytes):
            try:
                data = await store[layout.index_slices(index)].read()
            except Exception as exc:
                where = self._array_location(leaf)
                raise _storage_error(exc, {"kvstore": where.kvstore_spec()}) from exc
        return data if data.dtype == dtype else data.view(dtype)

    def _array_location(self, leaf: int) -> StoragePath:
        """Where the array of ``leaf`` is stored (named in errors)."""
        storage = self.saved[leaf].storage
        assert isinstance(storage, _document.ZarrStorage)
        return self.directory / storage.key

    async def _packed_region(self, leaf: int, index: layout.Index, dtype: np.dtype) -> np.ndarray:
        await self.prefetch_packed([(leaf, [index])])  # no request for entries already read
        out = np.empty(layout.index_shape(index), dtype)
        covered = 0
        storage = self.saved[leaf].storage
        assert isinstance(storage, _document.PackedStorage)
        for entry in storage.entries:  # they tile the leaf (checked by parse_pytree)
            overlap = _overlap(entry.index, index)
            if overlap is None:
                continue
            data = self._packed[(leaf, entry.index)]
            piece = np.frombuffer(data, dtype).reshape(layout.index_shape(entry.index))
            src = tuple(
                slice(a - s, b - s) for (a, b), (s, _) in zip(overlap, entry.index, strict=True)
            )
            dst = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(overlap, index, strict=True))
            out[dst] = piece[src]
            covered += math.prod(layout.index_shape(overlap))
        if covered != out.size:
            raise CorruptCheckpointError(
                f"packed data of leaf {self.saved[leaf].path} in {self.directory} does not cover "
                "the requested region; the pytree metadata is corrupt"
            )
        return out

    async def leaf_to_host(self, leaf: int) -> Any:
        """A leaf as saved, on the host (numpy array, numpy scalar, Python scalar, str)."""
        info = self.saved[leaf]
        if info.kind == "str":
            return info.value
        value = await self.region(leaf, layout.full_index(info.shape))
        if keys.is_key_leaf(info):
            return keys.wrap_host(info, value)
        return _as_kind(info, value)

    async def leaf_like(self, leaf: int, target: Any) -> Any:
        """A leaf shaped, typed and placed like ``target``."""
        info = self.saved[leaf]
        if info.kind == "str":
            return info.value
        if keys.is_key_leaf(info):
            return await keys.read_like(info, target, lambda index: self.region(leaf, index))
        shape = info.shape
        dtype = np.dtype(target.dtype) if hasattr(target, "dtype") else info.dtype
        sharding = getattr(target, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding):
            value = await self.region(leaf, layout.full_index(shape))
            return _as_kind(info, value.astype(dtype, copy=False))
        indices = sorted(
            {
                layout.normalize_index(idx, shape)
                for idx in sharding.addressable_devices_indices_map(shape).values()
            }
        )
        pieces = await asyncio.gather(*(self.region(leaf, idx) for idx in indices))
        by_index = {
            idx: piece.astype(dtype, copy=False) for idx, piece in zip(indices, pieces, strict=True)
        }
        return jax.make_array_from_callback(
            shape, sharding, lambda idx: by_index[layout.normalize_index(idx, shape)]
        )


def _as_kind(info: Leaf, value: np.ndarray) -> Any:
    kind = info.kind
    if kind == "py":
        return {"bool": bool, "int": int, "float": float, "complex": complex}[str(info.py_type)](
            value.item()
        )
    if kind == "np_scalar":
        return value[()]
    return value


def _overlap(a: layout.Index, b: layout.Index) -> layout.Index | None:
    out = []
    for (a0, a1), (b0, b1) in zip(a, b, strict=True):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


# ---------------------------------------------------------------------------------- args
@register_with_handler(StandardCheckpointHandler, for_save=True)
@dataclass(frozen=True)
class StandardSave(CheckpointArgs):
    """Save a pytree of arrays (any sharding), numpy values, scalars and strings."""

    item: Any


@register_with_handler(StandardCheckpointHandler, for_restore=True)
@dataclass(frozen=True)
class StandardRestore(CheckpointArgs):
    """Restore a pytree.

    Attributes:
        target: None restores every leaf to host numpy values with the saved
            structure. A pytree of ``jax.ShapeDtypeStruct`` (with shardings)
            or arrays restores those leaves only, each straight into its
            sharding.
        strict: When True, a target leaf missing from the checkpoint, or with
            another shape or dtype, raises ``ValueError``. When False, dtypes
            are cast and missing leaves are left as given, with a warning.
    """

    target: Any = None
    strict: bool = True


StandardCheckpointHandler.default_restore_args = StandardRestore
