"""Checkpoints written by earlier cloudckpt versions stay readable.

tests/fixtures/cloudckpt_v<N>/ holds a small checkpoint root written by the
cloudckpt of format version N (tests/fixtures/make_cloudckpt_fixtures.py,
which says what it holds). Each one is restored here from the file system
and, uploaded object by object with a raw client, from S3 (SeaweedFS) and
GCS (fake-gcs-server): as saved, and onto another mesh; ``cloudckpt ls``,
``inspect`` and ``verify`` read it too. A change of the format that breaks
old checkpoints fails here; a new format version needs a fixture of its own.
"""

from __future__ import annotations

import json
import math
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
from cloudckpt.format.step import FORMAT_VERSION

from .backend_harness import StoreUnderTest, make_store

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VERSIONS = sorted(p.name for p in FIXTURES.glob("cloudckpt_v*") if p.is_dir())
KINDS = ["file", "s3", "gcs"]


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


def upload(store: StoreUnderTest, version: str) -> str:
    """Copies the fixture's checkpoint root, every file as one object; returns its URL."""
    src = FIXTURES / version / "run"
    for f in sorted(src.rglob("*")):
        if f.is_file():
            store.raw_put(store.path(version, str(f.relative_to(src))), f.read_bytes())
    return store.url(version)


def expected_json(version: str) -> dict[str, Any]:
    return json.loads((FIXTURES / version / "expected.json").read_text())


def expected_arrays(version: str, step: int) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / version / "expected.npz", allow_pickle=False) as data:
        prefix = f"{step}["
        return {k[len(prefix) - 1 :]: data[k] for k in data.files if k.startswith(prefix)}


def host_bits(value: Any) -> np.ndarray:
    """A restored leaf as the fixture stores it: key data for keys, bf16 as its bits."""
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    array = np.asarray(value)
    return array.view(np.uint16) if array.dtype == ml_dtypes.bfloat16 else array


def assert_state(state: Any, version: str, step: int) -> None:
    """Every leaf of a restored ``state`` equals what was saved: values, dtypes, kinds."""
    facts = expected_json(version)
    arrays = expected_arrays(version, step)
    scalars = facts["scalars"][str(step)]
    leaves = dict(
        (jax.tree_util.keystr(p), leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
    )
    assert sorted(leaves) == sorted([*arrays, *scalars])
    assert state["nothing"] is None
    for path, want in arrays.items():
        got = host_bits(leaves[path])
        assert (got.dtype, got.shape) == (want.dtype, want.shape), path
        assert got.tobytes() == want.tobytes(), path
    for path, want in scalars.items():
        assert leaves[path] == want and type(leaves[path]) is type(want), path
    assert state["params"]["embed"].dtype == np.dtype(ml_dtypes.bfloat16)
    for path, impl in facts["prng_keys_as_key_data"].items():
        key = leaves[path]
        assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key), path
        assert str(jax.random.key_impl(key)) == impl, path


def manager(url: str) -> cc.CheckpointManager:
    return cc.CheckpointManager(url, options=cc.CheckpointManagerOptions(enable_async=False))


def mesh_target(tree_meta: Any, mesh: Mesh) -> Any:
    """Every jax.Array leaf onto ``mesh``, sharded on its first axes where the shape allows.

    Host values (numpy, Python scalars) keep their metadata as target: they come
    back as they were saved.
    """

    def one(meta: Any) -> Any:
        if not isinstance(meta, cc.ArrayMetadata) or meta.kind != "jax":
            return meta
        spec = [
            axis if i < len(meta.shape) and meta.shape[i] % n == 0 else None
            for i, (axis, n) in enumerate(zip(mesh.axis_names, mesh.devices.shape, strict=True))
        ][: len(meta.shape)]
        sharding = NamedSharding(mesh, P(*spec))
        return jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding)

    return jax.tree.map(one, tree_meta, is_leaf=lambda x: isinstance(x, cc.ArrayMetadata))


def test_the_current_format_version_has_a_fixture() -> None:
    """Whoever bumps format_version commits a checkpoint of the new version too."""
    assert f"cloudckpt_v{FORMAT_VERSION}" in VERSIONS, (
        f"no fixture of format version {FORMAT_VERSION}: run "
        "`PYTHONPATH=$PWD python tests/fixtures/make_cloudckpt_fixtures.py` and commit "
        f"tests/fixtures/cloudckpt_v{FORMAT_VERSION} beside the older ones"
    )
    for version in VERSIONS:
        facts = expected_json(version)
        assert version == f"cloudckpt_v{facts['format_version']}"
        assert facts["format_version"] <= FORMAT_VERSION
        size = sum(f.stat().st_size for f in (FIXTURES / version).rglob("*") if f.is_file())
        assert size < 200_000, f"{version} is {size} bytes; keep fixtures small"


@pytest.mark.parametrize("version", VERSIONS)
def test_restores_as_saved(store: StoreUnderTest, version: str) -> None:
    url = upload(store, version)
    facts = expected_json(version)
    with manager(url) as mngr:
        assert mngr.all_steps() == facts["steps"]
        assert mngr.latest_step() == facts["steps"][-1]
        for step in facts["steps"]:
            restored = mngr.restore(step)
            assert set(restored) == {"state", "meta"}
            assert restored["meta"] == facts["meta"][str(step)]
            assert_state(restored["state"], version, step)
            meta = mngr.metadata(step)
            assert set(meta.item_handlers) == {"state", "meta"}
            assert meta.metrics == facts["metrics"][str(step)]
            assert meta.format_version == facts["format_version"]
            shapes = meta.item_metadata["state"]
            assert shapes["params"]["w"].shape == (64, 48)
            assert shapes["params"]["w"].sharding["spec"] == ["data", "model"]
            assert shapes["params"]["embed"].dtype == np.dtype(ml_dtypes.bfloat16)
            assert shapes["rngs"].shape == (4,) and shapes["name"] == f"run-{step}"


@pytest.mark.parametrize("version", VERSIONS)
def test_restores_onto_another_mesh(store: StoreUnderTest, version: str) -> None:
    """Saved on 2x2 devices; restored onto 4x2, each leaf straight into its new sharding."""
    url = upload(store, version)
    step = expected_json(version)["steps"][-1]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    with manager(url) as mngr:
        target = mesh_target(mngr.metadata(step).item_metadata["state"], mesh)
        got = mngr.restore(step, args=cc.args.Composite(state=cc.args.StandardRestore(target)))
    state = got["state"]
    assert set(got) == {"state"}  # only the items asked for
    w = state["params"]["w"]
    assert isinstance(w, jax.Array) and w.sharding.spec == P("x", "y")
    assert len({s.device for s in w.addressable_shards}) == 8
    rngs = state["rngs"]
    assert rngs.sharding.spec == P("x") and len(rngs.addressable_shards) == 8
    assert_state(state, version, step)


@pytest.mark.parametrize("version", VERSIONS)
def test_cli_ls_inspect_verify(
    store: StoreUnderTest, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = upload(store, version)
    facts = expected_json(version)
    step = facts["steps"][-1]
    assert main(["ls", url, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [str(s) for s in facts["steps"]]
    assert all(r["committed"] and r["items"] == ["meta", "state"] for r in rows)
    assert rows[-1]["metrics"] == facts["metrics"][str(step)]

    assert main(["inspect", f"{url}/{step}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["format_version"] == facts["format_version"]
    items = {i["name"]: i for i in info["items"]}
    assert items["meta"]["kind"] == "json" and items["meta"]["value"] == facts["meta"][str(step)]
    leaves = {leaf["path"]: leaf for leaf in items["state"]["leaves"]}
    arrays = expected_arrays(version, step)
    for path in facts["bfloat16_as_uint16"]:
        assert leaves[path]["dtype"] == "bfloat16"
        assert leaves[path]["shape"] == list(arrays[path].shape)
    for path in facts["prng_keys_as_key_data"]:
        assert leaves[path]["dtype"].startswith("key<")
    assert leaves["['params']['w']"]["storage"] == "zarr"
    assert leaves["['params']['b']"]["storage"] == "packed"
    assert leaves["['opt'][1]['mu']"]["storage"] == "empty"
    assert leaves["['name']"] == {**leaves["['name']"], "storage": "inline", "value": f"run-{step}"}

    assert main(["verify", f"{url}/{step}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["problems"] == [] and report["notes"] == []
    saved = FIXTURES / version / "run" / str(step)
    stored = [f.relative_to(saved).as_posix() for f in saved.rglob("*") if f.is_file()]
    assert report["n_objects"] == report["objects_read"] == len(stored)
    # Counted from the stored files, independently of cloudckpt's reader: three
    # checksummed JSON objects, every zarr chunk and every packed entry.
    document = json.loads((saved / "state" / "pytree.json").read_text())
    entries = sum(  # format 3: a pack grid holds one entry per cell
        len(leaf["storage"]["entries"])
        if "entries" in leaf["storage"]
        else math.prod(n // c for n, c in zip(leaf["shape"], leaf["storage"]["cell"], strict=True))
        for leaf in document["data"]["leaves"]
        if leaf.get("storage", {}).get("type") == "packed"
    )
    # Format 2 names data objects after the attempt the document records.
    attempt = document["data"].get("attempt")
    arrays = f"state/@{attempt}/arrays/" if attempt is not None else "state/arrays/"
    chunks = sum(1 for rel in stored if rel.startswith(arrays) and "/c/" in rel)
    assert report["checksums"] == 3 + chunks + entries


def local_copy(version: str, root: Path) -> Path:
    for f in (FIXTURES / version / "run").rglob("*"):
        if f.is_file():
            dest = root / f.relative_to(FIXTURES / version / "run")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    return root


@pytest.mark.parametrize("version", VERSIONS)
def test_a_flipped_byte_in_the_fixture_is_caught(
    tmp_path: Path, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fixture's checksums are live: a flipped byte fails verify and restore."""
    root = local_copy(version, tmp_path / "root")
    # The first pack object, as the document names it (format 2: under @<attempt>/).
    document = json.loads((root / "1" / "state" / "pytree.json").read_text())["data"]
    name = next(
        e[0]
        for leaf in document["leaves"]
        for e in leaf.get("storage", {}).get("entries", [])
        if e[0].endswith("packs/0.0")
    )
    pack = root / "1" / "state" / name
    data = bytearray(pack.read_bytes())
    data[0] ^= 0x40
    pack.write_bytes(bytes(data))
    assert main(["verify", str(root / "1"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(p["kind"], p["url"].split("/1/state/", 1)[-1]) for p in report["problems"]] == [
        ("corrupt", name)
    ]
    with manager(str(root)) as mngr, pytest.raises(cc.CorruptCheckpointError):
        mngr.restore(1)
    with manager(str(root)) as mngr:  # the other step is untouched
        assert_state(mngr.restore(2)["state"], version, 2)


@pytest.mark.parametrize("version", VERSIONS)
def test_verify_reads_the_marker_and_claim_of_the_fixture(
    tmp_path: Path, version: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify reads the commit marker and claim through atomicity's readers."""
    step = local_copy(version, tmp_path / "root") / "1"
    (step / "_CLAIM").write_bytes(b'{"claim": 7}')
    assert main(["verify", str(step), "--json"]) == 0  # a claim is a hint: a note, not a problem
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and any("not a readable claim" in n for n in report["notes"])
    (step / "_COMMITTED").write_bytes(b'{"committed_attempt": ["not", "an", "attempt"]}')
    assert main(["verify", str(step), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [(p["kind"], p["url"].rsplit("/", 1)[-1]) for p in report["problems"]] == [
        ("corrupt", "_COMMITTED")
    ]
