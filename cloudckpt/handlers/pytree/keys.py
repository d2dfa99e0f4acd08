"""Typed PRNG key arrays (``jax.random.key``): saved as key data, restored as keys.

A typed key array of shape ``S`` and implementation ``impl`` is stored as its
key data (``jax.random.key_data``): a ``uint32`` array of shape ``S + K``,
where ``K`` is the implementation's key shape (``(2,)`` for threefry2x32,
``(4,)`` for rbg and unsafe_rbg). The leaf's ``pytree.json`` entry describes
that key data (dtype, shape, sharding, storage) exactly like any other array
and adds ``"prng_impl": "<name>"``. A reader that ignores ``prng_impl`` sees
plain ``uint32`` key data, so the entry stays readable as an array.

Restoring wraps the data again (``jax.random.wrap_key_data``) as keys of the
recorded implementation, on each device the target's sharding names: the
key data of a device's shard is the shard's logical index plus the whole of
the trailing key dimensions, whatever the sharding type.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any

import jax
import numpy as np

from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format import layout
from cloudckpt.format.pytree import Leaf

#: The field a key leaf adds to its ``pytree.json`` entry.
IMPL_FIELD = "prng_impl"

# Short tags jax prints in key dtypes (``key<fry>``), for tools that show a
# checkpoint without importing jax's PRNG machinery for every name.
_TAGS = {"threefry2x32": "fry", "rbg": "rbg", "unsafe_rbg": "urbg"}


def is_key(value: Any) -> bool:
    """Whether ``value`` (array, ``ShapeDtypeStruct``) has a typed PRNG key dtype."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or isinstance(dtype, np.dtype):  # the common case, without jax's check
        return False
    try:
        return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


def is_key_leaf(info: Leaf) -> bool:
    """Whether a saved leaf holds typed keys."""
    return info.prng_impl is not None


@cache
def _impl_facts(name: str) -> tuple[Any, tuple[int, ...]]:
    """(key dtype, key shape) of a PRNG implementation jax knows, by name."""
    key = jax.eval_shape(lambda: jax.random.key(0, impl=name))
    data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=name)))
    return key.dtype, tuple(data.shape)


def impl_facts(info: Leaf) -> tuple[str, Any, tuple[int, ...]]:
    """(implementation name, key dtype, key shape) of a saved key leaf, validated.

    Raises:
        CorruptCheckpointError: The entry names an implementation this jax does
            not know, or its stored shape and dtype do not fit it.
    """
    name = info.prng_impl
    where = f"leaf {info.path!r}"
    if not isinstance(name, str) or not name:
        raise CorruptCheckpointError(f"{where}: {IMPL_FIELD} must be a name, got {name!r}")
    try:
        dtype, key_shape = _impl_facts(name)
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{where} holds PRNG keys of implementation {name!r}, which this jax does not know; "
            "register it (jax.extend.random.define_prng_impl) or upgrade jax"
        ) from exc
    shape = info.shape
    if (
        info.dtype_name != "uint32"
        or len(shape) < len(key_shape)
        or tuple(shape[len(shape) - len(key_shape) :]) != key_shape
    ):
        raise CorruptCheckpointError(
            f"{where}: {name} keys are stored as uint32 with trailing dims {list(key_shape)}, "
            f"the entry says {info.dtype_name} {list(shape)}; the pytree metadata is corrupt"
        )
    return name, dtype, key_shape


def key_shape_of(info: Leaf) -> tuple[int, ...]:
    """The logical shape of a saved key leaf (its key data's without the key dims)."""
    _, _, key_shape = impl_facts(info)
    shape = info.shape
    return shape[: len(shape) - len(key_shape)]


def dtype_label(name: str) -> str:
    """How jax prints the key dtype of implementation ``name`` (``key<fry>``)."""
    return f"key<{_TAGS.get(name, name)}>"


# ------------------------------------------------------------------------------ save
def impl_name(value: jax.Array) -> str:
    """The implementation name of a typed key array, as ``pytree.json`` records it."""
    return str(jax.random.key_impl(value))


def key_data(value: jax.Array) -> jax.Array:
    """The ``uint32`` key data of a typed key array, sharded like the keys."""
    return jax.random.key_data(value)


# --------------------------------------------------------------------------- restore
def mismatch(path: str, info: Leaf, target: Any) -> tuple[str, str] | None:
    """Why ``target`` cannot receive saved leaf ``info``: (category, text), or None.

    Called when either side holds typed keys. Categories: ``shape``,
    ``kind`` (keys against non-keys, or another implementation).
    """
    if not is_key_leaf(info):
        saved = info.dtype_name or info.kind
        return "kind", (
            f"{path} (saved {saved} data, target PRNG keys {target.dtype}; "
            "raw uint32 keys restore into a uint32 target, then jax.random.wrap_key_data)"
        )
    name, dtype, _ = impl_facts(info)
    label = dtype_label(name)
    if not is_key(target):
        if isinstance(target, str):
            return "kind", f"{path} (saved PRNG keys {label}, target str)"
        if not hasattr(target, "dtype"):
            return None  # a placeholder leaf: restored as saved
        return "kind", (
            f"{path} (saved PRNG keys {label}, target {np.dtype(target.dtype).name}; restore "
            f"into jax.ShapeDtypeStruct(shape, {label} dtype) and call jax.random.key_data after)"
        )
    if target.dtype != dtype:
        return "kind", f"{path} (saved PRNG keys {label}, target {target.dtype})"
    if tuple(target.shape) != key_shape_of(info):
        return "shape", f"{path}: target {tuple(target.shape)} vs saved {key_shape_of(info)}"
    return None


def regions(info: Leaf, target: Any) -> list[layout.Index]:
    """The key-data regions this process reads for ``target`` (None: all of it).

    Validates the entry first, so a corrupt one is reported before any data is read.
    """
    impl_facts(info)
    data_shape = info.shape
    sharding = getattr(target, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
        return [layout.full_index(data_shape)]
    return sorted(set(_device_regions(info, sharding).values()))


def _device_regions(info: Leaf, sharding: Any) -> dict[Any, layout.Index]:
    """Per addressable device, the region of key data its shard of the keys holds."""
    data_shape = info.shape
    shape = key_shape_of(info)
    tail = tuple((0, n) for n in data_shape[len(shape) :])
    return {
        device: layout.normalize_index(idx, shape) + tail
        for device, idx in sharding.addressable_devices_indices_map(shape).items()
    }


def wrap_host(info: Leaf, data: np.ndarray) -> jax.Array:
    """Host key data as a typed key array of the saved implementation."""
    name, _, _ = impl_facts(info)
    return jax.random.wrap_key_data(data, impl=name)


async def read_like(
    info: Leaf,
    target: Any,
    region: Callable[[layout.Index], Awaitable[np.ndarray]],
) -> jax.Array:
    """Saved keys placed like ``target``, each device's shard read by ``region``."""
    name, _, _ = impl_facts(info)
    data_shape = info.shape
    sharding = getattr(target, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
        return jax.random.wrap_key_data(await region(layout.full_index(data_shape)), impl=name)
    by_device = _device_regions(info, sharding)
    wanted = sorted(set(by_device.values()))
    pieces = dict(zip(wanted, await asyncio.gather(*(region(r) for r in wanted)), strict=True))
    shape = key_shape_of(info)
    if isinstance(sharding, jax.sharding.NamedSharding):
        # One global array of key data and one wrap: no per-device dispatch or compile.
        spec = (*sharding.spec, *[None] * (len(data_shape) - len(sharding.spec)))
        physical = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*spec), memory_kind=sharding.memory_kind
        )
        data = jax.make_array_from_callback(
            data_shape, physical, lambda idx: pieces[layout.normalize_index(idx, data_shape)]
        )
        keys = jax.random.wrap_key_data(data, impl=name)
        if keys.sharding == sharding:
            return keys
        # An equivalent spelling (P() for P(None)): the same buffers under the target's sharding.
        shards = [s.data for s in keys.addressable_shards]
    else:
        shards = [
            jax.random.wrap_key_data(jax.device_put(pieces[r], device), impl=name)
            for device, r in by_device.items()
        ]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def logical_sharding(description: dict[str, Any] | None, ndim: int) -> dict[str, Any] | None:
    """A saved key-data sharding description as the keys' own (trailing key dims dropped)."""
    if description is None or "spec" not in description:
        return description
    return {**description, "spec": list(description["spec"])[:ndim]}
