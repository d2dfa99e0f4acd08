"""Planning a pod-sized save without building every writer's pack entries (issue 14).

Each process lays out only its own pack entries; the primary describes every
writer's packs in ``pytree.json`` with a vectorised fill
(``cloudckpt.handlers.pytree.packing``) instead of building one entry per
packed shard. These tests plan a synthetic state of many small leaves on a
stand-in mesh of 16 processes (shapes and shardings only, as the scale model
does) and hold the plan to a brute-force reference: every writer's packed
shards laid out entry by entry with ``layout.pack_layout``, as the planner
did before. Same objects, same offsets, same sizes, on every process and in
the primary's document as the real reader parses it.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from benchmarks.scale_model import SpecSharding
from cloudckpt.format.layout import PackEntry
from cloudckpt.format.pytree import PackedStorage, ZarrStorage, parse_pytree
from cloudckpt.handlers.pytree import layout
from cloudckpt.handlers.pytree.placement import LeafSpec, PlanOptions, plan_layout
from cloudckpt.handlers.pytree.tree import flatten

PROCESSES, DEVICES = 16, 2
ATTEMPT = "00112233445566778899aabb"
AXES = {"data": PROCESSES, "model": DEVICES}

#: (shape, spec) of the kinds of leaf a training state has; spec None: a host value.
KINDS: list[tuple[tuple[int, ...], Any]] = [
    ((64, 32), ("data", "model")),  # one cell per device
    ((32, 64), ("model", "data")),
    ((16, 64), (None, "data")),  # replicated over model (within a process)
    ((48,), ("model",)),  # replicated over data: spread over processes
    ((24,), ()),  # one cell, on every process: a whole leaf
    ((), ()),  # a scalar: listed, not a grid
    ((8, 8), None),  # a host value, the primary's
    ((512, 64), ("data", "model")),  # cells larger than an object: one object each
    ((1024, 256), ("data", "model")),  # shards over the threshold: a zarr array
]


def _specs(n_leaves: int) -> list[LeafSpec]:
    shardings: dict[Any, SpecSharding] = {}
    dtypes = [np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.int8)]
    specs = []
    for i in range(n_leaves):
        shape, spec = KINDS[i % len(KINDS)]
        sharding = None
        if spec is not None:
            sharding = shardings.get(spec) or shardings.setdefault(
                spec, SpecSharding(AXES, spec, DEVICES)
            )
        specs.append(LeafSpec(i, f"['l{i}']", shape, dtypes[(i // 7) % 3], sharding))
    return specs


def _options(**overrides: Any) -> PlanOptions:
    settings: dict[str, Any] = {
        "pack_below_bytes": 32 * 1024,
        "max_object_bytes": 8 * 1024,  # several objects per writer, split inside leaves
        "inner_chunk_bytes": 4 * 1024,
        "attempt": ATTEMPT,
    }
    return PlanOptions(**{**settings, **overrides})


def _reference(specs: list[LeafSpec], opts: PlanOptions, plans: list[Any]) -> list[PackEntry]:
    """Every writer's entries laid out one by one, from the writers every process agreed on."""
    writer_of: dict[tuple[int, Any], int] = {}
    for p, (decided, _) in enumerate(plans):
        for i, parts in decided.own.items():
            if i in decided.packed:
                for index, within in parts:
                    assert index == within  # a packed shard is never split
                    assert (i, index) not in writer_of, "two processes write one shard"
                    writer_of[(i, index)] = p
    packed, whole = [], set()
    for spec in specs:
        if spec.leaf not in plans[0][0].packed:
            continue
        shards = plans[0][0].shards[spec.leaf]
        if len(shards) == 1:
            whole.add(spec.leaf)
        for s in shards:
            packed.append(
                (spec.leaf, layout.Shard(s.index, writer_of[(spec.leaf, s.index)], s.nbytes))
            )
    return layout.pack_layout(packed, opts.max_object_bytes, whole.__contains__, f"@{ATTEMPT}/")


def _document(specs: list[LeafSpec], decided: Any) -> dict[str, Any]:
    """The primary's ``pytree.json`` payload around its storage records."""
    sharding_ids: dict[Any, int] = {}
    records = []
    for spec in specs:
        record: dict[str, Any] = {
            "path": spec.path,
            "kind": "jax" if spec.sharding is not None else "ndarray",
            "dtype": spec.dtype.name,
            "shape": list(spec.shape),
            "sharding": None,
            "storage": decided.storage[spec.leaf],
        }
        if spec.sharding is not None:
            record["sharding"] = sharding_ids.setdefault(spec.sharding, len(sharding_ids))
        records.append(record)
    shardings = [
        {
            "type": "NamedSharding",
            "mesh": dict(AXES),
            "spec": [list(x) if isinstance(x, tuple) else x for x in s.spec],
        }
        for s in sharding_ids
    ]
    _, skeleton = flatten([0] * len(specs))
    return {
        "format": 3,
        "attempt": ATTEMPT,
        "skeleton": skeleton,
        "shardings": shardings,
        "placements": decided.placements,
        "leaves": records,
    }


def _key(e: PackEntry) -> tuple[Any, ...]:
    return (e.obj, e.offset, e.nbytes, e.index)


@pytest.mark.parametrize("replica_parallel", [True, False], ids=["replica-parallel", "first"])
def test_a_large_plan_matches_the_entry_by_entry_reference(replica_parallel: bool) -> None:
    specs = _specs(900)
    opts = _options(replica_parallel=replica_parallel)
    plans = [plan_layout(specs, opts, p, PROCESSES) for p in range(PROCESSES)]
    reference = _reference(specs, opts, plans)
    n_cells = sum(len(plans[0][0].shards[i]) for i in plans[0][0].packed)
    assert len(reference) == n_cells > 10_000
    # Objects break inside leaves, and some cells are larger than an object.
    assert len({e.obj for e in reference}) > 4 * PROCESSES
    assert any(e.nbytes > opts.max_object_bytes for e in reference)
    # Each process lays out exactly its own entries of the reference.
    for p, (decided, total) in enumerate(plans):
        assert total == plans[0][1]
        want = [e for e in reference if e.writer == p]
        assert [(e.leaf, *_key(e)) for e in decided.pack_entries] == [
            (e.leaf, *_key(e)) for e in want
        ]
        sizes: dict[str, int] = {}
        for e in want:
            sizes[e.obj] = max(sizes.get(e.obj, 0), e.end)
        assert decided.pack_sizes == sizes
        # Every process decides the same storage (the primary's also describes the packs).
        zarr = {i: s for i, s in decided.storage.items() if s["type"] == "zarr"}
        assert zarr == {i: s for i, s in plans[0][0].storage.items() if s["type"] == "zarr"}
        assert bool(decided.placements) == (p == opts.primary_host)
    # The primary's document, through the real reader: every entry where the reference has it.
    primary = plans[opts.primary_host][0]
    document = parse_pytree(_document(specs, primary), where="plan")
    described: list[tuple[Any, ...]] = []
    grids = 0
    for leaf in document.leaves:
        if isinstance(leaf.storage, PackedStorage):
            grids += leaf.storage.grid is not None
            described += [_key(e) for e in leaf.storage.entries]
        else:
            assert isinstance(leaf.storage, ZarrStorage)
    assert sorted(described) == sorted(_key(e) for e in reference)
    assert grids > 0.5 * len(primary.packed)  # most leaves are grids, not entry lists
    sizes = {}
    for e in reference:
        sizes[e.obj] = max(sizes.get(e.obj, 0), e.end)
    assert {k.split("/", 1)[1]: v for k, v in document.pack_sizes.items()} == {
        k.split("/", 1)[1]: v for k, v in sizes.items()
    }


def test_replicated_leaves_spread_as_before_and_the_totals_agree() -> None:
    specs = _specs(90)
    opts = _options()
    plans = [plan_layout(specs, opts, p, PROCESSES) for p in range(PROCESSES)]
    state = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs)
    assert plans[0][1] == state
    # Every byte of every leaf is written by exactly one process.
    written = 0
    for decided, _ in plans:
        for i, parts in decided.own.items():
            spec = specs[i]
            written += sum(
                math.prod(b - a for a, b in index) * spec.dtype.itemsize for index, _ in parts
            )
    assert written == state
    # Replicated leaves are spread: more than one process writes them.
    replicated = [s.leaf for s in specs if KINDS[s.leaf % len(KINDS)][1] == ("model",)]
    writers = {p for p, (d, _) in enumerate(plans) for i in replicated if i in d.own}
    assert len(writers) > 1


def test_a_deferred_description_is_the_same_and_made_once() -> None:
    """``defer``: the primary's pack records wait for ``describe``; then equal the direct ones."""
    specs = _specs(300)
    opts = _options()
    direct, _ = plan_layout(specs, opts, opts.primary_host, PROCESSES)
    deferred, _ = plan_layout(specs, opts, opts.primary_host, PROCESSES, defer=True)
    assert direct.describe is None and direct.placements
    assert deferred.describe is not None and not deferred.placements
    packed = sorted(deferred.packed)
    assert packed and all(deferred.storage[i] == {"type": "packed"} for i in packed)
    # What the copies need is decided without the description.
    assert deferred.pack_entries == direct.pack_entries
    assert deferred.pack_sizes == direct.pack_sizes
    deferred.describe()
    assert deferred.describe is None
    assert deferred.storage == direct.storage and deferred.placements == direct.placements
    # Only the primary writes pytree.json: the others have nothing to describe.
    other, _ = plan_layout(specs, opts, (opts.primary_host + 1) % PROCESSES, PROCESSES, defer=True)
    assert other.describe is None and not other.placements


def test_an_async_save_describes_its_packs_off_the_callers_thread(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import jax

    import cloudckpt as cc
    from cloudckpt.handlers.pytree import placement

    threads: list[threading.Thread] = []
    real = placement._describe_packs

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(placement, "_describe_packs", spy)
    state = {f"b{i}": jax.numpy.full((16,), i, jax.numpy.float32) for i in range(50)}
    with cc.AsyncCheckpointer(cc.StandardCheckpointHandler()) as ckptr:
        ckptr.save(str(tmp_path / "1"), args=cc.args.StandardSave(state))
        ckptr.wait_until_finished()
        restored = ckptr.restore(str(tmp_path / "1"))
    assert len(threads) == 1 and threads[0] is not threading.current_thread()
    assert sorted(restored) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))


def test_a_failing_description_fails_the_save_and_commits_nothing(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records made in the background are part of the save: failing, nothing is committed."""
    import jax

    import cloudckpt as cc
    from cloudckpt.handlers.pytree import placement

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("describing failed")

    state = {f"b{i}": jax.numpy.full((16,), i, jax.numpy.float32) for i in range(20)}
    with cc.CheckpointManager(str(tmp_path)) as mngr:
        mngr.save(1, args=cc.args.Composite(state=cc.args.StandardSave(state)))
        mngr.wait_until_finished()
        monkeypatch.setattr(placement, "_describe_packs", broken)
        with pytest.raises(RuntimeError, match="describing failed"):
            mngr.save(2, args=cc.args.Composite(state=cc.args.StandardSave(state)))
            mngr.wait_until_finished()
        monkeypatch.undo()
        assert mngr.all_steps() == [1]
        restored = mngr.restore(1)["state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # step 2's attempt removed
    np.testing.assert_array_equal(np.asarray(restored["b7"]), np.full((16,), 7, np.float32))
