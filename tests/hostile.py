"""Building real checkpoints and forging them: shared by the hostile-checkpoint tests."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import cloudckpt as cc
from cloudckpt import cli
from cloudckpt.format import jsonio as _jsonio


def registry(pack_below_bytes: int = 1024, inner_chunk_bytes: int = 1024) -> cc.HandlerRegistry:
    """Small thresholds, so a small tree has zarr arrays (with inner chunks) and packs."""
    pytree = cc.StandardCheckpointHandler(
        pack_below_bytes=pack_below_bytes, inner_chunk_bytes=inner_chunk_bytes
    )
    reg = cc.HandlerRegistry()
    reg.add(None, cc.args.StandardSave, pytree)
    reg.add(None, cc.args.StandardRestore, pytree)
    reg.add(None, cc.args.JsonSave, cc.JsonCheckpointHandler)
    reg.add(None, cc.args.JsonRestore, reg.get(None, cc.args.JsonSave))
    return reg


def manager(root: str, **options: Any) -> cc.CheckpointManager:
    handler = cc.CompositeCheckpointHandler(handler_registry=registry())
    return cc.CheckpointManager(
        root,
        handler,
        options=cc.CheckpointManagerOptions(
            enable_async=False, cleanup_uncommitted_on_start=False, **options
        ),
    )


def state(k: int = 0) -> dict[str, Any]:
    """A tree with zarr arrays (sharded codec and plain), packed leaves, scalars and a string."""
    return {
        "w": (np.arange(64 * 32, dtype=np.float32).reshape(64, 32) + k),  # 8 KiB: zarr
        "v": np.arange(600, dtype=np.int16) * (k + 1),  # 1200 B: zarr, one inner chunk
        "b": np.arange(10, dtype=np.float64) + 0.5 * k,  # packed
        "m": np.arange(12, dtype=np.uint8).reshape(3, 4) + k,  # packed
        "e": np.zeros((0, 3), np.float32),  # empty
        "step": 100 + k,
        "lr": 0.25 * (k + 1),
        "flag": np.bool_(k % 2 == 0),
        "name": f"run-{k}",
        "nested": [(np.int32(k), None)],
        "j": _sharded(np.arange(16, dtype=np.float32).reshape(4, 4) - k),  # a jax.Array
    }


def _sharded(value: np.ndarray) -> jax.Array:
    """``value`` on a one-axis mesh of every local device (a sharding in pytree.json)."""
    devices = jax.devices()
    n = max(d for d in (1, 2, 4) if d <= len(devices) and value.shape[0] % d == 0)
    mesh = Mesh(np.array(devices[:n]), ("data",))
    return jax.device_put(value, NamedSharding(mesh, PartitionSpec("data")))


def save_steps(root: str, steps: tuple[int, ...] = (1, 2)) -> dict[int, dict[str, Any]]:
    """Saves ``state(k)`` and a JSON item at each step; returns what was saved."""
    saved = {}
    with manager(root) as m:
        for k in steps:
            tree = state(k)
            meta = {"epoch": k, "tags": ["a", "b"], "lr": 0.1}
            m.save(
                k,
                args=cc.args.Composite(
                    state=cc.args.StandardSave(tree), meta=cc.args.JsonSave(meta)
                ),
                metrics={"loss": 1.0 / (k + 1)},
            )
            saved[k] = {"state": tree, "meta": meta}
    return saved


def rewrap(path: str | os.PathLike[str], change: Callable[[Any], Any]) -> None:
    """Rewrites a checksummed JSON object with ``change(payload)``, checksum recomputed."""
    payload = _jsonio.loads(Path(path).read_bytes(), where=str(path))
    result = change(payload)
    Path(path).write_bytes(_jsonio.dumps(payload if result is None else result))


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def as_entry_lists(document: dict[str, Any]) -> dict[str, Any]:
    """Rewrites a pytree.json payload's pack grids (format 3) as entry lists, in place.

    Entry lists are the form formats 1 and 2 write and format 3 still reads
    (its writer uses them where cells are not a regular grid): forging single
    entries tests the reader's checks of that form.
    """
    from cloudckpt.format import packed

    placements = packed.parse_placements(document.get("placements", []))
    prefix = f"@{document['attempt']}/" if "attempt" in document else ""
    for i, record in enumerate(document["leaves"]):
        storage = record.get("storage", {})
        if "cell" in storage:
            dtype = np.dtype(getattr(ml_dtypes, record["dtype"], record["dtype"]))
            grid = packed.parse_grid(
                i, storage, tuple(record["shape"]), dtype.itemsize, placements,
                packed.PackRows(), prefix,
            )  # fmt: skip
            record["storage"] = {"type": "packed", "entries": [e.to_json() for e in grid.entries()]}
    return document


def leaf(document: dict[str, Any], path: str) -> dict[str, Any]:
    """The record of the leaf saved at ``path`` (a keystr) in a pytree.json payload.

    Pack grids of the document become entry lists first (:func:`as_entry_lists`).
    """
    as_entry_lists(document)
    return next(x for x in document["leaves"] if x["path"] == path)
