"""The pytrees the benchmarks save: a model-like sharded state and trees of many small leaves.

The main tree mimics a training state on a 4x2 ``("data", "model")`` mesh of
8 CPU devices: fully sharded weights, partially replicated embeddings and
heads, a few fully replicated arrays, and small leaves (biases, scalars) that
end up packed. Array contents are random, so nothing compresses or is skipped
as fill value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MiB = 1 << 20

#: (name, share of the tree's bytes, partition spec) of the large arrays, per layer.
_LAYER_ARRAYS: tuple[tuple[str, float, P], ...] = (
    ("w_in", 0.40, P("data", "model")),  # fully sharded: 8 distinct shards
    ("w_out", 0.25, P("model", "data")),  # fully sharded, the other way round
    ("w_proj", 0.20, P("data", None)),  # 4 shards, each held by 2 devices
)
_TOP_ARRAYS: tuple[tuple[str, float, P], ...] = (
    ("head", 0.12, P(None, "model")),  # 2 shards, each held by 4 devices
    ("norm", 0.03, P()),  # replicated on all 8 devices
)
N_LAYERS = 4
N_SMALL = 64  # biases of a few KB each, replicated
SMALL_ELEMS = 1024


def make_mesh() -> Mesh:
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    return Mesh(devices, ("data", "model"))


def _shape_for(nbytes: float, cols: int = 1024, multiple: int = 256) -> tuple[int, int]:
    """A float32 (rows, cols) shape of about ``nbytes``, rows a multiple of ``multiple``.

    Model dimensions are usually multiples of large powers of two; the
    ``awkward_shapes`` probe in ``scaling.py`` covers dimensions that are not.
    """
    rows = max(multiple, round(nbytes / (4 * cols) / multiple) * multiple)
    return rows, cols


def random_array(shape: tuple[int, ...], sharding: NamedSharding, seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    cache: dict[tuple[Any, ...], np.ndarray] = {}

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:  # replicas of one shard share the random draw
            local = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))
            cache[key] = rng.random(local, dtype=np.float32)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, shard)


@dataclass(frozen=True)
class LeafSpec:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    spec: P | None  # None: a host numpy value


def model_specs(total_mib: float) -> list[LeafSpec]:
    """The leaves of a model-like state of about ``total_mib`` MiB."""
    total = total_mib * MiB
    out: list[LeafSpec] = []
    for layer in range(N_LAYERS):
        for name, share, spec in _LAYER_ARRAYS:
            out.append(
                LeafSpec(
                    ("params", f"layer_{layer}", name), _shape_for(total * share / N_LAYERS), spec
                )
            )
    for name, share, spec in _TOP_ARRAYS:
        out.append(LeafSpec(("params", name), _shape_for(total * share), spec))
    for i in range(N_SMALL):
        out.append(LeafSpec(("params", "bias", f"b{i:03d}"), (SMALL_ELEMS,), P()))
    out.append(LeafSpec(("opt", "count"), (), None))
    out.append(LeafSpec(("opt", "learning_rate"), (), None))
    return out


def build(specs: list[LeafSpec], mesh: Mesh) -> dict[str, Any]:
    """Materialises ``specs`` as a nested dict of jax arrays (and host scalars)."""
    tree: dict[str, Any] = {}
    for i, leaf in enumerate(specs):
        if leaf.spec is None:
            value: Any = np.asarray(i, np.int64) if "count" in leaf.path[-1] else np.float32(3e-4)
        else:
            value = random_array(leaf.shape, NamedSharding(mesh, leaf.spec), seed=i)
        node = tree
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = value
    return tree


def model_tree(total_mib: float, mesh: Mesh) -> dict[str, Any]:
    return build(model_specs(total_mib), mesh)


def many_leaves_tree(n_leaves: int, total_bytes: int, mesh: Mesh) -> dict[str, Any]:
    """``n_leaves`` replicated float32 vectors sharing ``total_bytes``, 100 per sub-dict."""
    elems = max(1, total_bytes // (4 * n_leaves))
    sharding = NamedSharding(mesh, P())
    host = np.random.default_rng(0).random(elems, dtype=np.float32)
    tree: dict[str, Any] = {}
    for i in range(n_leaves):
        group = tree.setdefault(f"g{i // 100:03d}", {})
        group[f"x{i % 100:02d}"] = jax.device_put(host, sharding)
    return tree


def tree_nbytes(tree: Any) -> int:
    """Logical bytes of the tree (each array once, however replicated)."""
    return sum(
        math.prod(np.shape(x)) * np.dtype(getattr(x, "dtype", np.float64)).itemsize
        for x in jax.tree_util.tree_leaves(tree)
    )


def abstract_target(tree: Any) -> Any:
    """ShapeDtypeStructs with the same shardings (host values: without a sharding)."""

    def one(x: Any) -> Any:
        sharding = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(one, tree)


def abstract_from_specs(specs: list[LeafSpec], mesh: Mesh) -> dict[str, Any]:
    """What :func:`abstract_target` gives for ``build(specs, mesh)``, without building it."""
    tree: dict[str, Any] = {}
    for leaf in specs:
        if leaf.spec is None:
            dtype = np.int64 if "count" in leaf.path[-1] else np.float32
            value = jax.ShapeDtypeStruct((), dtype, sharding=None)
        else:
            value = jax.ShapeDtypeStruct(
                leaf.shape, np.float32, sharding=NamedSharding(mesh, leaf.spec)
            )
        node = tree
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = value
    return tree


def replica0_copy(tree: Any) -> list[np.ndarray]:
    """A plain device-to-host copy of every replica-0 shard: the bytes a save must copy."""
    shards = [
        s.data
        for x in jax.tree_util.tree_leaves(tree)
        if isinstance(x, jax.Array)
        for s in x.addressable_shards
        if s.replica_id == 0
    ]
    for data in shards:
        data.copy_to_host_async()
    return [np.array(data, copy=True) for data in shards]


def device_get_copy(tree: Any) -> Any:
    """``jax.device_get`` of the whole tree (assembles each array on the host)."""
    return jax.device_get(tree)


def all_leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)


def jax_leaves(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]
