"""Per-attempt object names: a fenced writer's late writes never reach the committed step (issue 12).

A writer paused past its grace period (here: its checkpointer's whole event
loop blocked, heartbeat included, as in a stopped process) is taken over by
another attempt, which commits the same step; then the first writer resumes
and its data writes go out. They land under its own attempt's names
(``<item>/@<attempt>/...``), never under the committer's, so the committed
step restores the committer's values bit for bit; ``cloudckpt gc`` sweeps the
late objects out by exact key, and the fenced writer reports failure and
removes its own. Run on the memory backend, SeaweedFS (S3) and
fake-gcs-server (GCS). Also: the POSIX clean-up rename is conditional on the
claim version it judged, and the format (version 2, format 1 still read).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import atomicity
import cloudckpt as cc
from atomicity import CLAIM_NAME, MARKER_NAME, AtomicRenamePath, ClaimLostError
from cloudckpt import cli
from cloudckpt.engine.loop import LoopThread
from cloudckpt.format import jsonio
from cloudckpt.format.pytree import PYTREE_FORMAT
from cloudckpt.format.step import FORMAT_VERSION
from cloudckpt.handlers.args import CheckpointArgs
from cloudckpt.storage import get_backend
from cloudckpt.storage.path import StoragePath

from .backend_harness import StoreUnderTest, make_store
from .hostile import as_entry_lists
from .test_protocol_fencing import ACTOR, PausingStore

DOCUMENTS = {CLAIM_NAME, MARKER_NAME, "_CHECKPOINT_METADATA", "pytree.json"}


class PausedWriter(cc.StandardCheckpointHandler):
    """A pytree handler whose writes first stop its checkpointer's event loop.

    ``resume`` lets the writes go out; after them (failed or not) the loop
    stops again until ``finish`` is set, so a test can look at the bucket
    while the late objects sit there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.written = threading.Event()
        self.finish = threading.Event()

    def async_save(self, directory: StoragePath, args: CheckpointArgs) -> Sequence[Awaitable[None]]:
        writes = super().async_save(directory, args)

        async def paused(write: Awaitable[None]) -> None:
            self.paused.set()
            self.resume.wait(120)  # blocks the loop: no heartbeat either
            try:
                await write
            finally:
                self.written.set()
                self.finish.wait(120)

        return [paused(w) for w in writes]


def _tree(value: float) -> dict[str, np.ndarray]:
    # "w" is a zarr array (4 MiB >= pack_below_bytes), "b" and "s" are packed.
    return {
        "w": np.full((1024, 1024), value, np.float32) + np.arange(1024, dtype=np.float32),
        "b": np.arange(10, dtype=np.float64) * value,
        "s": np.float32(value),
    }


def _objects(store: StoreUnderTest, loop: LoopThread, step: str) -> dict[str, int]:
    prefix = store.path(step)

    async def collect() -> dict[str, int]:
        return {
            info.path[len(prefix) + 1 :]: info.size
            async for info in store.backend.list_prefix(prefix)
        }

    return loop.run(collect())


def _document(store: StoreUnderTest, step: str) -> dict[str, Any]:
    raw = store.raw_get(store.path(step, "pytree.json"))
    assert raw is not None
    return jsonio.loads(raw, where="pytree.json")


def _gc(url: str, *extra: str) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["gc", url, "--json", *extra], stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    return json.loads(out.getvalue())


@pytest.mark.parametrize("kind", ["memory", "s3", "gcs"])
def test_late_writes_of_a_writer_paused_past_grace_never_reach_the_committed_step(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    store = make_store(kind, request, tmp_path)
    url = store.url("7")
    first, second = _tree(1.0), _tree(2.0)
    handler = PausedWriter()
    errors: list[BaseException] = []

    def save_first() -> None:
        with cc.Checkpointer(handler, grace_s=1.0) as ck:
            try:
                ck.save(url, args=cc.args.StandardSave(first))
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=save_first, daemon=True)
    thread.start()
    try:
        assert handler.paused.wait(60), "the first writer never started writing"
        first_attempt = json.loads(store.raw_get(store.path("7", CLAIM_NAME)) or b"")["claim"][
            "attempt"
        ]
        time.sleep(2.5)  # past its 1 s grace by the store's clock (S3 reports whole seconds)
        with cc.Checkpointer(cc.StandardCheckpointHandler()) as ck:
            ck.save(url, args=cc.args.StandardSave(second))  # takes the stale claim, commits
        committed = _document(store, "7")["attempt"]
        assert committed != first_attempt
        before = _objects(store, loop, "7")
        assert all(k in DOCUMENTS or k.startswith(f"@{committed}/") for k in before), before

        handler.resume.set()  # the paused writer wakes up and its data writes go out
        assert handler.written.wait(60)
        late = _objects(store, loop, "7")
        theirs = {k for k in late if k.startswith(f"@{first_attempt}/")}
        # Its arrays and packs landed, under its own names only; the committed objects
        # are the very same ones, and the step restores the committer's values exactly.
        assert any("/arrays/0/" in k for k in theirs) and any("/packs/" in k for k in theirs)
        assert {k: v for k, v in late.items() if k not in theirs} == before
        with cc.Checkpointer(cc.StandardCheckpointHandler()) as ck:
            restored = ck.restore(url)
        for name, value in second.items():
            assert np.asarray(restored[name]).tobytes() == np.asarray(value).tobytes(), name

        # gc sweeps exactly the fenced attempt's keys out of the committed step.
        report = _gc(store.url(), "--yes")
        assert [(e["name"], e["action"], e["n_objects"]) for e in report["entries"]] == [
            ("7", "swept", len(theirs))
        ]
        assert _objects(store, loop, "7") == before
    finally:
        handler.resume.set()
        handler.finish.set()
        thread.join(120)
    # The fenced writer reports failure: its pytree.json could not be created over the
    # committer's (create-only), or its commit was refused; nothing of it remains.
    assert len(errors) == 1 and isinstance(errors[0], (FileExistsError, ClaimLostError)), errors
    assert _objects(store, loop, "7") == before
    assert [c.name for c in loop.run(atomicity.list_committed(store.backend, store.root))] == ["7"]
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ck:
        restored = ck.restore(url)
    for name, value in second.items():
        assert np.asarray(restored[name]).tobytes() == np.asarray(value).tobytes(), name


@pytest.mark.parametrize("kind", ["memory", "s3", "gcs"])
def test_a_fenced_writer_removes_its_own_late_objects_and_only_them(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    """Without gc: the fenced writer's abort deletes its own tagged keys, nothing else."""
    store = make_store(kind, request, tmp_path)
    url = store.url("8")
    handler = PausedWriter()
    errors: list[BaseException] = []

    def save_first() -> None:
        with cc.Checkpointer(handler, grace_s=1.0) as ck:
            try:
                ck.save(url, args=cc.args.StandardSave(_tree(1.0)))
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=save_first, daemon=True)
    thread.start()
    try:
        assert handler.paused.wait(60)
        time.sleep(2.5)
        with cc.Checkpointer(cc.StandardCheckpointHandler()) as ck:
            ck.save(url, args=cc.args.StandardSave(_tree(3.0)))
        before = _objects(store, loop, "8")
        handler.resume.set()
        handler.finish.set()
    finally:
        handler.resume.set()
        handler.finish.set()
        thread.join(120)
    assert len(errors) == 1, errors
    assert _objects(store, loop, "8") == before
    with cc.Checkpointer(cc.StandardCheckpointHandler()) as ck:
        restored = ck.restore(url)
    assert np.asarray(restored["w"]).tobytes() == _tree(3.0)["w"].tobytes()


def test_posix_cleanup_rename_is_conditional_on_the_judged_claim(
    tmp_path: Path, loop: LoopThread
) -> None:
    """Clean-up judges a claim stale and pauses just before its rename (the fence); the
    writer renews meanwhile: the rename is refused, nothing is deleted, the writer commits."""
    backend = get_backend("file")
    root = str(tmp_path / "root")
    store = PausingStore(backend)

    async def run() -> list[str]:
        tmp = AtomicRenamePath.from_final(f"{root}/3", backend, attempt="a" * 24, grace_s=1.0)
        await tmp.create()
        await backend.put(f"{tmp.get()}/@{'a' * 24}/data", b"mine")
        await asyncio.sleep(1.5)  # stale by the file system's clock
        reached, release = store.gate("cleanup", "rename")

        async def cleanup() -> list[str]:
            ACTOR.set("cleanup")
            return await atomicity.cleanup_uncommitted(store, root)  # type: ignore[arg-type]

        cleaner = asyncio.ensure_future(cleanup())
        await reached.wait()  # judged stale, about to fence by renaming
        await tmp.renew()  # the writer is alive after all
        release.set()
        deleted = await cleaner
        await tmp.finalize()
        return deleted

    assert loop.run(run()) == []
    assert sorted(os.listdir(tmp_path / "root")) == ["3"]
    assert (tmp_path / "root" / "3" / f"@{'a' * 24}" / "data").read_bytes() == b"mine"
    assert [c.name for c in loop.run(atomicity.list_committed(backend, root))] == ["3"]


def test_posix_cleanup_rename_still_fences_an_unrenewed_claim(
    tmp_path: Path, loop: LoopThread
) -> None:
    """The same pause without a renewal: the rename goes ahead and the writer cannot commit."""
    backend = get_backend("file")
    root = str(tmp_path / "root")
    store = PausingStore(backend)

    async def run() -> tuple[list[str], BaseException | None]:
        tmp = AtomicRenamePath.from_final(f"{root}/3", backend, attempt="b" * 24, grace_s=1.0)
        await tmp.create()
        await asyncio.sleep(1.5)
        reached, release = store.gate("cleanup", "rename")

        async def cleanup() -> list[str]:
            ACTOR.set("cleanup")
            return await atomicity.cleanup_uncommitted(store, root)  # type: ignore[arg-type]

        cleaner = asyncio.ensure_future(cleanup())
        await reached.wait()
        release.set()
        deleted = await cleaner
        try:
            await tmp.finalize()
        except BaseException as exc:
            return deleted, exc
        return deleted, None

    deleted, error = loop.run(run())
    assert deleted == [f"{root}/3{atomicity.TMP_INFIX}{'b' * 24}"]
    assert isinstance(error, ClaimLostError), error
    assert loop.run(atomicity.list_committed(backend, root)) == []


# ------------------------------------------------------------------------------ the format
def test_every_data_object_is_named_after_the_attempt(tmp_path: Path) -> None:
    with cc.CheckpointManager(str(tmp_path)) as m:
        m.save(1, args=cc.args.Composite(state=cc.args.StandardSave(_tree(1.0))))
        m.wait_until_finished()
    step = tmp_path / "1"
    meta = jsonio.loads((step / "_CHECKPOINT_METADATA").read_bytes(), where="meta")
    assert meta["format_version"] == FORMAT_VERSION
    doc = jsonio.loads((step / "state" / "pytree.json").read_bytes(), where="doc")
    attempt = doc["attempt"]
    assert doc["format"] == PYTREE_FORMAT and atomicity.ATTEMPT_ID.fullmatch(attempt)
    marker = atomicity.marker_attempt((step / MARKER_NAME).read_bytes())
    assert marker == attempt
    data = sorted(
        str(p.relative_to(step / "state"))
        for p in (step / "state").rglob("*")
        if p.is_file() and p.name != "pytree.json"
    )
    assert data and all(rel.startswith(f"@{attempt}/") for rel in data), data
    assert f"@{attempt}/arrays/0/zarr.json" in data and f"@{attempt}/packs/0.0" in data


def _forge(step: Path, change: Any) -> None:
    target = step / "state" / "pytree.json"
    doc = jsonio.loads(target.read_bytes(), where="doc")
    change(doc)
    target.write_bytes(jsonio.dumps(doc))


@pytest.mark.parametrize(
    "change",
    [
        "another attempt's array",
        "another attempt's pack",
        "no attempt",
        "attempt with a slash",
        "format 1 with an attempt",
    ],
)
def test_a_document_naming_objects_outside_its_attempt_is_refused(
    tmp_path: Path, change: str
) -> None:
    with cc.CheckpointManager(str(tmp_path)) as m:
        m.save(1, args=cc.args.Composite(state=cc.args.StandardSave(_tree(1.0))))
        m.wait_until_finished()

    def forge(doc: dict[str, Any]) -> None:
        as_entry_lists(doc)
        w = next(leaf for leaf in doc["leaves"] if leaf["path"] == "['w']")
        b = next(leaf for leaf in doc["leaves"] if leaf["path"] == "['b']")
        if change == "another attempt's array":
            w["storage"]["key"] = "@" + "f" * 24 + "/arrays/0"
        elif change == "another attempt's pack":
            b["storage"]["entries"][0][0] = "@" + "f" * 24 + "/packs/0.0"
        elif change == "no attempt":
            del doc["attempt"]
        elif change == "attempt with a slash":
            doc["attempt"] = "../x"
        else:
            doc["format"] = 1

    _forge(tmp_path / "1", forge)
    with (
        cc.CheckpointManager(str(tmp_path)) as m,
        pytest.raises(cc.CorruptCheckpointError, match=r"pytree\.json is corrupt"),
    ):
        m.restore(1)


def test_format_1_checkpoints_still_restore(tmp_path: Path) -> None:
    """A step in the layout before per-attempt names (arrays/<i>, packs/<w>.<n>, format 1)."""
    tree = _tree(5.0)
    with cc.CheckpointManager(str(tmp_path)) as m:
        m.save(1, args=cc.args.Composite(state=cc.args.StandardSave(tree)))
        m.wait_until_finished()
    item = tmp_path / "1" / "state"
    doc = jsonio.loads((item / "pytree.json").read_bytes(), where="doc")
    tagged = item / f"@{doc['attempt']}"
    for child in tagged.iterdir():
        child.rename(item / child.name)
    tagged.rmdir()

    def to_format_1(doc: dict[str, Any]) -> None:
        as_entry_lists(doc)  # format 1 has no pack grids
        del doc["placements"]
        prefix = f"@{doc.pop('attempt')}/"
        doc["format"] = 1
        for leaf in doc["leaves"]:
            storage = leaf.get("storage", {})
            if "key" in storage:
                storage["key"] = storage["key"][len(prefix) :]
            for entry in storage.get("entries", []):
                entry[0] = entry[0][len(prefix) :]

    _forge(tmp_path / "1", to_format_1)
    meta_path = tmp_path / "1" / "_CHECKPOINT_METADATA"
    meta = jsonio.loads(meta_path.read_bytes(), where="meta")
    meta["format_version"] = 1
    meta_path.write_bytes(jsonio.dumps(meta))
    assert (item / "arrays" / "0" / "zarr.json").exists() and (item / "packs" / "0.0").exists()
    with cc.CheckpointManager(str(tmp_path)) as m:
        restored = m.restore(1)["state"]
    for name, value in tree.items():
        assert np.asarray(restored[name]).tobytes() == np.asarray(value).tobytes(), name
    code = cli.main(["verify", str(tmp_path / "1")], stdout=io.StringIO(), stderr=io.StringIO())
    assert code == 0


def test_item_names_starting_with_the_attempt_tag_are_refused_on_save(tmp_path: Path) -> None:
    with (
        cc.CheckpointManager(str(tmp_path)) as m,
        pytest.raises(ValueError, match="starts with '@'"),
    ):
        m.save(1, args=cc.args.Composite(**{"@state": cc.args.JsonSave(1)}))
    assert not any(tmp_path.iterdir())
