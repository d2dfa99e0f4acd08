"""A fenced writer's late documents in a cleaned-up step are collected, never left forever (issue 12).

A writer paused past its grace period is fenced: clean-up revokes its claim
and deletes its step. When it resumes, its data writes land under its own
attempt's names (recognised by their tag), but its fixed-name documents
(``_CHECKPOINT_METADATA``, ``<item>/pytree.json``, ``<item>/data.json``) are
create-only writes that now succeed in the empty step. If the writer then
dies, before its ``abort`` could remove them, the step holds a lone document:
no claim, no marker, so never listed or restored. Before this fix clean-up
and ``gc`` took it for someone else's files and left it forever.

Clean-up now recognises a claimless, markerless step holding nothing but a
save's documents (by name, and by content: every document is a checksummed
JSON envelope) and deletes them behind a create-only tombstone claim, each
on the version it read. The tests reproduce the writer's death at exactly
that point on the memory backend, SeaweedFS (S3) and fake-gcs-server (GCS),
check that files of the same names that are not a save's stay, and pause
clean-up right before its fence and right before its conditional delete to
show that a writer claiming the step in between is never hurt (I5).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

import atomicity
from atomicity import CLAIM_NAME, MARKER_NAME, Claim, CommitMarkerPath
from cloudckpt import cli
from cloudckpt.engine.loop import LoopThread
from cloudckpt.format import jsonio
from cloudckpt.format.json_item import DATA_NAME
from cloudckpt.format.pytree import METADATA_NAME as PYTREE_NAME
from cloudckpt.format.step import (
    PYTREE_TYPESTR,
    STEP_METADATA_NAME,
    StepMetadata,
    write_object,
    write_step_metadata,
)
from cloudckpt.storage.gcs import GCSBackend
from cloudckpt.storage.path import StoragePath
from cloudckpt.testing.cloudproxy import CloudProxy
from cloudckpt.testing.conformance import StoreUnderTest
from cloudckpt.testing.servers import LocalServers

from .backend_harness import FAST_RETRY, make_store
from .test_protocol_fencing import ACTOR, PausingStore

ATTEMPT = "0123456789abcdef01234567"
#: Files named like a save's documents (or beside them) that are not a save's: kept.
FOREIGN = {
    "notes/_CHECKPOINT_METADATA": b'{"note": "plain JSON, no checksum envelope"}',
    "orbax/_CHECKPOINT_METADATA": b'{"item_handlers": {}}',
    "orbax/state/_METADATA": b"{}",
    "eval/state/pytree.json": jsonio.dumps({"format": 2}),
    "eval/state/weights.bin": b"\0" * 16,
    "flat/readme.txt": b"hello",
}


class ChildListingPausingStore(PausingStore):
    """:class:`PausingStore` that also lists children (as the backends do) and can run
    one actor's clock ahead (a cleaner paused that long, as its fence sees it)."""

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self.ahead: dict[str, float] = {}

    async def list_children(self, prefix: str) -> list[str]:
        await self._at("list_children")
        return await self.b.list_children(prefix)

    async def now(self, path: str) -> float:
        return await super().now(path) + self.ahead.get(ACTOR.get(), 0.0)


@pytest.fixture(params=["memory", "s3", "gcs"])
def ostore(request: pytest.FixtureRequest, tmp_path: Any) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


@pytest.fixture(params=["memory", "s3", "gcs"])
def cstore(
    request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> Iterator[StoreUnderTest]:
    """Stores that honour conditional deletes as the clouds do: SeaweedFS honours
    ``If-Match`` on DELETE itself; fake-gcs-server ignores ``ifGenerationMatch`` on
    DELETE, so the GCS store goes through a :class:`CloudProxy` answering as GCS does."""
    store = make_store(request.param, request, tmp_path)
    if request.param != "gcs":
        yield store
        return
    servers: LocalServers = request.getfixturevalue("servers")
    with CloudProxy(servers.gcs.endpoint, flavor="gcs", gcs_conditional_deletes=True) as proxy:
        backend = GCSBackend(endpoint_url=proxy.endpoint, retry=FAST_RETRY)
        yield StoreUnderTest("gcs", backend, store.root, store.raw_get, store.raw_put)
        loop.run(backend.aclose())
        assert proxy.stats.injected["412"] >= 1  # the emulator alone would have deleted


def _listing(store: StoreUnderTest, loop: LoopThread) -> dict[str, bytes]:
    async def collect() -> dict[str, bytes]:
        start = len(store.root) + 1
        return {
            info.path[start:]: await store.backend.get(info.path) or b""
            async for info in store.backend.list_prefix(store.root)
        }

    return loop.run(collect())


def _gc(url: str, *extra: str) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["gc", url, "--json", *extra], stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    return json.loads(out.getvalue())


async def _fenced_writer_dies_after_late_documents(
    backend: Any, root: str, step: str, documents: list[str]
) -> list[str]:
    """A writer claims, writes its data, is fenced by clean-up, then creates its documents
    late (create-only, with cloudckpt's own document writers) and dies before ``abort``."""
    tmp = CommitMarkerPath.from_final(f"{root}/{step}", backend, attempt=ATTEMPT, grace_s=1.0)
    await tmp.create()
    await backend.put(f"{root}/{step}/state/@{ATTEMPT}/arrays/0/c/0", b"data")
    await asyncio.sleep(2.5)  # past its grace by the store's clock (S3 reports whole seconds)
    deleted = await atomicity.cleanup_uncommitted(backend, root)
    where = StoragePath(backend, f"{root}/{step}")
    for name in documents:  # the paused writer resumes: its creates land in the empty step
        if name == STEP_METADATA_NAME:
            await write_step_metadata(where, StepMetadata(item_handlers={"state": PYTREE_TYPESTR}))
        else:
            await write_object(where / name, jsonio.dumps({"format": 2, "attempt": ATTEMPT}))
    return deleted  # ... and it dies here: no abort


@pytest.mark.parametrize(
    "documents",
    [[STEP_METADATA_NAME], [f"state/{PYTREE_NAME}", f"meta/{DATA_NAME}"]],
    ids=["step-metadata", "item-documents"],
)
def test_lone_documents_of_a_fenced_writer_that_died_are_collected(
    ostore: StoreUnderTest, loop: LoopThread, documents: list[str]
) -> None:
    for rel, data in FOREIGN.items():
        ostore.raw_put(ostore.path(rel), data)
    deleted = loop.run(
        _fenced_writer_dies_after_late_documents(ostore.backend, ostore.root, "7", documents)
    )
    assert deleted == [ostore.path("7")]
    # The state the gap left: lone documents, never listed as a checkpoint.
    assert {k for k in _listing(ostore, loop) if k.startswith("7/")} == {
        f"7/{d}" for d in documents
    }
    assert loop.run(atomicity.list_committed(ostore.backend, ostore.root)) == []

    report = _gc(ostore.url())  # a dry run says what it would do
    entries = {e["name"]: e for e in report["entries"]}
    assert entries["7"]["action"] == "delete", entries
    # (SeaweedFS keeps emptied directories, so its delimiter listing still shows the
    # fenced attempt's tag: "debris" there, "documents" elsewhere; both are ours.)
    assert "documents" in entries["7"]["reason"] or "debris" in entries["7"]["reason"]
    assert entries["7"]["n_objects"] == len(documents)
    # Named like a document, but not a save's (no checksum envelope): spared, said why.
    assert entries["notes"]["action"] == "spare", entries
    assert "not a save's document" in entries["notes"]["reason"]
    assert {"orbax", "eval", "flat"}.isdisjoint(entries)  # not ours by their names

    report = _gc(ostore.url(), "--yes")
    assert {(e["name"], e["action"]) for e in report["entries"]} == {
        ("7", "deleted"),
        ("notes", "spare"),
    }
    assert _listing(ostore, loop) == FOREIGN  # step 7 is gone, every other file stays
    again = {e["name"]: e for e in _gc(ostore.url(), "--yes")["entries"]}
    assert again.pop("notes")["action"] == "spare"
    # Nothing left to do; SeaweedFS's emptied directory is seen, holds nothing, is spared.
    assert again in ({}, {"7": again.get("7")}) and all(
        e["action"] == "spare" and e["n_objects"] == 0 for e in again.values()
    ), again


def test_start_up_cleanup_collects_lone_documents_too(
    ostore: StoreUnderTest, loop: LoopThread
) -> None:
    """The manager's start-up clean-up (``cleanup_uncommitted``), not only ``gc``."""
    loop.run(
        _fenced_writer_dies_after_late_documents(
            ostore.backend, ostore.root, "3", [STEP_METADATA_NAME, f"state/{PYTREE_NAME}"]
        )
    )
    assert set(_listing(ostore, loop)) == {"3/_CHECKPOINT_METADATA", "3/state/pytree.json"}
    deleted = loop.run(atomicity.cleanup_uncommitted(ostore.backend, ostore.root))
    assert deleted == [ostore.path("3")]
    assert _listing(ostore, loop) == {}


def _lone_document(store: StoreUnderTest) -> bytes:
    old = jsonio.dumps({"attempt": "fenced"})
    store.raw_put(store.path("5", STEP_METADATA_NAME), old)
    return old


async def _new_writer(store: Any, step: str, attempt: str) -> bytes:
    """Claims ``step``, writes its document and data, commits; returns its document."""
    ACTOR.set("writer")
    tmp = CommitMarkerPath.from_final(step, store, attempt=attempt)
    await tmp.create()
    mine = jsonio.dumps({"attempt": attempt})
    assert await store.put_if_absent(f"{step}/{STEP_METADATA_NAME}", mine)
    await store.put(f"{step}/state/@{attempt}/a", b"new")
    await tmp.finalize()
    return mine


def _committed_by(store: StoreUnderTest, loop: LoopThread, attempt: str, mine: bytes) -> None:
    objects = _listing(store, loop)
    assert objects.pop(f"5/{STEP_METADATA_NAME}") == mine
    assert objects.pop(f"5/state/@{attempt}/a") == b"new"
    assert atomicity.marker_attempt(objects.pop(f"5/{MARKER_NAME}")) == attempt
    claim = Claim.from_bytes(objects.pop(f"5/{CLAIM_NAME}"))
    assert claim is not None and claim.attempt == attempt and claim.state == "committed"
    assert objects == {}
    assert [c.name for c in loop.run(atomicity.list_committed(store.backend, store.root))] == ["5"]


def test_cleanup_paused_before_its_fence_loses_to_a_writer_claiming_the_step(
    ostore: StoreUnderTest, loop: LoopThread
) -> None:
    """Clean-up recognised the lone document and pauses before its tombstone (the fence);
    a writer claims the step, replaces the document and commits: the tombstone's
    create-only put is refused and nothing of the writer's is deleted."""
    _lone_document(ostore)
    store = ChildListingPausingStore(ostore.backend)
    step = ostore.path("5")
    attempt = "fedcba9876543210fedcba98"

    async def race() -> tuple[list[str], bytes]:
        reached, release = store.gate("cleanup", "create")

        async def cleanup() -> list[str]:
            ACTOR.set("cleanup")
            return await atomicity.cleanup_uncommitted(store, ostore.root)  # type: ignore[arg-type]

        cleaner = asyncio.ensure_future(cleanup())
        await reached.wait()  # judged abandoned, about to fence
        mine = await _new_writer(store, step, attempt)
        release.set()
        return await cleaner, mine

    deleted, mine = loop.run(race())
    assert deleted == []
    _committed_by(ostore, loop, attempt, mine)


def test_cleanup_paused_before_deleting_keeps_a_document_written_since(
    cstore: StoreUnderTest, loop: LoopThread
) -> None:
    """Clean-up fenced the step and read the document's version, then pauses past its
    tombstone's grace; a writer takes the stale tombstone over, replaces the document and
    commits. The document is deleted only on the version read: the writer's stays (I5)."""
    _lone_document(cstore)
    store = ChildListingPausingStore(cstore.backend)
    store.ahead["writer"] = 7200.0  # the cleaner's pause, as the writer's judgement sees it
    step = cstore.path("5")
    attempt = "00112233445566778899aabb"

    async def race() -> tuple[list[str], bytes]:
        reached, release = store.gate("cleanup", "delete_if")

        async def cleanup() -> list[str]:
            ACTOR.set("cleanup")
            return await atomicity.cleanup_uncommitted(store, cstore.root)  # type: ignore[arg-type]

        cleaner = asyncio.ensure_future(cleanup())
        await reached.wait()  # fenced, versions read, about to delete the document
        mine = await _new_writer(store, step, attempt)
        release.set()
        return await cleaner, mine

    deleted, mine = loop.run(race())
    assert deleted == [step]  # it did fence and act, but its deletes missed the new versions
    _committed_by(cstore, loop, attempt, mine)


def test_document_names_and_envelope_are_cloudckpts() -> None:
    """atomicity knows the format's document names; they must be the format's own."""
    assert {STEP_METADATA_NAME} == atomicity.STEP_DOCUMENTS
    assert {PYTREE_NAME, DATA_NAME} == atomicity.ITEM_DOCUMENTS
    assert atomicity.is_document_data(jsonio.dumps({"any": [1, 2]}))
    assert atomicity.is_document_data(jsonio.dumps(None))
    assert not atomicity.is_document_data(b'{"crc32c": "0", "data": 1}')
    assert not atomicity.is_document_data(b"")
    for rel, expected in {
        "_CHECKPOINT_METADATA": True,
        "state/pytree.json": True,
        "meta/data.json": True,
        "state/x/pytree.json": False,
        "@abc/pytree.json": False,
        "../pytree.json": False,
        ".hidden/data.json": False,
        "pytree.json": False,
        "state/_CHECKPOINT_METADATA": False,
    }.items():
        assert atomicity.is_document(rel) is expected, rel


def test_a_live_saves_documents_are_never_taken_for_lone_ones(
    ostore: StoreUnderTest, loop: LoopThread
) -> None:
    """A save's documents beside its live claim are never judged as lone ones."""
    step = ostore.path("6")
    tmp = CommitMarkerPath.from_final(step, ostore.backend, attempt=ATTEMPT)
    loop.run(tmp.create())
    ostore.raw_put(ostore.path("6", STEP_METADATA_NAME), jsonio.dumps({}))
    assert loop.run(atomicity.cleanup_uncommitted(ostore.backend, ostore.root)) == []
    assert sorted(_listing(ostore, loop)) == ["6/_CHECKPOINT_METADATA", "6/_CLAIM"]
