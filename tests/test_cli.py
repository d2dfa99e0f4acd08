"""The ``cloudckpt`` command line against the file system and the real S3 and GCS servers.

Commands run in-process through ``cloudckpt.cli.main`` (stdout and stderr
captured) except where the entry point itself is under test, which runs
``python -m cloudckpt`` in a subprocess, once on pipes and once on a
pseudo-terminal. Checkpoints are written with the library's own
checkpointer; corruption is injected around the backend (raw s3fs/gcsfs
clients, plain files) and what is or is not left in storage is checked by
listing it.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import atomicity
import cloudckpt as cc
from cloudckpt.cli import main
from cloudckpt.engine.loop import LoopThread
from cloudckpt.testing.servers import S3_REGION, LocalServers

from .backend_harness import StoreUnderTest, make_store
from .helpers import BUCKET, unique

KINDS = ["file", "s3", "gcs"]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ helpers
def make_tree(seed: int = 0) -> dict[str, Any]:
    """A small train state: a sharded zarr array, a bfloat16 array, packed leaves, a str."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((256, 32)).astype(np.float32)
    return {
        "params": {
            "w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
            "emb": jax.device_put(
                rng.standard_normal((64, 8)).astype(jnp.bfloat16), NamedSharding(mesh, P(None))
            ),
            "b": rng.standard_normal(16).astype(np.float32),
        },
        "step": 7,
        "name": "run-a",
    }


def _registry() -> cc.HandlerRegistry:
    # Small thresholds so that a small tree has zarr arrays (with inner chunks) and packs.
    pytree = cc.StandardCheckpointHandler(pack_below_bytes=1024, inner_chunk_bytes=1024)
    registry = cc.HandlerRegistry()
    registry.add(None, cc.args.StandardSave, pytree)
    registry.add(None, cc.args.StandardRestore, pytree)
    registry.add(None, cc.args.JsonSave, cc.JsonCheckpointHandler)
    registry.add(None, cc.args.JsonRestore, registry.get(None, cc.args.JsonSave))
    return registry


def save(url: str, tree: dict[str, Any] | None = None, loss: float = 0.25) -> dict[str, Any]:
    tree = make_tree() if tree is None else tree
    handler = cc.CompositeCheckpointHandler(handler_registry=_registry())
    with cc.Checkpointer(handler) as ckptr:
        ckptr.save(
            url,
            args=cc.args.Composite(
                state=cc.args.StandardSave(tree), meta=cc.args.JsonSave({"lr": 3e-4, "arch": "mlp"})
            ),
            metrics={"loss": loss},
        )
    return tree


def restore(url: str) -> Any:
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(url)


def assert_same_tree(restored: dict[str, Any], tree: dict[str, Any]) -> None:
    for key in ("w", "emb", "b"):
        got, want = np.asarray(restored["params"][key]), np.asarray(tree["params"][key])
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), key
    assert restored["step"] == 7 and restored["name"] == "run-a"


def start_save(store: StoreUnderTest, loop: LoopThread, name: str, grace_s: float) -> str:
    """An uncommitted save in progress by this process; returns the path it writes under."""
    backend = store.backend
    tmp = backend.default_temporary_path_class().from_final(
        store.path(name), backend, grace_s=grace_s
    )
    where = loop.run(tmp.create())
    loop.run(backend.put(f"{where}/state/pytree.json", b"half-written"))
    if grace_s < 1:
        time.sleep(1.1)  # ages are judged by the store's clock, which reports whole seconds
    return where


def listing(store: StoreUnderTest, loop: LoopThread, *parts: str) -> dict[str, int]:
    """Objects under the store's root (or a part of it): relative path -> size."""
    prefix = store.path(*parts)

    async def run() -> dict[str, int]:
        return {
            info.path[len(prefix) + 1 :]: info.size
            async for info in store.backend.list_prefix(prefix)
        }

    return loop.run(run())


def flip_byte(store: StoreUnderTest, rel: str, offset: int) -> None:
    data = store.raw_get(store.path(rel))
    assert data is not None, rel
    blob = bytearray(data)
    blob[offset] ^= 0x01
    store.raw_put(store.path(rel), bytes(blob))


class Cli:
    """Runs ``main`` in-process and returns (exit code, stdout, stderr)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(list(argv))
        out, err = self.capsys.readouterr()
        return code, out, err


def one_error_line(err: str, command: str) -> str:
    """The error output is one line, prefixed with the command, without a traceback."""
    lines = [line for line in err.splitlines() if line.startswith(f"cloudckpt {command}:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


# ----------------------------------------------------------------------------------- ls
def test_ls_lists_committed_steps_with_metrics(
    store: StoreUnderTest, loop: LoopThread, cli: Cli
) -> None:
    for step, loss in ((2, 0.5), (10, 0.125), (1, 1.0)):
        save(store.url(str(step)), loss=loss)
    start_save(store, loop, "11", grace_s=3600)

    code, out, err = cli("ls", store.url())
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:2] == ["STEP", "STATUS"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "10"]  # numeric order, uncommitted hidden
    assert all(r[1] == "committed" for r in rows[1:])
    assert "meta,state" in out and "loss=0.125" in out

    code, out, _ = cli("ls", "--all", store.url())
    assert code == 0
    last = out.splitlines()[-1]
    assert last.startswith("11") and "UNCOMMITTED" in last and "live:" in last

    code, out, _ = cli("ls", "--json", "--all", store.url())
    rows = json.loads(out)
    assert [(r["name"][:2], r["committed"]) for r in rows] == [
        ("1", True),
        ("2", True),
        ("10", True),
        ("11", False),
    ]
    assert rows[2]["metrics"] == {"loss": 0.125} and rows[2]["items"] == ["meta", "state"]
    assert rows[2]["n_objects"] is None and rows[2]["nbytes"] is None  # per step, not object
    code, out, _ = cli("ls", "--json", "--all", "--sizes", store.url())
    sized = json.loads(out)
    assert [r["name"] for r in sized] == [r["name"] for r in rows]
    assert sized[2]["n_objects"] == len(listing(store, loop, "10"))
    assert sized[2]["nbytes"] == sum(listing(store, loop, "10").values())
    assert rows[3]["claim"]["live"] is True and rows[3]["claim"]["pid"] == os.getpid()


def test_ls_of_an_empty_root_and_of_a_missing_bucket(
    servers: LocalServers, cli: Cli, tmp_path: Path
) -> None:
    code, out, err = cli("ls", str(tmp_path / "nothing"))
    assert code == 0 and out == "" and "no committed checkpoints under" in err

    step = str(tmp_path / "run" / "1")
    save(step)
    code, out, err = cli("ls", step)
    assert code == 0 and out == "" and f"{step} is itself a checkpoint" in err

    for url in ("s3://no-such-bucket-cli/run", "gs://no-such-bucket-cli/run"):
        code, out, err = cli("ls", url)
        line = one_error_line(err, "ls")
        assert code == 1 and "no-such-bucket-cli" in line and "does not exist" in line


# ------------------------------------------------------------------------------ inspect
def test_inspect_shows_the_tree_without_reading_array_data(
    store: StoreUnderTest, loop: LoopThread, cli: Cli
) -> None:
    save(store.url("5"))
    code, out, err = cli("inspect", store.url("5"))
    assert code == 0, err
    assert "loss=0.25" in out and "item 'state': pytree, 5 leaves" in out
    w_row = next(line for line in out.splitlines() if "['params']['w']" in line)
    assert (
        w_row.split()[1:3] == ["float32", "(256,"]
        and "mesh(data=4,model=2) P(data, model)" in w_row
    )
    assert w_row.split()[-1] == "zarr" and "32.0 KiB" in w_row
    assert "bfloat16" in out and "packed" in out and "inline" in out
    assert '"arch": "mlp"' in out

    code, out, _ = cli("inspect", "--json", store.url("5"))
    info = json.loads(out)
    assert info["metadata"]["metrics"] == {"loss": 0.25}
    items = {item["name"]: item for item in info["items"]}
    assert items["meta"]["value"] == {"lr": 3e-4, "arch": "mlp"}
    leaves = {leaf["path"]: leaf for leaf in items["state"]["leaves"]}
    assert leaves["['params']['w']"]["shape"] == [256, 32]
    assert leaves["['params']['w']"]["sharding"]["spec"] == ["data", "model"]
    assert leaves["['params']['emb']"]["dtype"] == "bfloat16"
    assert leaves["['params']['emb']"]["nbytes"] == 64 * 8 * 2
    assert leaves["['params']['b']"]["storage"] == "packed"
    assert leaves["['name']"]["value"] == "run-a"

    # Array data is never read: inspect still works with every chunk garbled.
    for rel in listing(store, loop, "5"):
        if ("/arrays/" in rel and "/c/" in rel) or "/packs/" in rel:
            store.raw_put(store.path("5", rel), b"garbage")
    code, out2, err = cli("inspect", "--json", store.url("5"))
    assert code == 0, err
    again = {item["name"]: item for item in json.loads(out2)["items"]}
    assert again["state"]["leaves"] == items["state"]["leaves"]
    assert again["meta"]["value"] == items["meta"]["value"]


def test_inspect_verify_and_rm_refuse_what_is_not_a_committed_step(
    store: StoreUnderTest, loop: LoopThread, cli: Cli
) -> None:
    save(store.url("1"))
    start_save(store, loop, "2", grace_s=3600)
    for command in ("inspect", "verify", "rm"):
        code, _, err = cli(command, store.url("404"))
        assert code == 1 and "no checkpoint at" in one_error_line(err, command)

        code, _, err = cli(command, store.url())
        line = one_error_line(err, command)
        assert code == 1 and "holds 1 checkpoints" in line and store.url("1") in line

    uncommitted = store.url("2")
    if store.backend.supports_atomic_rename:  # the save writes under a temporary name
        uncommitted = store.url(next(n for n in os.listdir(store.root) if n.startswith("2.")))
    for command in ("inspect", "verify", "rm", "cp"):
        argv = [command, uncommitted] + ([store.url("copy")] if command == "cp" else [])
        code, _, err = cli(*argv)
        line = one_error_line(err, command)
        assert code == 1 and "not a committed checkpoint" in line and "gc" in line
    assert not any(rel.startswith("copy") for rel in listing(store, loop))


def test_inspect_and_verify_a_single_handler_checkpoint(servers: LocalServers, cli: Cli) -> None:
    url = f"gs://{BUCKET}/{unique('single')}/1"
    with cc.Checkpointer(cc.StandardCheckpointHandler(pack_below_bytes=1024)) as ckptr:
        ckptr.save(url, args=cc.args.StandardSave(make_tree()))
    code, out, err = cli("inspect", url)
    assert code == 0, err
    assert "item (the whole checkpoint): pytree, 5 leaves" in out
    code, out, err = cli("verify", "--json", url)
    assert code == 0, err
    assert json.loads(out)["ok"] and json.loads(out)["notes"] == []


def test_debug_shows_the_traceback(servers: LocalServers, cli: Cli, tmp_path: Path) -> None:
    code, _, err = cli("--debug", "inspect", str(tmp_path / "none"))
    assert code == 1 and "Traceback" in err and "FileNotFoundError" in err


def test_usage_errors(cli: Cli, tmp_path: Path) -> None:
    code, _, err = cli()
    assert code == 2 and "usage: cloudckpt" in err
    code, out, _ = cli("--help")
    assert code == 0 and all(
        c in out for c in ("ls", "inspect", "verify", "gc", "rm", "cp", "doctor")
    )
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("cloudckpt ")
    code, _, err = cli("ls", "ftp://host/x")
    line = one_error_line(err, "ls")
    assert code == 1 and "unsupported storage scheme 'ftp'" in line and "s3://" in line


# ------------------------------------------------------------------------------- verify
def test_verify_reads_every_object_of_a_good_step(store: StoreUnderTest, cli: Cli) -> None:
    save(store.url("3"))
    code, out, err = cli("verify", store.url("3"))
    assert code == 0, err
    last = out.splitlines()[-1]
    assert last.startswith(f"OK  {store.url('3')}: ")
    # Not a terminal: one plain progress line with the bytes read, no bar.
    assert f"verify {store.url('3')}: " in err and "%|" not in err

    code, out, err = cli("verify", store.url("3"), "--quiet")
    assert code == 0 and out.startswith("OK") and err == ""

    code, out, _ = cli("verify", "--json", store.url("3"))
    report = json.loads(out)
    assert report["ok"] and report["problems"] == [] and report["notes"] == []
    assert report["objects_read"] == report["n_objects"]
    # Three JSON envelopes, every zarr chunk and every packed entry.
    assert report["checksums"] > 3 + 8


def test_verify_names_corrupt_and_missing_objects(
    store: StoreUnderTest, loop: LoopThread, cli: Cli
) -> None:
    save(store.url("4"))
    objects = listing(store, loop, "4")
    chunks = sorted(rel for rel in objects if "/arrays/" in rel and "/c/" in rel)
    flip_byte(store, f"4/{chunks[0]}", 10)
    pack = next(rel for rel in objects if rel.startswith("state/") and "/packs/0.0" in rel)
    flip_byte(store, f"4/{pack}", 0)
    flip_byte(store, "4/meta/data.json", len(store.raw_get(store.path("4/meta/data.json"))) - 4)
    loop.run(store.backend.delete(store.path("4", chunks[-1])))

    code, out, err = cli("verify", store.url("4"))
    assert code == 1
    found = {line.split()[1].rstrip(":"): line.split()[0] for line in out.splitlines()}
    assert found == {
        store.url("4", chunks[0]): "CORRUPT",
        store.url("4", pack): "CORRUPT",
        store.url("4", "meta/data.json"): "CORRUPT",
        store.url("4", chunks[-1]): "MISSING",
    }
    assert "Digest mismatch" in out and "checksum mismatch" in out
    line = one_error_line(err, "verify")
    assert "3 corrupt, 1 missing" in line and store.url("4") in line

    code, out, _ = cli("verify", "--json", store.url("4"))
    assert code == 1
    kinds = sorted(p["kind"] for p in json.loads(out)["problems"])
    assert kinds == ["corrupt", "corrupt", "corrupt", "missing"]


def test_verify_catches_corrupt_step_metadata_and_pytree_json(
    store: StoreUnderTest, cli: Cli
) -> None:
    save(store.url("6"))
    flip_byte(store, "6/_CHECKPOINT_METADATA", 40)
    flip_byte(store, "6/state/pytree.json", 60)
    code, out, _ = cli("verify", store.url("6"))
    assert code == 1
    bad = {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith("CORRUPT")}
    assert bad == {store.url("6", "_CHECKPOINT_METADATA"), store.url("6", "state/pytree.json")}


# ----------------------------------------------------------------------------------- gc
def test_gc_is_a_dry_run_until_yes_and_never_touches_committed_steps(
    store: StoreUnderTest, loop: LoopThread, cli: Cli
) -> None:
    save(store.url("1"))
    start_save(store, loop, "2", grace_s=0.0)  # abandoned: past its grace period
    start_save(store, loop, "3", grace_s=3600)  # live: this process is still "saving"
    before = listing(store, loop)

    code, out, err = cli("gc", store.url())
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("would delete") and "/2" in line for line in lines)
    assert any(
        line.startswith("sparing") and "/3" in line and "--include-live" in line for line in lines
    )
    assert lines[-1].startswith("dry run: nothing deleted") and "--yes" in lines[-1]
    assert listing(store, loop) == before

    code, out, _ = cli("gc", "--yes", store.url())
    assert code == 0 and "deleted 1 uncommitted step(s)" in out
    names = {rel.split("/", 1)[0].split(".", 1)[0] for rel in listing(store, loop)}
    assert names == {"1", "3"}

    code, out, _ = cli("gc", "--yes", "--include-live", "--json", store.url())
    report = json.loads(out)
    assert [e["action"] for e in report["entries"]] == ["deleted"]
    assert report["committed_untouched"] == 1
    assert {rel.split("/", 1)[0] for rel in listing(store, loop)} == {"1"}
    assert cli("verify", store.url("1"))[0] == 0

    code, out, _ = cli("gc", store.url())
    assert code == 0 and out.startswith("nothing to delete")


# ----------------------------------------------------------------------------------- rm
def test_rm_is_a_dry_run_until_yes(store: StoreUnderTest, loop: LoopThread, cli: Cli) -> None:
    save(store.url("1"))
    save(store.url("2"))
    code, out, _ = cli("rm", store.url("1"))
    assert code == 0 and out.startswith("dry run: would delete") and "--yes" in out
    assert listing(store, loop, "1")

    code, out, _ = cli("rm", "--yes", store.url("1"))
    assert code == 0 and out.startswith(f"deleted {store.url('1')}")
    assert listing(store, loop, "1") == {}
    assert {rel.split("/", 1)[0] for rel in listing(store, loop)} == {"2"}
    code, out, _ = cli("ls", "--all", "--json", store.url())
    assert [r["name"] for r in json.loads(out)] == ["2"]

    code, _, err = cli("rm", "--yes", store.url("1"))
    assert code == 1 and "no checkpoint at" in one_error_line(err, "rm")


# ----------------------------------------------------------------------------------- cp
def test_cp_gs_to_s3_to_file_verifies_and_restores_bit_exactly(
    servers: LocalServers, loop: LoopThread, cli: Cli, tmp_path: Path
) -> None:
    run = unique("cp")
    gs, s3, local = f"gs://{BUCKET}/{run}", f"s3://{BUCKET}/{run}", str(tmp_path / run)
    tree = save(f"{gs}/100", make_tree(seed=3))

    code, out, err = cli("cp", f"{gs}/100", f"{s3}/")  # a trailing / keeps the step name
    assert code == 0, err
    assert out.startswith(f"copied {gs}/100 -> {s3}/100: ") and "verified" in out
    assert f"copy to {s3}/100: " in err and f"verify copy at {s3}/100: " in err

    code, out, err = cli("cp", "--json", f"{s3}/100", f"{local}/100")
    assert code == 0, err
    report = json.loads(out)
    assert report["verify"]["ok"] and report["verify"]["url"] == f"{local}/100"
    assert sorted(os.listdir(local)) == ["100"]  # no temporary name left behind

    for url in (f"{s3}/100", f"{local}/100"):
        assert_same_tree(restore(url)["state"], tree)
        assert restore(url)["meta"] == {"lr": 3e-4, "arch": "mlp"}
        code, out, _ = cli("ls", "--json", url.rsplit("/", 1)[0])
        assert json.loads(out)[0]["metrics"] == {"loss": 0.25}
    # Same objects at each end, plus the destination's own claim and marker.
    src_objects = set(os.listdir(f"{local}/100"))
    assert {"_COMMITTED", "_CLAIM", "_CHECKPOINT_METADATA", "state", "meta"} == src_objects

    code, _, err = cli("cp", f"{local}/100", f"{local}/100/inner")
    assert code == 1 and "one lies inside the other" in one_error_line(err, "cp")

    # An existing committed destination is refused unless --force.
    other = save(f"{gs}/200", make_tree(seed=4), loss=0.5)
    code, _, err = cli("cp", f"{gs}/200", f"{local}/100")
    assert code == 1 and "--force" in one_error_line(err, "cp")
    assert_same_tree(restore(f"{local}/100")["state"], tree)
    code, out, err = cli("cp", "--force", f"{gs}/200", f"{local}/100")
    assert code == 0 and "replaced" in out, err
    assert_same_tree(restore(f"{local}/100")["state"], other)


def test_cp_of_a_corrupt_source_leaves_nothing_at_the_destination(
    servers: LocalServers,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    loop: LoopThread,
    cli: Cli,
) -> None:
    src = make_store("s3", request, tmp_path)
    dst = make_store("gcs", request, tmp_path)
    save(src.url("1"))
    chunk = next(rel for rel in listing(src, loop, "1") if "/arrays/" in rel and "/c/" in rel)
    flip_byte(src, f"1/{chunk}", 12)
    code, _, err = cli("cp", src.url("1"), dst.url("1"))
    line = one_error_line(err, "cp")
    assert code == 1 and "failed verification" in line and dst.url("1", chunk) in line
    assert f"cloudckpt verify {src.url('1')}" in line
    assert listing(dst, loop) == {}


# ------------------------------------------------------------------------------- doctor
def _s3_client() -> Any:
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=S3_REGION
    )


@pytest.fixture
def lifecycle_bucket(servers: LocalServers) -> Iterator[str]:
    """An S3 bucket whose lifecycle aborts incomplete multipart uploads after a day."""
    name = unique("doctor")
    client = _s3_client()
    client.create_bucket(Bucket=name)
    client.put_bucket_lifecycle_configuration(
        Bucket=name,
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": "abort-multipart",
                    "Status": "Enabled",
                    "Filter": {"Prefix": ""},
                    "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                }
            ]
        },
    )
    yield name
    client.close()


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


FUNCTIONAL = ["reachable", "create-only put", "read", "tensorstore", "list", "delete"]


def test_doctor_on_s3(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    lifecycle_bucket: str,
    loop: LoopThread,
    cli: Cli,
) -> None:
    store = make_store("s3", request, tmp_path)
    code, out, err = cli("doctor", store.url())
    assert code == 0, err
    assert "[fix]  abort incomplete multipart uploads" in out and "what to do:" in out
    assert f"credentials: env, access key id ...{os.environ['AWS_ACCESS_KEY_ID'][-4:]}" in out
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in out + err
    assert listing(store, loop) == {}  # probe objects cleaned up
    code, _, err = cli("doctor", "--strict", store.url())
    assert code == 1 and "to fix" in one_error_line(err, "doctor")

    code, out, err = cli("doctor", "--json", f"s3://{lifecycle_bucket}/run")
    assert code == 0, err
    statuses = _statuses(json.loads(out))
    assert all(statuses[name] == "ok" for name in FUNCTIONAL)
    assert statuses["abort incomplete multipart uploads"] == "ok"
    assert statuses["versioning (soft delete)"] == "ok"


@pytest.mark.parametrize("kind", ["gcs", "file"])
def test_doctor_on_gcs_and_file(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, loop: LoopThread, cli: Cli
) -> None:
    store = make_store(kind, request, tmp_path)
    code, out, err = cli("doctor", "--json", store.url())
    assert code == 0, err
    statuses = _statuses(json.loads(out))
    assert all(statuses[name] == "ok" for name in FUNCTIONAL)
    if store.name == "gcs":
        # fake-gcs-server reports no soft delete policy or lifecycle: never a failure.
        assert statuses["soft delete"] == "unknown"
        assert statuses["abort incomplete multipart uploads"] == "unknown"
        code, out, _ = cli("doctor", store.url())
        assert "[?]    soft delete: could not check" in out
    else:
        assert statuses["atomic rename"] == "ok"
    assert listing(store, loop) == {}


def test_doctor_fails_on_a_missing_bucket(servers: LocalServers, cli: Cli) -> None:
    code, out, err = cli("doctor", "gs://no-such-bucket-doctor/run")
    assert code == 1
    assert "[FAIL] reachable" in out and "does not exist" in out
    assert "failed" in one_error_line(err, "doctor")


# -------------------------------------------------------------------------- entry point
def _env(servers: LocalServers, **extra: str) -> dict[str, str]:
    env = {**os.environ, **servers.env, **extra}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_python_m_cloudckpt_on_a_pipe_and_on_a_terminal(
    servers: LocalServers, tmp_path: Path
) -> None:
    url = f"s3://{BUCKET}/{unique('entry')}/1"
    save(url)
    argv = [sys.executable, "-m", "cloudckpt", "verify", url]
    done = subprocess.run(
        argv, env=_env(servers), capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK  {url}: ")
    assert f"verify {url}: " in done.stderr and "%|" not in done.stderr

    # On a terminal: a byte-level bar with rate and ETA (tqdm).
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, env=_env(servers), stdout=slave, stderr=slave, cwd=tmp_path)
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=30) == 0, screen.decode(errors="replace")
    text = screen.decode(errors="replace")
    assert "100%|" in text and "B/s" in text and f"OK  {url}" in text


def test_errors_from_a_subprocess_are_one_line_without_secrets(
    servers: LocalServers, tmp_path: Path
) -> None:
    wrong_secret = "not-the-right-secret-0123456789"
    done = subprocess.run(
        [sys.executable, "-m", "cloudckpt", "ls", f"s3://{BUCKET}/x"],
        env=_env(servers, AWS_SECRET_ACCESS_KEY=wrong_secret),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    line = one_error_line(done.stderr, "ls")
    assert "access denied" in line and BUCKET in line
    assert wrong_secret not in done.stderr + done.stdout

    # An endpoint nobody listens on: doctor says so quickly instead of hanging.
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cloudckpt", "doctor", f"s3://{BUCKET}/x"],
        env=_env(servers, AWS_ENDPOINT_URL="http://127.0.0.1:9"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1 and time.monotonic() - start < 60
    assert "[FAIL] reachable" in done.stdout
    assert "failed" in one_error_line(done.stderr, "doctor")


def test_claims_of_gc_match_the_library(store: StoreUnderTest, loop: LoopThread, cli: Cli) -> None:
    """gc deletes exactly what atomicity.cleanup_uncommitted would."""
    save(store.url("1"))
    start_save(store, loop, "2", grace_s=0.0)
    start_save(store, loop, "3", grace_s=3600)
    _, out, _ = cli("gc", "--json", store.url())
    planned = {e["url"] for e in json.loads(out)["entries"] if e["action"] == "delete"}
    deleted = loop.run(atomicity.cleanup_uncommitted(store.backend, store.root))
    assert planned == {store.backend.url(p) for p in deleted}
