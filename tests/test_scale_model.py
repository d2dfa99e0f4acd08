"""The pod-scale model of ``make bench`` (benchmarks/scale_model.py) and the planner it drives.

The model plans a save with the pytree handler's own layout functions over
shapes and shardings alone. These tests hold it to the real thing where the
real thing can run here: its stand-in sharding must place shards exactly as
``NamedSharding`` does, and on this machine's 8 CPU devices it must predict
the objects a real save writes. At pod scale it must show the 1T state's
save fitting GCS's and S3's initial request rates with the packing threshold
it recommends, and restores fitting them: every process reads the whole
(replicated) leaves, which the planner packs back to back so that costs one
ranged read, not one per leaf.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import cloudckpt as cc
from benchmarks import scale_model as sm
from cloudckpt.format.pytree import PackedStorage, parse_pytree
from cloudckpt.handlers.pytree import layout

SPECS = [
    ("data", "model"),
    ("model", "data"),
    (None, "data"),
    (("data", "model"),),
    (("model", "data"), None),
    (),
    ("model",),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_the_stand_in_sharding_places_shards_as_named_sharding_does(spec: tuple) -> None:
    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.array(devices).reshape(4, 2), ("data", "model"))
    shape = (16, 24)
    real = NamedSharding(mesh, PartitionSpec(*spec)).devices_indices_map(shape)
    model = sm.SpecSharding({"data": 4, "model": 2}, spec, 8).devices_indices_map(shape)
    want = {d.id: layout.normalize_index(idx, shape) for d, idx in real.items()}
    got = {d.id: layout.normalize_index(idx, shape) for d, idx in model.items()}
    assert got == want


TINY = sm.Transformer(
    "tiny", layers=2, d_model=64, heads=4, kv_heads=2, head_dim=16, d_ff=128, vocab=256
)


def _handler() -> cc.StandardCheckpointHandler:
    # Small thresholds so the tiny model has both zarr arrays and several packs.
    return cc.StandardCheckpointHandler(
        pack_below_bytes=4096, max_object_bytes=16 * 1024, inner_chunk_bytes=4096
    )


def test_the_model_predicts_the_objects_a_real_save_writes(tmp_path: Path) -> None:
    predicted = sm.model(
        TINY, processes=1, devices_per_process=8, handler=_handler(), keep_document=True
    )
    mesh = Mesh(np.array(jax.devices()).reshape(1, 8), ("data", "model"))
    dtypes = {2: jax.numpy.bfloat16, 4: np.float32}
    rng = np.random.default_rng(0)
    state = [  # lists keep the model's leaf order
        [
            jax.device_put(
                rng.standard_normal(shape).astype(dtypes[itemsize]),
                NamedSharding(mesh, PartitionSpec(*spec)),
            )
            for _, shape, spec in TINY.params()
        ]
        for _, itemsize in sm.STATE
    ]
    step = tmp_path / "1"
    with cc.Checkpointer(_handler()) as ckptr:
        ckptr.save(str(step), args=cc.args.StandardSave(state))
    stored = [p for p in step.rglob("*") if p.is_file()]
    data = [p for p in stored if "/c/" in str(p) or p.parent.name == "packs"]
    packs = sorted(p.stat().st_size for p in stored if p.parent.name == "packs")
    assert len(data) == predicted["objects_per_step"]
    assert predicted["packed_leaves"] < predicted["leaves"]  # both kinds of storage
    payload = json.loads((step / "pytree.json").read_text())["data"]
    document = parse_pytree(payload, where="pytree.json")
    entries = [
        e
        for leaf in document.leaves
        if isinstance(leaf.storage, PackedStorage)
        for e in leaf.storage.entries
    ]
    assert len(entries) == predicted["pack_entries"]
    # Every byte of the state is in an object, each packed one with its crc32c.
    assert predicted["object_bytes_total"] == predicted["state_bytes"] + 4 * len(entries)
    assert sum(packs) == sum(e.nbytes + 4 for e in entries)
    # The modelled pytree.json describes every leaf's storage as the writer did (pack grids,
    # their placements and runs; zarr metadata), only its attempt id differs.
    modelled = predicted["document"]
    for real, model in zip(payload["leaves"], modelled["leaves"], strict=True):
        want, got = real["storage"], model["storage"]
        if "placement" in want:
            assert (
                payload["placements"][want.pop("placement")]
                == (modelled["placements"][got.pop("placement")])
            )
        if "key" in want:
            assert want.pop("key").split("/", 1)[1] == got.pop("key").split("/", 1)[1]
        assert want == got


def test_whole_leaves_are_packed_back_to_back_first(tmp_path: Path) -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    sharded = NamedSharding(mesh, PartitionSpec("data", "model"))
    replicated = NamedSharding(mesh, PartitionSpec())
    tree = {}
    for i in range(6):  # interleaved in leaf order: sharded, replicated, sharded, ...
        tree[f"l{i}"] = {
            "a_weight": jax.device_put(np.full((8, 8), i, np.float32), sharded),
            "b_norm": jax.device_put(np.full((8,), i, np.float32), replicated),
        }
    step = tmp_path / "1"
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        ckptr.save(str(step), args=cc.args.StandardSave(tree))
    payload = json.loads((step / "pytree.json").read_text())["data"]
    document = parse_pytree(payload, where="pytree.json")
    whole, parts = [], []
    for leaf in document.leaves:
        assert isinstance(leaf.storage, PackedStorage)
        entries = [(e.obj, e.offset, e.nbytes) for e in leaf.storage.entries]
        (whole if len(entries) == 1 else parts).extend(entries)
    assert len(whole) == 6 and len(parts) == 6 * 8
    # The whole leaves fill the primary's first pack, back to back, alone (named
    # under the attempt that wrote them, format 2).
    first = f"@{payload['attempt']}/packs/0.0"
    offsets = sorted((e[1], e[2]) for e in whole)
    assert {e[0] for e in whole} == {first} and offsets[0][0] == 0
    assert all(a + n + 4 == b for (a, n), (b, _) in itertools.pairwise(offsets))
    assert (step / first).stat().st_size == offsets[-1][0] + offsets[-1][1] + 4
    assert not any(e[0] == first for e in parts) and parts
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        back = ckptr.restore(str(step))
    assert float(back["l5"]["b_norm"][0]) == 5.0 and float(back["l3"]["a_weight"][7, 7]) == 3.0


def test_at_pod_scale_the_1t_state_fits_the_initial_request_rates_at_default_settings() -> None:
    # The full pod with CLOUDCKPT_LONG=1 (a few seconds of CPU); a quarter of it by default.
    processes = 1024 if os.environ.get("CLOUDCKPT_LONG") == "1" else 256
    devices = 4
    one_t = next(m for m in sm.MODELS if m.name == "1T")
    defaults = cc.StandardCheckpointHandler()
    result = sm.model(one_t, processes, devices, defaults)
    assert result["state_bytes"] == 14 * result["params"]
    assert result["save_fits"] and result["restore_fits"], result
    # Objects near the largest size: the state divided into 256 MiB objects, plus a tail each.
    floor = math.ceil(result["state_bytes"] / defaults.max_object_bytes)
    assert floor <= result["objects_per_step"] <= floor * 1.05 + processes
    # A restore reads each own object once, plus one ranged read of the whole leaves.
    assert result["gets_per_process"]["max"] <= result["puts_per_process"]["max"] + 1
    # The 2 MiB threshold of before makes every embedding shard an object of its own.
    before = sm.model(
        one_t, processes, devices, cc.StandardCheckpointHandler(pack_below_bytes=2 << 20)
    )
    assert before["objects_per_step"] > result["objects_per_step"] + 8 * processes * devices // 2


def test_the_default_threshold_is_2_mib_for_small_states_and_rises_for_a_pod() -> None:
    mib = 1 << 20
    # Up to ~100 GB nothing changes: the 2 MiB of before.
    for total in (0, 1, 256 * mib, 8 << 30, 100 * 10**9):
        assert layout.pack_threshold(total, 256 * mib) == 2 * mib
    # A 1T-parameter training state (14 TB): capped at an eighth of the largest object.
    assert layout.pack_threshold(14 * 10**12, 256 * mib) == 32 * mib
    assert layout.pack_threshold(14 * 10**12, 64 * mib) == 8 * mib
    # Small objects never lower it below 2 MiB (tests with tiny max_object_bytes keep it).
    assert layout.pack_threshold(14 * 10**12, 16 * 1024) == 2 * mib
    # In between, the state's bytes over the object target.
    assert layout.pack_threshold(500 * 10**9, 256 * mib) == 500 * 10**9 // layout.TARGET_OBJECTS
