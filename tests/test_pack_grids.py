"""Format 3's pack grids: a pod-sized ``pytree.json`` stays small, and is validated as untrusted.

A packed leaf whose shards form a regular grid is described once (cell shape,
a shared placement of writers, runs of back-to-back cells) instead of one
entry per shard (docs/FORMAT.md, "Pack grids"). These tests save real trees on
8 CPU devices, restore them onto other meshes (ranged reads into the packs),
forge grids the writer never produces, and read the scale model's 1T
document with the real reader.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import cloudckpt as cc
from benchmarks import scale_model as sm
from cloudckpt.format import jsonio
from cloudckpt.format.pytree import parse_pytree

from .hostile import rewrap


def _mesh(rows: int, cols: int) -> Mesh:
    return Mesh(np.array(jax.devices()).reshape(rows, cols), ("data", "model"))


def _tree(mesh: Mesh) -> dict[str, Any]:
    rng = np.random.default_rng(7)

    def put(shape: tuple[int, ...], *spec: Any) -> jax.Array:
        value = rng.standard_normal(shape).astype(np.float32)
        return jax.device_put(value, NamedSharding(mesh, PartitionSpec(*spec)))

    return {
        "w": put((64, 48), "data", "model"),  # 8 cells, one per device
        "wt": put((48, 64), "model", "data"),
        "b": put((24,), "model"),  # replicated over data
        "norm": put((16,)),  # one cell, replicated everywhere
        "step": 3,
    }


def _save(path: Path, tree: Any, **options: Any) -> dict[str, Any]:
    with cc.Checkpointer(cc.StandardCheckpointHandler(**options)) as ckptr:
        ckptr.save(str(path), args=cc.args.StandardSave(tree))
    return json.loads((path / "pytree.json").read_text())["data"]


def test_a_save_describes_regular_packed_leaves_as_grids(tmp_path: Path) -> None:
    tree = _tree(_mesh(4, 2))
    document = _save(tmp_path / "1", tree)
    assert document["format"] == 3
    storage = {leaf["path"]: leaf["storage"] for leaf in document["leaves"]}
    assert storage["['w']"]["cell"] == [16, 24] and storage["['wt']"]["cell"] == [24, 16]
    assert storage["['norm']"]["cell"] == [16]
    assert "entries" in storage["['step']"]  # a 0-d value: one entry, listed
    for path in ("['w']", "['wt']", "['b']", "['norm']"):
        placement = document["placements"][storage[path]["placement"]]
        shape = tree[path[2:-2]].shape
        cell = storage[path]["cell"]
        assert len(placement) == math.prod(n // c for n, c in zip(shape, cell, strict=True))
        # Every cell is in exactly one run.
        assert sum(r[1] * r[3] for r in storage[path]["runs"]) == len(placement)


@pytest.mark.parametrize("mesh_shape", [(2, 4), (8, 1), (1, 8)])
def test_packed_leaves_restore_onto_another_mesh(tmp_path: Path, mesh_shape: tuple) -> None:
    tree = _tree(_mesh(4, 2))
    _save(tmp_path / "1", tree)
    other = _mesh(*mesh_shape)
    target = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, PartitionSpec(*s)))
        for (k, v), s in zip(
            ((k, tree[k]) for k in ("w", "wt", "b", "norm")),
            [("model", "data"), ("data",), (), ("data",)],
            strict=True,
        )
    }
    target["step"] = 0
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        back = ckptr.restore(str(tmp_path / "1"), args=cc.args.StandardRestore(target))
    for k in ("w", "wt", "b", "norm"):
        assert back[k].sharding == target[k].sharding
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(tree[k]))
    assert back["step"] == 3
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        host = ckptr.restore(str(tmp_path / "1"))  # no target: the whole leaves, listed first
    np.testing.assert_array_equal(host["wt"], np.asarray(tree["wt"]))


def _grid_leaf(document: dict[str, Any], path: str) -> dict[str, Any]:
    return next(x for x in document["leaves"] if x["path"] == path)["storage"]


FORGERIES = {
    "a cell that does not divide the shape": lambda d: _grid_leaf(d, "['w']").update(cell=[15, 24]),
    "a cell of the wrong rank": lambda d: _grid_leaf(d, "['w']").update(cell=[16]),
    "a placement beyond the list": lambda d: _grid_leaf(d, "['w']").update(placement=99),
    "a placement of another length": lambda d: (
        d["placements"].append([0] * 3)
        or _grid_leaf(d, "['w']").update(placement=len(d["placements"]) - 1)
    ),
    "a writer out of range": lambda d: (
        d["placements"].append([-1] * 8)
        or _grid_leaf(d, "['w']").update(placement=len(d["placements"]) - 1)
    ),
    "a run beyond its writer's cells": lambda d: _grid_leaf(d, "['w']")["runs"][0].__setitem__(
        3, 2
    ),
    "a run of another writer": lambda d: _grid_leaf(d, "['w']")["runs"][0].__setitem__(0, 7),
    "a run of a billion writers": lambda d: _grid_leaf(d, "['w']")["runs"][0].__setitem__(1, 10**9),
    "a run repeated": lambda d: _grid_leaf(d, "['w']")["runs"].append(
        _grid_leaf(d, "['w']")["runs"][0]
    ),
    "a run missing": lambda d: _grid_leaf(d, "['w']")["runs"].clear(),
    "a run that is not six integers": lambda d: _grid_leaf(d, "['w']")["runs"][0].append(1),
    "a huge offset": lambda d: _grid_leaf(d, "['w']")["runs"][0].__setitem__(5, 1 << 70),
    "a gap in a pack object": lambda d: _grid_leaf(d, "['w']")["runs"][0].__setitem__(
        5, _grid_leaf(d, "['w']")["runs"][0][5] + 4
    ),
    "an unknown field": lambda d: _grid_leaf(d, "['w']").update(extra=1),
    "placements in a format 2 document": lambda d: d.update(format=2),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_grid_is_refused_before_anything_is_read(tmp_path: Path, forgery: str) -> None:
    mesh = _mesh(8, 1)
    value = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    tree = {"w": jax.device_put(value, NamedSharding(mesh, PartitionSpec("data")))}
    document = _save(tmp_path / "1", tree)
    assert _grid_leaf(document, "['w']")["runs"] == [[0, 1, 0, 8, 0, 0]]  # one process
    rewrap(tmp_path / "1" / "pytree.json", FORGERIES[forgery])
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        with pytest.raises(cc.CorruptCheckpointError, match=r"pytree\.json is corrupt"):
            ckptr.restore(str(tmp_path / "1"))
        with pytest.raises(cc.CorruptCheckpointError, match=r"pytree\.json is corrupt"):
            ckptr.metadata(str(tmp_path / "1"))


def test_a_pack_grid_backs_its_objects_exactly(tmp_path: Path) -> None:
    """A pack object shorter than its grid's runs is refused by the listing check."""
    tree = _tree(_mesh(4, 2))
    document = _save(tmp_path / "1", tree)
    obj = tmp_path / "1" / f"@{document['attempt']}" / "packs" / "0.1"
    obj.write_bytes(obj.read_bytes()[:-4])
    with (
        cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr,
        pytest.raises(cc.CorruptCheckpointError, match="its entries need exactly"),
    ):
        ckptr.restore(str(tmp_path / "1"))


def test_at_pod_scale_the_document_is_small_and_the_reader_accepts_it() -> None:
    # The full pod with CLOUDCKPT_LONG=1; a quarter of it by default.
    processes = 1024 if os.environ.get("CLOUDCKPT_LONG") == "1" else 256
    one_t = next(m for m in sm.MODELS if m.name == "1T")
    result = sm.model(one_t, processes, 4, keep_document=True)
    data = jsonio.dumps(result["document"])
    assert len(data) == result["pytree_json_bytes"]
    # One entry per packed shard was over a GB at 1,024 processes (~75 bytes each).
    assert result["pack_entries"] >= 3500 * processes * 4
    assert result["pytree_json_format2_bytes"] > 70 * result["pack_entries"]
    assert result["pytree_json_bytes"] < 4 << 20
    document = parse_pytree(jsonio.loads(data, where="model"), where="model")
    packed = [leaf for leaf in document.leaves if leaf.storage is not None]
    assert len(packed) == result["leaves"]
    # The reader finds a process's own cells where its plan put them.
    leaf = next(x for x in document.leaves if x.path.endswith("['wq']"))
    region = ((0, leaf.shape[0] // processes), (0, leaf.shape[1] // 4))
    (entry,) = leaf.storage.overlapping(region)
    assert entry.obj.startswith(f"@{sm.ATTEMPT}/packs/0.") and entry.index == region
    assert sum(document.pack_sizes.values()) == result["object_bytes_total"]


def test_cells_and_entries_of_a_region_match_numpys_raveling() -> None:
    """A region's cells (few: counted in Python; many: numpy) and each entry's box, C order."""
    from cloudckpt.format.packed import PackGrid, Placement

    rng = np.random.default_rng(3)
    for trial in range(300):
        rank = int(rng.integers(1, 4))
        grid = tuple(int(g) for g in rng.integers(1, 7, rank))
        if trial % 10 == 0:
            grid = (16, 12)[:rank] + grid[2:]  # regions of more than 64 cells: numpy's path
        cell = tuple(int(c) for c in rng.integers(1, 5, rank))
        shape = tuple(g * c for g, c in zip(grid, cell, strict=True))
        cells = math.prod(grid)
        placement = Placement.parse([int(w) for w in rng.integers(0, 3, cells)], 0)
        runs = np.array([[0, 3, 0, cells, 7, 100]], np.int64)  # one run: number 7 at byte 100
        pack = PackGrid(shape, cell, 4, "p/", placement, runs, np.zeros(cells, np.int64))
        region = []
        for n in shape:
            a = int(rng.integers(0, n))
            region.append((a, int(rng.integers(a + 1, n + 1))))
        ranges = [np.arange(a // c, -(-b // c)) for (a, b), c in zip(region, cell, strict=True)]
        mesh = np.meshgrid(*ranges, indexing="ij")
        expected = np.ravel_multi_index([m.reshape(-1) for m in mesh], grid)
        got = pack.cells_overlapping(tuple(region))
        assert got.dtype == np.int64 and got.tolist() == expected.tolist(), (grid, cell, region)
        for number in got.tolist()[:8]:
            entry = pack.entry(number)
            coords = np.unravel_index(number, grid)
            box = tuple((int(i) * c, (int(i) + 1) * c) for i, c in zip(coords, cell, strict=True))
            assert entry.index == box
            assert entry.obj == f"p/packs/{placement.writers[number]}.7"
            assert entry.offset == 100 + int(placement.ranks[number]) * (4 + 4)
