"""Reading Orbax pytree items (standard and PyTree handlers) with tensorstore.

Orbax's ``_METADATA`` names every leaf by its key path; the leaf's array is
the tensorstore array ``<param>`` (keys joined with ``.``), zarr v2 or zarr v3
(``use_zarr3``), either as a directory ``<item>/<param>/`` or, on OCDBT, as
key ``<param>`` of the OCDBT database whose root is the item directory
(``manifest.ocdbt``; its data files under ``d/`` and ``ocdbt.process_<i>/d/``,
all referenced from the root manifest once Orbax has merged them). Strings
live in ``<item>/_strings.json``. The tree is translated into the same
:class:`~cloudckpt.format.pytree.Leaf` records cloudckpt's own
pytree handler uses, so matching a target, ``strict``, partial restores and
reading straight into another sharding behave the same. The records are built
here, from Orbax's metadata and each array's zarr metadata, never through
``parse_pytree``: that validator accepts only what cloudckpt writes and stays
as strict as it is. An Orbax leaf has no cloudckpt ``storage``; the reader
addresses its array by the leaf's Orbax name instead.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format.pytree import MAX_NBYTES, MAX_NDIM, Leaf
from cloudckpt.handlers.pytree import StandardRestore
from cloudckpt.handlers.pytree.budget import ByteBudget
from cloudckpt.handlers.pytree.match import match_targets
from cloudckpt.handlers.pytree.read import Reader, leaf_metadata, ts_open
from cloudckpt.handlers.pytree.tree import flatten, rebuild, unflatten_like
from cloudckpt.orbax._layout import PYTREE_METADATA, UnsupportedOrbaxLayoutError
from cloudckpt.storage.path import StoragePath

#: JSON documents larger than this are refused before parsing (untrusted sizes).
MAX_JSON_BYTES = 256 << 20
STRINGS_FILE = "_strings.json"
_ARRAY_TYPES = {"jax.Array": "jax", "np.ndarray": "ndarray", "scalar": "py"}
_EMPTY = {
    "None": {"none": True},
    "Dict": {"dict": []},
    "List": {"list": []},
    "Tuple": {"tuple": []},
    "NamedTuple": {"dict": []},
}
_SEQUENCE, _DICT = 1, 2


async def read_json(location: StoragePath, what: str) -> Any:
    """A plain (Orbax) JSON object; FileNotFoundError when absent."""
    data = await location.backend.get(location.path)
    if data is None:
        raise FileNotFoundError(f"{what} is missing: {location} does not exist")
    if len(data) > MAX_JSON_BYTES:
        raise CorruptCheckpointError(f"{location} is {len(data)} bytes; refusing to parse {what}")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{what} at {location} is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class OrbaxEntry:
    """One leaf as Orbax's ``_METADATA`` names it, before its array is opened.

    Attributes:
        path: ``jax.tree_util.keystr`` of the leaf (what targets are matched by).
        name: Orbax's parameter name (keys joined with ``.``): the array's key.
        kind: ``jax``, ``ndarray``, ``py`` or ``str`` (cloudckpt's leaf kinds).
        value: The string of a ``str`` leaf.
    """

    path: str
    name: str
    kind: str
    value: str | None = None


@dataclass
class OrbaxTree:
    """An Orbax pytree item: its entries and, once described, cloudckpt leaf records.

    ``leaves[i]`` is the :class:`Leaf` of ``entries[i]``; it is empty until
    :meth:`_OrbaxReader.describe` has read every array's zarr metadata.
    """

    item: StoragePath
    skeleton: dict[str, Any]
    entries: list[OrbaxEntry]
    use_ocdbt: bool
    use_zarr3: bool
    fill_missing: bool
    leaves: tuple[Leaf, ...] = field(default=())

    def spec(self, leaf: int) -> dict[str, Any]:
        name = self.entries[leaf].name
        if self.use_ocdbt:
            kvstore = {"driver": "ocdbt", "base": self.item.kvstore_spec(), "path": name}
        else:
            kvstore = (self.item / name).kvstore_spec()
        return {
            "driver": "zarr3" if self.use_zarr3 else "zarr",
            "kvstore": kvstore,
            "open": True,
            # Orbax < 0.11 skipped chunks equal to the fill value; later ones store them all.
            "fill_missing_data_reads": self.fill_missing,
            "recheck_cached_data": False,
        }


_SEQUENCE_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


def _param_name(keys: list[Any], where: StoragePath) -> tuple[str, list[tuple[int, str]]]:
    if not isinstance(keys, list) or not keys:
        raise CorruptCheckpointError(f"{where}: a leaf has no key_metadata")
    parts = []
    for k in keys:
        key, kind = (k.get("key"), k.get("key_type")) if isinstance(k, dict) else (None, None)
        if not isinstance(key, str) or kind not in (_SEQUENCE, _DICT):
            raise CorruptCheckpointError(f"{where}: malformed key_metadata entry {k!r}")
        if kind == _SEQUENCE and not _SEQUENCE_INDEX.fullmatch(key):
            # Canonical ASCII only: "²" passes isdigit() and "01" would alias "1".
            raise CorruptCheckpointError(
                f"{where}: sequence index {key!r} is not a plain number; the Orbax metadata is "
                "corrupt, restore another step"
            )
        if (
            not key
            or "/" in key
            or "\\" in key
            or key in (".", "..")
            or any(ord(c) < 32 for c in key)
        ):
            raise UnsupportedOrbaxLayoutError(
                f"{where}: the key {key!r} cannot name a stored array safely (it is empty or "
                "contains a path separator); cloudckpt does not read such Orbax trees"
            )
        parts.append((kind, key))
    return ".".join(key for _, key in parts), parts


def _keystr(parts: list[tuple[int, str]]) -> str:
    return "".join(f"[{key}]" if kind == _SEQUENCE else f"[{key!r}]" for kind, key in parts)


class _Node:
    def __init__(self) -> None:
        self.kind: int | None = None
        self.children: dict[str, Any] = {}


def _skeleton(node: Any, where: StoragePath) -> dict[str, Any]:
    if not isinstance(node, _Node):
        return node
    if node.kind == _SEQUENCE:
        n = max(int(k) for k in node.children) + 1
        if n > 10 * len(node.children) + 1000:
            raise CorruptCheckpointError(
                f"{where}: a sequence index is implausibly large; the Orbax metadata is corrupt, "
                "restore another step"
            )
        return {
            "list": [
                _skeleton(node.children[str(i)], where)
                if str(i) in node.children
                else {"none": True}
                for i in range(n)
            ]
        }
    return {"dict": [[k, _skeleton(v, where)] for k, v in node.children.items()]}


async def read_tree(item: StoragePath) -> OrbaxTree:
    """Parses ``<item>/_METADATA`` (one read, plus _strings.json when the tree has strings)."""
    meta = await read_json(item / PYTREE_METADATA, "the Orbax pytree metadata")
    tree_meta = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree_meta, dict):
        raise UnsupportedOrbaxLayoutError(
            f"{item / PYTREE_METADATA} has no 'tree_metadata': an Orbax metadata version "
            "cloudckpt does not read (Orbax before 0.5)"
        )
    root = _Node()
    leaves: list[OrbaxEntry] = []
    strings: dict[int, str] = {}
    for entry in tree_meta.values():
        if not isinstance(entry, dict) or not isinstance(entry.get("value_metadata"), dict):
            raise CorruptCheckpointError(f"{item / PYTREE_METADATA}: malformed tree entry")
        name, parts = _param_name(entry.get("key_metadata"), item / PYTREE_METADATA)
        value = entry["value_metadata"]
        vtype = value.get("value_type")
        if value.get("skip_deserialize"):
            raise UnsupportedOrbaxLayoutError(
                f"{item}: leaf {name!r} was saved with skip_deserialize (aggregated into a msgpack "
                "file); cloudckpt does not read Orbax msgpack aggregates"
            )
        if vtype in _EMPTY:
            leaf_node: Any = _EMPTY[vtype]
        elif vtype in _ARRAY_TYPES or vtype == "string":
            leaf_node = {"leaf": len(leaves)}
            if vtype == "string":
                strings[len(leaves)] = name
            kind = "str" if vtype == "string" else _ARRAY_TYPES[vtype]
            leaves.append(OrbaxEntry(_keystr(parts), name, kind))
        else:
            raise UnsupportedOrbaxLayoutError(
                f"{item}: leaf {name!r} has Orbax value type {vtype!r}; cloudckpt reads "
                f"{[*sorted(_ARRAY_TYPES), 'string']} and empty containers"
            )
        node = root
        for depth, (kind, key) in enumerate(parts):
            if node.kind not in (None, kind):
                raise CorruptCheckpointError(f"{item}: {name!r} mixes sequence and dict keys")
            node.kind = kind
            if depth == len(parts) - 1:
                node.children[key] = leaf_node
            else:
                node = node.children.setdefault(key, _Node())
                if not isinstance(node, _Node):
                    raise CorruptCheckpointError(f"{item}: {name!r} lies under a leaf")
    if strings:
        table = await read_json(item / STRINGS_FILE, "the Orbax string leaves")
        for i, name in strings.items():
            value = table.get(name) if isinstance(table, dict) else None
            if not isinstance(value, str):
                raise CorruptCheckpointError(f"{item / STRINGS_FILE} lacks {name!r}")
            leaves[i] = OrbaxEntry(leaves[i].path, name, "str", value)
    use_ocdbt = meta.get("use_ocdbt")
    if not isinstance(use_ocdbt, bool):  # Orbax < 0.9 did not record it
        use_ocdbt = await item.backend.exists((item / "manifest.ocdbt").path)
    elif use_ocdbt and not await item.backend.exists((item / "manifest.ocdbt").path):
        raise UnsupportedOrbaxLayoutError(
            f"{item}: OCDBT without a merged root manifest.ocdbt (only per-process "
            "ocdbt.process_* databases); cloudckpt reads merged OCDBT checkpoints"
        )
    return OrbaxTree(
        item=item,
        skeleton=_skeleton(root, item) if tree_meta else {"dict": []},
        entries=leaves,
        use_ocdbt=use_ocdbt,
        use_zarr3=bool(meta.get("use_zarr3", False)),
        fill_missing=not meta.get("store_array_data_equal_to_fill_value", False),
    )


async def gather_all(aws: list[Any]) -> list[Any]:
    """Like ``asyncio.gather``, but settles every awaitable before raising the first error.

    A failed read must not leave sibling reads running when the caller's event
    loop ends (the command line runs one loop per command).
    """
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return list(results)


class _OrbaxReader(Reader):
    """cloudckpt's region reader, opening Orbax's tensorstore arrays by their Orbax names."""

    def __init__(self, tree: OrbaxTree, budget: ByteBudget) -> None:
        super().__init__(tree.item, tree.leaves, budget)
        self.tree = tree

    def _open(self, leaf: int) -> Any:
        if leaf not in self._stores:
            spec = self.tree.spec(leaf)
            self._stores[leaf] = asyncio.ensure_future(ts_open(spec, self.context))
        return self._stores[leaf]

    async def describe(self) -> None:
        """Builds every leaf's record, arrays' dtype and shape from their zarr metadata.

        Reads no array data. Shapes and dtypes come from storage, so they are
        bounded here like ``parse_pytree`` bounds cloudckpt's own.
        """

        async def one(i: int, entry: OrbaxEntry) -> Leaf:
            if entry.kind == "str":
                return Leaf(i, entry.path, "str", value=entry.value)
            store = await self._open(i)
            dtype = np.dtype(store.dtype.numpy_dtype)
            shape = tuple(int(n) for n in store.domain.shape)
            where = f"{self.tree.item}: leaf {entry.name!r}"
            if len(shape) > MAX_NDIM or math.prod(shape) * dtype.itemsize > MAX_NBYTES:
                raise CorruptCheckpointError(
                    f"{where} claims shape {list(shape)}, beyond any array"
                )
            py_type = None
            if entry.kind == "py":
                if shape:
                    raise CorruptCheckpointError(f"{where} is a scalar but not 0-d")
                py_type = {"b": "bool", "i": "int", "u": "int", "c": "complex"}.get(
                    dtype.kind, "float"
                )
            return Leaf(
                i,
                entry.path,
                entry.kind,
                dtype=dtype,
                dtype_name=dtype.name,
                shape=shape,
                py_type=py_type,
            )

        leaves = await gather_all([one(i, e) for i, e in enumerate(self.tree.entries)])
        self.tree.leaves = self.saved = tuple(leaves)

    def _array_location(self, leaf: int) -> StoragePath:
        return self.tree.item / self.tree.entries[leaf].name


async def open_tree(item: StoragePath, max_inflight_bytes: int) -> tuple[OrbaxTree, _OrbaxReader]:
    tree = await read_tree(item)
    reader = _OrbaxReader(tree, ByteBudget(max_inflight_bytes))
    await reader.describe()
    return tree, reader


async def restore(
    item: StoragePath, args: StandardRestore | None, *, max_inflight_bytes: int = 256 << 20
) -> Any:
    """Restores an Orbax pytree item like cloudckpt's StandardCheckpointHandler restores its own."""
    args = args or StandardRestore()
    tree, reader = await open_tree(item, max_inflight_bytes)
    saved = tree.leaves
    if args.target is None:
        values = await gather_all([reader.leaf_to_host(i) for i in range(len(saved))])
        return rebuild(tree.skeleton, values)
    by_path = {leaf.path: i for i, leaf in enumerate(saved)}
    targets, _ = flatten(args.target)
    plan = match_targets(item, targets, saved, by_path, strict=args.strict)
    results = await gather_all([reader.leaf_like(i, t) for i, t in plan.reads])
    values = {path: value for (path, _), value in zip(plan.paths, results, strict=True)}
    values.update(plan.untouched)
    return unflatten_like(args.target, values)


async def metadata(item: StoragePath) -> Any:
    """The tree of ArrayMetadata (strings as themselves); reads no array data."""
    tree, _ = await open_tree(item, 1 << 20)
    return rebuild(tree.skeleton, [leaf_metadata(leaf, []) for leaf in tree.leaves])
