"""Orbax-written steps: listed, restored, inspected, verified and converted.

The fixtures in tests/fixtures/orbax/<version>/ were written by the real
orbax-checkpoint (0.12.8 and 0.6.4; tests/fixtures/make_orbax_fixtures.py) and
are read here without Orbax installed. For S3 and GCS they are uploaded object
by object with a raw client. Orbax 0.6.4 wrote them on POSIX, where committed
means "final name"; on an object store Orbax also writes ``commit_success.txt``
at the step's top, so the upload adds it to final-named steps that lack it
(what Orbax writes there), and a test removes it to stand for an unfinished
save.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import cloudckpt as cc
from cloudckpt.cli import main
from cloudckpt.engine.loop import LoopThread
from cloudckpt.orbax import UnsupportedOrbaxLayoutError
from cloudckpt.testing.servers import free_port

from .backend_harness import StoreUnderTest, make_store
from .multiproc import Worker, finish, popen, tail

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "orbax"
VERSIONS = ["0.12.8", "0.6.4"]
KINDS = ["file", "s3", "gcs"]
#: layout -> (steps, item holding the tree)
LAYOUTS = {
    "composite_default": ([1, 2], "state"),
    "composite_pytree_zarr2": ([1], "state"),
    "composite_pytree_zarr3": ([1], "state"),
    "composite_ocdbt_zarr3": ([2], "state"),
    "single_item_manager": ([3], "default"),
}
BF16 = "['params']['embed']"


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


def upload(store: StoreUnderTest, version: str, layout: str, dest: str = "") -> str:
    """Copies one fixture layout under the store's root; returns its URL."""
    src = FIXTURES / version / layout
    dest = dest or layout
    object_store = not store.backend.supports_atomic_rename
    for f in sorted(src.rglob("*")):
        if f.is_file():
            store.raw_put(store.path(dest, str(f.relative_to(src))), f.read_bytes())
    if object_store:
        # What Orbax writes on an object store: commit_success.txt atop each finished save.
        steps = [src] if (src / "_METADATA").exists() else list(src.iterdir())
        for step in steps:
            committed = step.is_dir() and ".orbax-checkpoint-tmp" not in step.name
            if committed and not (step / "commit_success.txt").exists():
                rel = "" if step == src else step.name
                store.raw_put(store.path(dest, rel, "commit_success.txt").replace("//", "/"), b"ok")
    return store.url(dest)


def expected(version: str, step: int) -> dict[str, np.ndarray]:
    data = np.load(FIXTURES / version / "expected.npz")
    prefix = str(step)
    out = {}
    for key in data.files:
        if key.startswith(prefix + "["):
            value = data[key]
            path = key[len(prefix) :]
            out[path] = value.view(ml_dtypes.bfloat16) if path == BF16 else value
    return out


def expected_json(version: str) -> dict[str, Any]:
    return json.loads((FIXTURES / version / "expected.json").read_text())


def assert_tree(tree: Any, version: str, step: int) -> None:
    want = expected(version, step)
    got = {
        jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        arr = np.asarray(got[path])
        assert arr.dtype == value.dtype, path
        assert arr.shape == value.shape, path
        assert arr.tobytes() == value.tobytes(), path
    scalars = expected_json(version)["scalars"][str(step)]
    assert tree["step"] == scalars["step"] and isinstance(tree["step"], int)
    assert tree["lr"] == scalars["lr"] and isinstance(tree["lr"], float)


def manager(url: str, **options: Any) -> cc.CheckpointManager:
    return cc.CheckpointManager(
        url, options=cc.CheckpointManagerOptions(enable_async=False, **options)
    )


def _mesh_target(tree_meta: Any, mesh: Mesh) -> Any:
    """A target of every array leaf, sharded over ``mesh`` where the shape allows."""

    def one(meta: Any) -> Any:
        if not hasattr(meta, "shape"):
            return meta
        if meta.kind == "py":  # a Python scalar: restored as one, not as an array
            return 0
        axes = [a for a, n in zip(("x", "y"), mesh.devices.shape, strict=True)]
        spec = [
            axes[i] if i < len(axes) and meta.shape[i] % mesh.devices.shape[i] == 0 else None
            for i in range(len(meta.shape))
        ]
        return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=NamedSharding(mesh, P(*spec)))

    return jax.tree.map(one, tree_meta, is_leaf=lambda x: hasattr(x, "shape"))


# ------------------------------------------------------------------- list and restore
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_manager_lists_and_restores_orbax_steps(
    store: StoreUnderTest, version: str, layout: str
) -> None:
    url = upload(store, version, layout)
    steps, item = LAYOUTS[layout]
    with manager(url) as mngr:
        assert mngr.all_steps() == steps  # the tmp-named save of composite_default is not a step
        assert mngr.orbax_steps() == steps
        assert mngr.latest_step() == steps[-1]
        for step in steps:
            restored = mngr.restore(step)
            assert_tree(restored[item], version, step)
            if item == "state":
                assert restored["meta"] == expected_json(version)["meta"][str(step)]
        meta = mngr.metadata(steps[-1])
        assert set(meta.item_handlers) == ({"state", "meta"} if item == "state" else {"default"})
        shapes = meta.item_metadata[item]
        assert shapes["params"]["dense"]["w"].shape == (8, 12)
        assert shapes["params"]["embed"].dtype == np.dtype(ml_dtypes.bfloat16)
        # Saved on a 2x2 mesh of 4 devices; restored onto 4x2 of 8, each leaf straight into it.
        mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
        target = _mesh_target(shapes, mesh)
        got = mngr.restore(
            steps[-1], args=cc.args.Composite(**{item: cc.args.StandardRestore(target)})
        )[item]
    w = got["params"]["dense"]["w"]
    assert isinstance(w, jax.Array) and w.sharding.spec == P("x", "y")
    assert len({s.device for s in w.addressable_shards}) == 8
    assert_tree(got, version, steps[-1])


@pytest.mark.parametrize("version", VERSIONS)
def test_restore_into_another_mesh_partial_and_strict(store: StoreUnderTest, version: str) -> None:
    url = upload(store, version, "composite_default")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    want = expected(version, 2)
    target = {
        "params": {
            "dense": {
                "w": jax.ShapeDtypeStruct(
                    (8, 12), np.float32, sharding=NamedSharding(mesh, P("x", "y"))
                )
            },
            "embed": jax.ShapeDtypeStruct(
                (16, 4), ml_dtypes.bfloat16, sharding=NamedSharding(mesh, P(None, "y"))
            ),
        }
    }
    with manager(url) as mngr:
        got = mngr.restore(2, args=cc.args.Composite(state=cc.args.StandardRestore(target)))
        w = got["state"]["params"]["dense"]["w"]
        assert isinstance(w, jax.Array) and w.sharding == target["params"]["dense"]["w"].sharding
        assert np.asarray(w).tobytes() == want["['params']['dense']['w']"].tobytes()
        assert np.asarray(got["state"]["params"]["embed"]).tobytes() == want[BF16].tobytes()
        assert set(got["state"]) == {"params"}  # partial: only what the target names
        # strict: another dtype is refused; strict=False casts with a warning.
        wrong = {"counts": jax.ShapeDtypeStruct((9,), np.int32)}
        with pytest.raises(ValueError, match="dtype mismatch"):
            mngr.restore(2, args=cc.args.Composite(state=cc.args.StandardRestore(wrong)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cast = mngr.restore(
                2,
                args=cc.args.Composite(state=cc.args.StandardRestore(wrong, strict=False)),
            )
        assert cast["state"]["counts"].dtype == np.int32
        assert np.array_equal(cast["state"]["counts"], want["['counts']"].astype(np.int32))
        assert any("cast" in str(w.message) for w in caught)
        missing = {"nope": jax.ShapeDtypeStruct((2,), np.float32)}
        with pytest.raises(ValueError, match="missing from the checkpoint"):
            mngr.restore(2, args=cc.args.Composite(state=cc.args.StandardRestore(missing)))
        only_meta = mngr.restore(2, args=cc.args.Composite(meta=cc.args.JsonRestore()))
        assert dict(only_meta) == {"meta": expected_json(version)["meta"]["2"]}
        with pytest.raises(KeyError, match="not in the Orbax step"):
            mngr.restore(2, args=cc.args.Composite(other=cc.args.JsonRestore()))
        with pytest.raises(TypeError, match="JsonRestore"):
            mngr.restore(2, args=cc.args.Composite(meta=cc.args.StandardRestore()))


@pytest.mark.parametrize("version", VERSIONS)
def test_step_naming_options(store: StoreUnderTest, version: str) -> None:
    url = upload(store, version, "composite_named")
    with manager(url, step_prefix="ckpt", step_format_fixed_length=5) as mngr:
        assert mngr.all_steps() == [1, 3]
        assert_tree(mngr.restore(3)["state"], version, 3)
    with manager(url) as mngr:  # other naming: ckpt_00001 is not one of its steps
        assert mngr.all_steps() == []


@pytest.mark.parametrize("version", VERSIONS)
def test_checkpointer_reads_orbax_checkpointer_directory(
    store: StoreUnderTest, version: str
) -> None:
    url = upload(store, version, "checkpointer_dir")
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ckptr:
        assert_tree(ckptr.restore(url), version, 1)
        assert ckptr.metadata(url).item_metadata["opt"][1]["mu"].dtype == np.float16
    with (
        cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr,
        pytest.raises(ValueError, match="single-item Orbax Checkpointer directory"),
    ):
        ckptr.restore(url)


def test_uncommitted_orbax_saves_are_not_checkpoints(
    store: StoreUnderTest, loop: LoopThread
) -> None:
    url = upload(store, "0.12.8", "composite_default")
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr:
        with pytest.raises(ValueError, match="uncommitted Orbax save"):
            ckptr.restore(url + "/7.orbax-checkpoint-tmp-1732000000000000")
        if not store.backend.supports_atomic_rename:
            # On an object store a step without commit_success.txt is an unfinished save.
            loop.run(
                store.backend.delete(store.path("composite_default", "2", "commit_success.txt"))
            )
            with pytest.raises(ValueError, match=r"commit_success\.txt is missing"):
                ckptr.restore(url + "/2")
            with manager(url) as mngr:
                assert mngr.all_steps() == [1]


# ------------------------------------------------------------- never touched unasked
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_retention_and_cleanup_keep_orbax_steps(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    loop: LoopThread,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = make_store(kind, request, tmp_path)
    url = upload(store, "0.12.8", "composite_default")
    before = _objects(store, loop, "composite_default")
    with manager(url, max_to_keep=1) as mngr:
        for step in (10, 11, 12):
            mngr.save(step, args=cc.args.Composite(meta=cc.args.JsonSave({"step": step})))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [1, 2, 12]
        with pytest.raises(FileExistsError):
            mngr.save(2, args=cc.args.Composite(meta=cc.args.JsonSave({})), force=True)
        with pytest.raises(PermissionError, match="orbax_ok=True"):
            mngr.delete(1)
    after = _objects(store, loop, "composite_default")
    orbax_objects = dict(before)
    assert {k: after.get(k) for k in orbax_objects} == orbax_objects  # byte for byte, tmp included
    assert not any(k.startswith(("10/", "11/")) for k in after)
    # gc leaves Orbax's own temporary directory alone too.
    assert main(["gc", url, "--yes"]) == 0
    assert _objects(store, loop, "composite_default").keys() >= orbax_objects.keys()
    # Explicitly asked: the Orbax step goes, commit file first.
    with manager(url) as mngr:
        mngr.delete(1, orbax_ok=True)
        assert mngr.all_steps() == [2, 12]
    assert not any(k.startswith("1/") for k in _objects(store, loop, "composite_default"))
    capsys.readouterr()


def _objects(store: StoreUnderTest, loop: LoopThread, *parts: str) -> dict[str, bytes | None]:
    prefix = store.path(*parts)

    async def run() -> list[str]:
        return [i.path async for i in store.backend.list_prefix(prefix)]

    return {p[len(prefix) + 1 :]: store.raw_get(p) for p in loop.run(run())}


def test_unsupported_layout_is_named(tmp_path: Path) -> None:
    step = tmp_path / "root" / "5"
    (step / "state").mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    (step / "state" / "checkpoint").write_bytes(b"\x81\xa1a\x01")  # a msgpack aggregate file
    with (
        cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr,
        pytest.raises(UnsupportedOrbaxLayoutError, match="msgpack"),
    ):
        ckptr.restore(str(step))


# ------------------------------------------------------------------ command line
@pytest.mark.parametrize("version", VERSIONS)
def test_cli_ls_inspect_verify(
    store: StoreUnderTest, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = upload(store, version, "composite_default")
    assert main(["ls", url, "--all", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == ["1", "2", "7.orbax-checkpoint-tmp-1732000000000000"]
    assert {r["format"] for r in rows.values()} == {"orbax"}
    assert rows["2"]["committed"] and rows["2"]["items"] == ["meta", "state"]
    assert not rows["7.orbax-checkpoint-tmp-1732000000000000"]["committed"]
    assert main(["ls", url]) == 0
    out = capsys.readouterr().out
    assert "orbax" in out and "orbax-checkpoint-tmp" not in out
    assert main(["inspect", url + "/2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "orbax"
    items = {i["name"]: i for i in info["items"]}
    assert items["meta"]["value"] == expected_json(version)["meta"]["2"]
    leaves = {leaf["path"]: leaf for leaf in items["state"]["leaves"]}
    assert leaves[BF16]["dtype"] == "bfloat16" and leaves[BF16]["shape"] == [16, 4]
    assert main(["verify", url + "/2"]) == 0
    assert "no checksum over array bytes" in capsys.readouterr().out


def test_verify_reports_a_missing_orbax_chunk(
    store: StoreUnderTest, loop: LoopThread, capsys: pytest.CaptureFixture[str]
) -> None:
    # Orbax 0.12.8 stores every chunk (store_array_data_equal_to_fill_value), so a missing
    # chunk is an error, not a silent run of zeros.
    url = upload(store, "0.12.8", "composite_pytree_zarr2")
    loop.run(
        store.backend.delete(store.path("composite_pytree_zarr2", "1/state/params.dense.w/1.1"))
    )
    assert main(["verify", url + "/1"]) == 1
    assert "MISSING" in capsys.readouterr().out
    with manager(url) as mngr, pytest.raises(cc.CorruptCheckpointError, match="missing"):
        mngr.restore(1)


@pytest.mark.parametrize("version", VERSIONS)
def test_cp_converts_an_orbax_step(
    store: StoreUnderTest,
    version: str,
    loop: LoopThread,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = upload(store, version, "composite_default")
    # Into another backend: file -> s3, s3 -> gcs, gcs -> file.
    other = {"file": "s3", "s3": "gcs", "gcs": "file"}[store.name]
    dst_store = make_store(other, request, tmp_path / "dst")
    dst = dst_store.url("converted", "2")
    assert main(["cp", url + "/2", dst]) == 0
    assert "verified" in capsys.readouterr().out
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr:
        got = ckptr.restore(dst)
        assert_tree(got["state"], version, 2)
        assert got["meta"] == expected_json(version)["meta"]["2"]
        assert ckptr.metadata(dst).custom["converted_from_orbax"] == url + "/2"
    assert main(["verify", dst]) == 0
    assert re.search(r"[1-9]\d* checksums verified", capsys.readouterr().out)
    names = _objects(dst_store, loop, "converted", "2")
    assert "_COMMITTED" in names and "_CLAIM" in names and "state/pytree.json" in names
    # A second conversion onto the committed copy is refused without --force.
    assert main(["cp", url + "/2", dst]) != 0
    assert "already a committed checkpoint" in capsys.readouterr().err
    # An uncommitted Orbax save is not converted.
    assert (
        main(["cp", url + "/7.orbax-checkpoint-tmp-1732000000000000", dst_store.url("x", "7")]) != 0
    )
    assert "uncommitted Orbax save" in capsys.readouterr().err
    assert _objects(dst_store, loop, "x") == {}


def test_cp_refuses_an_orbax_step_holding_a_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # tensorstore follows links on a file system: converting would copy what they name.
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "0.12.8" / "composite_pytree_zarr2", root)
    array = root / "1" / "state" / "params.dense.w"
    outside = tmp_path / "elsewhere"
    shutil.move(array, outside)
    array.symlink_to(outside, target_is_directory=True)
    dst = tmp_path / "converted" / "1"
    assert main(["cp", str(root / "1"), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "symbolic links" in err and str(array) in err and "Nothing was written" in err
    assert not (tmp_path / "converted").exists() or not any((tmp_path / "converted").rglob("*"))


def test_an_orbax_item_named_like_our_own_objects_is_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Converted, an item "_COMMITTED" would collide with the marker of the copy.
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "0.12.8" / "composite_default" / "2", root / "2")
    (root / "2" / "state").rename(root / "2" / "_COMMITTED")
    dst = tmp_path / "converted" / "2"
    assert main(["cp", str(root / "2"), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "'_COMMITTED' is not supported" in err and "reserved" in err
    assert not (tmp_path / "converted").exists() or not any((tmp_path / "converted").rglob("*"))
    with manager(str(root)) as mngr:
        assert mngr.all_steps() == [2]
        with pytest.raises(UnsupportedOrbaxLayoutError, match="reserved"):
            mngr.restore(2)
        assert dict(mngr.restore(2, args=cc.args.Composite(meta=cc.args.JsonRestore()))) == {
            "meta": expected_json("0.12.8")["meta"]["2"]
        }


def test_cp_all_converts_every_committed_step(
    store: StoreUnderTest, loop: LoopThread, capsys: pytest.CaptureFixture[str]
) -> None:
    url = upload(store, "0.12.8", "composite_default")
    with manager(url) as mngr:  # a cloudckpt step beside the Orbax ones is copied as is
        mngr.save(5, args=cc.args.Composite(meta=cc.args.JsonSave({"ours": True})))
    dst = store.url("all")
    assert main(["cp", "--all", url, dst]) == 0
    out = capsys.readouterr()
    assert "3 step(s) committed" in out.out
    assert out.err.count("copy 3 steps") >= 1  # one progress bar for the whole root
    with manager(dst) as mngr:
        assert mngr.all_steps() == [1, 2, 5] and mngr.orbax_steps() == []
        assert_tree(mngr.restore(1)["state"], "0.12.8", 1)
        assert dict(mngr.restore(5)) == {"meta": {"ours": True}}
    assert main(["cp", "--all", url, dst]) == 0  # again: nothing to do, all skipped
    assert "skipped: 1, 2, 5" in capsys.readouterr().out


def test_rm_deletes_an_orbax_step_only_with_yes(
    store: StoreUnderTest, loop: LoopThread, capsys: pytest.CaptureFixture[str]
) -> None:
    url = upload(store, "0.6.4", "composite_default")
    before = _objects(store, loop, "composite_default")
    assert main(["rm", url + "/1"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert _objects(store, loop, "composite_default") == before
    assert main(["rm", url + "/1", "--yes"]) == 0
    after = _objects(store, loop, "composite_default")
    assert not any(k.startswith("1") for k in after)
    assert {k: v for k, v in before.items() if not k.startswith("1")} == after


def test_corrupt_ocdbt_manifest_is_caught(
    store: StoreUnderTest, loop: LoopThread, capsys: pytest.CaptureFixture[str]
) -> None:
    url = upload(store, "0.12.8", "composite_default")
    rel = "composite_default/2/state/manifest.ocdbt"
    data = bytearray(store.raw_get(store.path(rel)) or b"")
    data[len(data) // 2] ^= 0x01
    store.raw_put(store.path(rel), bytes(data))
    assert main(["verify", url + "/2"]) == 1
    assert "CORRUPT" in capsys.readouterr().out
    with manager(url) as mngr, pytest.raises(cc.CorruptCheckpointError, match="CRC-32C"):
        mngr.restore(2)
    assert main(["cp", url + "/2", store.url("conv", "2")]) != 0
    assert _objects(store, loop, "conv") == {}  # the failed conversion left nothing


def test_two_processes_restore_an_orbax_step(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Two jax.distributed processes (4 devices each) restore one Orbax step from S3."""
    store = make_store("s3", request, tmp_path)
    url = upload(store, "0.12.8", "composite_default")
    port = free_port()
    workers = []
    for i in range(2):
        spec = {
            "process_id": i,
            "num_processes": 2,
            "devices": 4,
            "port": port,
            "url": url,
            "step": 2,
            "fixtures": str(FIXTURES / "0.12.8"),
        }
        proc, errors = popen("tests.orbax_mp_worker", json.dumps(spec))
        workers.append(Worker(i, proc, errors=errors))
    results = []
    for worker in finish(workers, timeout=360):
        result = worker.result()
        assert worker.proc.returncode == 0 and result is not None, tail(worker, 60)
        results.append(result)
    assert [r["steps"] for r in results] == [[1, 2], [1, 2]]
    # Each process read exactly the shards its own devices hold: together, every element once.
    assert sum(r["checked"] for r in results) == 8 * 12 + 16 * 4
    assert all(r["checked"] > 0 for r in results)


def test_best_fn_ranks_orbax_steps_by_their_metrics(tmp_path: Path) -> None:
    """Orbax records metrics in _CHECKPOINT_METADATA; best_step ranks them, retention keeps them."""
    root = tmp_path / "run"
    shutil.copytree(FIXTURES / "0.12.8" / "composite_default", root)
    for step, loss in ((1, 0.1), (2, 0.5)):
        meta_file = root / str(step) / "_CHECKPOINT_METADATA"
        meta = json.loads(meta_file.read_text())
        meta["metrics"] = {"loss": loss}
        meta_file.write_text(json.dumps(meta))
    with manager(str(root), best_fn=lambda m: m["loss"], best_mode="min", max_to_keep=1) as mngr:
        assert mngr.best_step() == 1
        mngr.save(3, args=cc.args.Composite(meta=cc.args.JsonSave({})), metrics={"loss": 0.9})
        mngr.save(4, args=cc.args.Composite(meta=cc.args.JsonSave({})), metrics={"loss": 0.3})
        mngr.wait_until_finished()  # retention deletes in the background
        assert mngr.all_steps() == [1, 2, 4]  # our own steps: best one kept; Orbax's untouched
        assert mngr.best_step() == 1
    assert (root / "1" / "state" / "manifest.ocdbt").exists() and (root / "2").exists()
