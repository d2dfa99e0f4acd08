"""``pytree.json``: the one writer and the one validating reader of a pytree item's document.

:func:`write_pytree` stores what the save planned; everything a restore, ``cloudckpt inspect`` or ``cloudckpt verify`` learns
about a pytree item comes through :func:`parse_pytree`, which accepts exactly
the shapes the writer produces (docs/FORMAT.md) and refuses anything else with
:class:`~cloudckpt.errors.CorruptCheckpointError` naming the leaf:

* keys stay inside the item and the attempt that wrote it (the document's
  ``attempt``): a zarr leaf ``i`` at ``@<attempt>/arrays/<i>``, pack objects at
  ``@<attempt>/packs/<writer>.<n>`` (canonical decimals; format 1: no ``@<attempt>/``);
* shapes, dtypes, zarr metadata, chunk grids and pack entries agree with each
  other (the zarr metadata must be what the writer derives from the leaf's
  shape, dtype and chunk shapes);
* the packed entries of a leaf tile it exactly (no overlap, no gap), and the
  entries of each pack object lie back to back from offset 0, in leaf order;
* the skeleton uses every leaf once, in order, and nests at most
  :data:`MAX_DEPTH` deep.

A valid document can still claim more data than storage holds.
:func:`cloudckpt.format.backing.backing_problems` compares it with one listing of
the item: every chunk of a zarr leaf must exist with the exact size its metadata implies
(arrays are stored uncompressed), and every pack object must be exactly as
long as its entries. Only then does a reader size an allocation from a shape.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.format import jsonio, layout, packed
from cloudckpt.format.early import read_document
from cloudckpt.format.packed import Refuse as _Refuse
from cloudckpt.format.step import ATTEMPT_NAME as _ATTEMPT
from cloudckpt.format.step import write_object
from cloudckpt.storage.path import StoragePath

#: The document's object, under the item's prefix.
METADATA_NAME = "pytree.json"
#: Newest ``format`` of ``pytree.json`` read, and the one written (2: per-attempt data names;
#: 3: pack grids, :mod:`cloudckpt.format.packed`).
PYTREE_FORMAT = 3
#: Deepest skeleton accepted (``flatten`` recurses too, so deeper trees cannot be saved).
MAX_DEPTH = 512
#: Most dimensions of an array (numpy's own limit is 64).
MAX_NDIM = 64
#: Largest array accepted, in bytes, before any listing is consulted.
MAX_NBYTES = 1 << 60
#: Leaf kinds holding arrays; ``str`` leaves hold their value inline.
ARRAY_KINDS = frozenset({"jax", "ndarray", "np_scalar", "py"})
#: What a ``prng_impl`` may look like (jax's names: threefry2x32, rbg, unsafe_rbg, ...).
_IMPL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: ``py_type`` of a Python scalar leaf and the dtype the writer stores it as.
PY_TYPES = {"bool": "bool", "int": "int64", "float": "float64", "complex": "complex128"}


# ------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ZarrStorage:
    """A leaf stored as a zarr v3 array at ``key`` (``@<attempt>/arrays/<leaf>``), uncompressed."""

    key: str
    metadata: dict[str, Any]
    stored: np.dtype
    chunk: tuple[int, ...]
    inner: tuple[int, ...]
    grid: tuple[int, ...]

    @property
    def n_chunks(self) -> int:
        return math.prod(self.grid)

    @property
    def object_bytes(self) -> int:
        """The exact size of every chunk object: its bytes, crc32c and shard index."""
        return layout.chunk_object_bytes(self.chunk, self.inner, self.stored.itemsize)

    def chunk_key(self, position: tuple[int, ...]) -> str:
        """The object of the chunk at grid ``position``, relative to the item."""
        return "/".join([self.key, "c", *map(str, position)])

    def chunk_keys(self) -> Iterable[tuple[tuple[int, ...], str]]:
        for position in itertools.product(*(range(n) for n in self.grid)):
            yield position, self.chunk_key(position)


@dataclass(frozen=True)
class PackedStorage:
    """A leaf stored as entries of pack objects, tiling the leaf exactly.

    Listed entry by entry (``listed``), or as a grid of cells (format 3) whose
    entries are located on demand: a pod-sized leaf has thousands.
    """

    listed: tuple[layout.PackEntry, ...] = ()
    grid: packed.PackGrid | None = None

    @property
    def entries(self) -> tuple[layout.PackEntry, ...]:
        """Every entry (for a grid, built here: as many as the leaf has cells)."""
        return self.grid.entries() if self.grid is not None else self.listed

    def overlapping(self, region: layout.Index) -> list[layout.PackEntry]:
        """The entries sharing data with ``region`` of the leaf."""
        if self.grid is not None:
            return list(self.grid.entries(self.grid.cells_overlapping(region)))
        return [e for e in self.listed if layout.overlap(e.index, region) is not None]

    def objects(self) -> set[str]:
        """The pack objects holding the leaf."""
        if self.grid is None:
            return {e.obj for e in self.listed}
        g = self.grid
        return {
            f"{g.prefix}packs/{w}.{int(g.runs[k, 4])}"
            for k in range(len(g.runs))
            for w in range(int(g.runs[k, 0]), int(g.runs[k, 0] + g.runs[k, 1]))
        }


@dataclass(frozen=True)
class EmptyStorage:
    """A zero-size array: no bytes stored."""


Storage = ZarrStorage | PackedStorage | EmptyStorage


@dataclass(frozen=True)
class Leaf:
    """One validated leaf record of ``pytree.json``.

    Attributes:
        number: Its index in the document's ``leaves``.
        path: ``jax.tree_util.keystr`` of the leaf when saved.
        kind: ``str`` or one of :data:`ARRAY_KINDS`.
        value: The string of a ``str`` leaf (None otherwise).
        dtype: The array's numpy dtype (None for ``str``).
        dtype_name: The dtype's name as stored.
        shape: The array's global shape (``()`` for ``str``).
        sharding: Index into the document's ``shardings``, or None.
        py_type: ``bool``/``int``/``float``/``complex`` for ``py`` leaves.
        storage: Where the bytes are (None for ``str``).
        prng_impl: For typed PRNG keys, the implementation whose key data this
            ``uint32`` array is (checked against jax's implementations where
            the keys are rebuilt, see ``_keys``); None otherwise.
    """

    number: int
    path: str
    kind: str
    value: str | None = None
    dtype: np.dtype | None = None
    dtype_name: str = ""
    shape: tuple[int, ...] = ()
    sharding: int | None = None
    py_type: str | None = None
    storage: Storage | None = None
    prng_impl: str | None = None

    @property
    def nbytes(self) -> int:
        if self.dtype is None:
            return len((self.value or "").encode())
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PytreeDocument:
    """A validated ``pytree.json`` payload."""

    format: int
    skeleton: dict[str, Any]
    shardings: list[dict[str, Any] | None]
    leaves: tuple[Leaf, ...]
    #: Exact size of every pack object, from its entries.
    pack_sizes: dict[str, int]
    #: The attempt that wrote the item, whose ``@<attempt>/`` starts every data key (None: format 1).
    attempt: str | None = None


# ------------------------------------------------------------------------- reading, writing
async def write_pytree(
    directory: StoragePath,
    skeleton: dict[str, Any],
    shardings: list[dict[str, Any] | None],
    leaves: list[dict[str, Any]],
    *,
    attempt: str,
    placements: list[list[int]],
) -> None:
    """Writes the item's ``pytree.json`` (create-only where there is no atomic rename).

    ``leaves`` are the leaf records as docs/FORMAT.md gives them (the save's
    plan builds them, packed leaves through :func:`packed.encode_packed`, whose grids
    index ``placements``), every data key under ``@<attempt>/``: the document records
    ``attempt``; readers accept no other.
    """
    if not _ATTEMPT.fullmatch(attempt):
        raise ValueError(f"cannot write pytree.json: {attempt!r} is not an attempt id")
    document = {
        "format": PYTREE_FORMAT,
        "attempt": attempt,
        "skeleton": skeleton,
        "shardings": shardings,
        "placements": placements,
        "leaves": leaves,
    }
    await write_object(directory / METADATA_NAME, jsonio.dumps(document, what="pytree metadata"))


async def read_pytree(directory: StoragePath) -> PytreeDocument:
    """Reads, checksums and validates the ``pytree.json`` of the item at ``directory``.

    Raises:
        FileNotFoundError: the item has no ``pytree.json``.
        CorruptCheckpointError: as :func:`parse_pytree`, or a checksum mismatch.
    """
    document = await read_document(directory / METADATA_NAME, parse_pytree)
    if document is None:
        raise FileNotFoundError(f"no pytree at {directory} ({METADATA_NAME} is missing)")
    return document


# ------------------------------------------------------------------------------- parsing
def _int(value: Any, what: str, *, low: int = 0, high: int = 1 << 62) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _Refuse(f"{what} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if type(value) is not list:
        raise _Refuse(f"{what} must be a list, got {_short(value)}")
    return value


def _dict(value: Any, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise _Refuse(f"{what} must be an object, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.lru_cache(maxsize=256)
def _known_dtype(name: str) -> np.dtype:
    return _dtype_uncached(name)


def _dtype(name: Any) -> np.dtype:
    if type(name) is not str or len(name) > 32:
        raise _Refuse(f"dtype must be a numeric dtype name, got {_short(name)}")
    return _known_dtype(name)  # trees repeat a few dtypes many times


def _dtype_uncached(name: str) -> np.dtype:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
        raise _Refuse(f"dtype must be a numeric dtype name, got {_short(name)}")
    try:
        dtype = np.dtype(name)
    except TypeError:
        import ml_dtypes

        found = getattr(ml_dtypes, name, None)
        if not isinstance(found, type):
            raise _Refuse(f"unknown dtype {name!r}") from None
        dtype = np.dtype(found)
    ml = dtype.type.__module__.startswith("ml_dtypes")
    if dtype.name != name or not (dtype.kind in "biufc" or ml) or dtype.itemsize == 0:
        raise _Refuse(f"dtype {name!r} is not a numeric dtype the writer stores")
    return dtype


def _shape(value: Any, what: str) -> tuple[int, ...]:
    dims = _list(value, what)
    if len(dims) > MAX_NDIM:
        raise _Refuse(f"{what} has {len(dims)} dimensions, more than {MAX_NDIM}")
    return tuple(_int(n, f"{what} dimension", high=1 << 48) for n in dims)


def parse_pytree(payload: Any, *, where: str) -> PytreeDocument:
    """Validates a ``pytree.json`` payload (already checksum-verified) and types it.

    Raises:
        CorruptCheckpointError: the document is not one the writer produces;
            the message names ``where`` and the leaf.
        ValueError: the document is from a newer format (upgrade cloudckpt).
    """
    if type(payload) is not dict:
        raise CorruptCheckpointError(f"{where} is not a pytree document; restore another step")
    version = payload.get("format")
    if type(version) is int and version > PYTREE_FORMAT:
        raise ValueError(f"{where} was written by a newer cloudckpt; upgrade to read it")
    try:
        _int(version, "format", low=1, high=PYTREE_FORMAT)
        attempt = payload.get("attempt")
        if version == 1 and attempt is not None:
            raise _Refuse("a format 1 document has no attempt")
        if version > 1 and (type(attempt) is not str or not _ATTEMPT.fullmatch(attempt)):
            raise _Refuse(f"attempt must be an attempt id, got {_short(attempt)}")
        prefix = f"@{attempt}/" if version > 1 else ""
        shardings = _list(payload.get("shardings"), "shardings")
        for s in shardings:
            _check_sharding(s)
        raw_leaves = _list(payload.get("leaves"), "leaves")
        pack_sizes: dict[str, int] = {}
        grids = _Grids(version, payload.get("placements"), prefix)
        leaves = tuple(
            _leaf(i, raw, len(shardings), pack_sizes, prefix, grids)
            for i, raw in enumerate(raw_leaves)
        )
        if grids.rows is not None:
            pack_sizes = grids.rows.sizes(prefix)
        skeleton = _dict(payload.get("skeleton"), "skeleton")
        _check_skeleton(skeleton, len(leaves))
    except _Refuse as exc:
        raise CorruptCheckpointError(
            f"{where} is corrupt: {exc}. It is not what cloudckpt writes; restore another step"
        ) from None
    return PytreeDocument(version, skeleton, shardings, leaves, pack_sizes, attempt)


def _check_sharding(s: Any) -> None:
    """A sharding description as the writer makes it (shown to humans, never acted on)."""
    if s is None:
        return
    s = _dict(s, "a sharding")
    if s.get("type") == "NamedSharding" and set(s) == {"type", "mesh", "spec"}:
        mesh = _dict(s["mesh"], "a sharding's mesh")
        if all(type(k) is str and type(v) is int for k, v in mesh.items()):
            spec = _list(s["spec"], "a sharding's spec")
            if all(
                p is None or type(p) is str or (type(p) is list and all(type(a) is str for a in p))
                for p in spec
            ):
                return
    elif (
        type(s.get("type")) is str
        and set(s) == {"type", "num_devices"}
        and type(s["num_devices"]) is int
    ):
        return
    raise _Refuse(f"sharding {_short(s)} is not a sharding description")


class _Grids:
    """Format 3's document-wide packing state: its placements, and every entry's span."""

    def __init__(self, version: int, raw: Any, prefix: str) -> None:
        self.version = version
        if version < 3 and raw is not None:
            raise _Refuse(f"a format {version} document has no placements")
        self.placements = packed.parse_placements(raw) if version >= 3 else []
        self.rows = packed.PackRows() if version >= 3 else None


def _leaf(
    i: int, raw: Any, n_shardings: int, pack_sizes: dict[str, int], prefix: str, grids: _Grids
) -> Leaf:
    try:
        raw = _dict(raw, "the record")
        path = raw.get("path")
        if type(path) is not str:
            raise _Refuse(f"path must be a string, got {_short(path)}")
        kind = raw.get("kind")
        if kind == "str":
            value = raw.get("value")
            if type(value) is not str:
                raise _Refuse(f"value must be a string, got {_short(value)}")
            return Leaf(i, path, "str", value=value)
        if type(kind) is not str or kind not in ARRAY_KINDS:
            raise _Refuse(f"unknown kind {_short(kind)}")
        dtype = _dtype(raw.get("dtype"))
        name = raw["dtype"]  # the dtype's canonical name (checked): dtype.name is slow
        shape = _shape(raw.get("shape"), "shape")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > MAX_NBYTES:
            raise _Refuse(f"shape {list(shape)} of {name} is {nbytes} bytes, beyond any array")
        sharding = raw.get("sharding")
        if sharding is not None:
            _int(sharding, "sharding", high=n_shardings - 1)
        py_type = None
        if kind == "py":
            py_type = raw.get("py_type")
            if type(py_type) is not str or PY_TYPES.get(py_type) != name:
                raise _Refuse(f"py_type {_short(py_type)} does not go with dtype {name}")
        if kind in ("py", "np_scalar") and shape != ():
            raise _Refuse(f"a {kind} leaf has shape (), not {list(shape)}")
        prng_impl = raw.get("prng_impl")
        if prng_impl is not None and (
            kind != "jax" or type(prng_impl) is not str or not _IMPL_NAME.fullmatch(prng_impl)
        ):
            raise _Refuse(f"prng_impl {_short(prng_impl)} is not a key implementation name")
        storage = _storage(i, raw.get("storage"), shape, dtype, nbytes, pack_sizes, prefix, grids)
        return Leaf(i, path, kind, None, dtype, name, shape, sharding, py_type, storage, prng_impl)
    except _Refuse as exc:
        path = raw.get("path") if type(raw) is dict else None
        raise _Refuse(f"leaf {i} ({_short(path)}): {exc}") from None


def _storage(
    i: int,
    raw: Any,
    shape: tuple[int, ...],
    dtype: np.dtype,
    nbytes: int,
    sizes: dict[str, int],
    prefix: str,
    grids: _Grids,
) -> Storage:
    raw = _dict(raw, "storage")
    kind = raw.get("type")
    if (kind == "empty") != (nbytes == 0):
        raise _Refuse(f"storage {_short(kind)} does not fit an array of {nbytes} bytes")
    if kind == "empty":
        return EmptyStorage()
    if kind == "packed":
        if grids.rows is not None and "cell" in raw:
            grid = packed.parse_grid(
                i, raw, shape, dtype.itemsize, grids.placements, grids.rows, prefix
            )
            return PackedStorage(grid=grid)
        if set(raw) != {"type", "entries"}:
            raise _Refuse(f"packed storage has type and entries, got {sorted(raw)}")
        listed = packed.parse_entries(
            i, raw["entries"], shape, dtype.itemsize, prefix, grids.rows, sizes
        )
        return PackedStorage(listed)
    if kind == "zarr":
        if (key := raw.get("key")) != f"{prefix}arrays/{i}":
            raise _Refuse(f"zarr key must be '{prefix}arrays/{i}', got {_short(key)}")
        return _zarr(key, raw.get("metadata"), shape, dtype)
    raise _Refuse(f"unknown storage type {_short(kind)}")


def _zarr(key: str, raw: Any, shape: tuple[int, ...], dtype: np.dtype) -> ZarrStorage:
    meta = _dict(raw, "zarr metadata")
    if not shape:
        raise _Refuse("zarr storage for a zero-dimensional array")
    chunk = _shape(
        _dict(_dict(meta.get("chunk_grid"), "chunk_grid").get("configuration"), "chunk_grid").get(
            "chunk_shape"
        ),
        "chunk_shape",
    )
    inner = chunk
    codecs = _list(meta.get("codecs"), "codecs")
    if codecs and type(codecs[0]) is dict and codecs[0].get("name") == "sharding_indexed":
        config = _dict(codecs[0].get("configuration"), "sharding configuration")
        inner = _shape(config.get("chunk_shape"), "inner chunk_shape")
    if len(chunk) != len(shape) or len(inner) != len(shape):
        raise _Refuse(f"chunk shapes {list(chunk)}/{list(inner)} do not match shape {list(shape)}")
    for n, c, j in zip(shape, chunk, inner, strict=True):
        if not (0 < j <= c <= n and n % c == 0 and c % j == 0):
            raise _Refuse(
                f"chunk shapes {list(chunk)}/{list(inner)} do not divide shape {list(shape)}"
            )
    stored = layout.storage_dtype(dtype)
    if meta != layout.zarr_metadata(shape, stored, list(chunk), list(inner)):
        raise _Refuse(
            f"zarr metadata is not what the writer derives for shape {list(shape)}, "
            f"dtype {dtype.name} and chunks {list(chunk)}/{list(inner)}"
        )
    grid = tuple(n // c for n, c in zip(shape, chunk, strict=True))
    return ZarrStorage(key, meta, stored, chunk, inner, grid)


def _check_skeleton(skeleton: dict[str, Any], n_leaves: int) -> None:
    """The skeleton nests well-formed nodes and uses leaves 0..n-1 once each, in order."""
    expected = 0
    stack: list[tuple[Any, int]] = [(skeleton, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _Refuse(f"skeleton nests deeper than {MAX_DEPTH}")
        if type(node) is not dict or len(node) not in (1, 2):
            raise _Refuse(f"skeleton node {_short(node)} is not a node")
        children: list[Any]
        if set(node) == {"leaf"}:
            if node["leaf"] != expected or type(node["leaf"]) is not int:
                raise _Refuse(f"skeleton uses leaf {_short(node['leaf'])} where {expected} is next")
            expected += 1
            continue
        if set(node) == {"none"}:
            if node["none"] is not True:
                raise _Refuse(f"skeleton node {_short(node)} is not a node")
            continue
        if set(node) in ({"list"}, {"tuple"}):
            children = _list(next(iter(node.values())), "skeleton sequence")
        elif set(node) in ({"dict"}, {"node", "children"}):
            if "node" in node and type(node["node"]) is not str:
                raise _Refuse(f"skeleton node name must be a string, got {_short(node['node'])}")
            pairs = _list(node.get("dict", node.get("children")), "skeleton mapping")
            keys = []
            for pair in pairs:
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in (str, int):
                    raise _Refuse(f"skeleton entry {_short(pair)} is not a [key, node] pair")
                keys.append(pair[0])
            if len(set(keys)) != len(keys):
                raise _Refuse("skeleton mapping repeats a key")
            children = [pair[1] for pair in pairs]
        else:
            raise _Refuse(f"skeleton node {_short(node)} is not a node")
        # Depth-first, left to right: the order flatten numbered the leaves in.
        stack.extend([(child, depth + 1) for child in reversed(children)])
    if expected != n_leaves:
        raise _Refuse(f"skeleton uses {expected} leaves; the document lists {n_leaves}")
