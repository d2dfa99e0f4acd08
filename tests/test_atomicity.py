"""The atomicity strategies and discovery, against every backend."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import warnings

import pytest

import atomicity
from atomicity import (
    CLAIM_NAME,
    MARKER_NAME,
    AtomicRenamePath,
    Claim,
    ClaimLostError,
    CommitMarkerPath,
    ValidationError,
)
from cloudckpt.engine.loop import LoopThread

from .backend_harness import ALL_KINDS, StoreUnderTest, make_store


@pytest.fixture(params=ALL_KINDS)
def store(request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


def _strategy(store: StoreUnderTest) -> type[AtomicRenamePath] | type[CommitMarkerPath]:
    return store.backend.default_temporary_path_class()  # type: ignore[return-value]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _listing(store: StoreUnderTest, loop: LoopThread, prefix: str) -> set[str]:
    async def collect() -> set[str]:
        return {info.path[len(prefix) + 1 :] async for info in store.backend.list_prefix(prefix)}

    return loop.run(collect())


def _save(
    store: StoreUnderTest,
    loop: LoopThread,
    name: str,
    files: dict[str, bytes],
    *,
    commit: bool = True,
):
    """A whole save through the strategy: create, write, finalize."""
    tmp = _strategy(store).from_final(store.path(name), store.backend)

    async def run() -> None:
        where = await tmp.create()
        for key, data in files.items():
            await store.backend.put(f"{where}/{key}", data)
        if commit:
            await tmp.finalize()

    loop.run(run())
    return tmp


class TestStrategies:
    def test_save_commits_and_validates(self, store: StoreUnderTest, loop: LoopThread) -> None:
        tmp = _save(store, loop, "1", {"item/data": b"d", "meta": b"m"})
        assert tmp.get_final() == store.path("1")
        assert _listing(store, loop, store.path("1")) == {
            "item/data",
            "meta",
            CLAIM_NAME,
            MARKER_NAME,
        }
        loop.run(_strategy(store).validate_final(store.path("1"), store.backend))
        assert loop.run(atomicity.is_committed(store.backend, store.path("1")))

    def test_uncommitted_fails_validation_naming_path_and_marker(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        tmp = _save(store, loop, "2", {"data": b"d"}, commit=False)
        with pytest.raises(ValidationError, match=r"incomplete checkpoint at .*2.*") as info:
            loop.run(_strategy(store).validate_final(tmp.get_final(), store.backend))
        assert isinstance(info.value, ValueError)
        loop.run(_strategy(store).validate(tmp.get(), store.backend))  # a valid temporary path
        assert not loop.run(atomicity.is_committed(store.backend, tmp.get_final()))

    def test_second_finalize_raises(self, store: StoreUnderTest, loop: LoopThread) -> None:
        tmp = _save(store, loop, "3", {"data": b"d"})
        with pytest.raises(FileExistsError):
            loop.run(tmp.finalize())

    def test_create_over_committed_raises(self, store: StoreUnderTest, loop: LoopThread) -> None:
        _save(store, loop, "4", {"data": b"d"})
        again = _strategy(store).from_final(store.path("4"), store.backend)
        with pytest.raises(FileExistsError, match="committed checkpoint already exists"):
            loop.run(again.create())
        assert _listing(store, loop, store.path("4")) == {"data", CLAIM_NAME, MARKER_NAME}

    def test_finalize_refuses_when_claim_vanished(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        tmp = _save(store, loop, "5", {"data": b"d"}, commit=False)
        loop.run(store.backend.delete(f"{tmp.get()}/{CLAIM_NAME}"))
        with pytest.raises(ClaimLostError, match="claim was removed or replaced"):
            loop.run(tmp.finalize())
        assert not loop.run(atomicity.is_committed(store.backend, tmp.get_final()))

    def test_finalize_refuses_after_cleanup_revoked_an_expired_claim(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        tmp = _strategy(store).from_final(store.path("6"), store.backend, grace_s=0.05)
        loop.run(tmp.create())
        time.sleep(1.2)  # past its grace by the store's clock (S3 reports whole seconds)
        deleted = loop.run(atomicity.cleanup_uncommitted(store.backend, store.root))
        assert deleted == [tmp.get()]
        with pytest.raises(ClaimLostError, match="claim was removed or replaced"):
            loop.run(tmp.finalize())
        assert loop.run(atomicity.list_committed(store.backend, store.root)) == []


class TestCommitMarker:
    """Behaviour specific to object stores (memory, S3, GCS) where the path is written in place."""

    @pytest.fixture(params=["memory", "s3", "gcs"])
    def ostore(self, request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
        return make_store(request.param, request, tmp_path)

    def test_temporary_path_is_final_path(self, ostore: StoreUnderTest) -> None:
        tmp = CommitMarkerPath.from_final(ostore.path("s"), ostore.backend)
        assert tmp.get() == tmp.get_final() == ostore.path("s")

    def test_second_writer_fails_before_first_byte(
        self, ostore: StoreUnderTest, loop: LoopThread
    ) -> None:
        first = CommitMarkerPath.from_final(ostore.path("race"), ostore.backend)
        second = CommitMarkerPath.from_final(ostore.path("race"), ostore.backend)
        loop.run(first.create())
        with pytest.raises(FileExistsError, match="another save is in progress"):
            loop.run(second.create())
        claim = Claim.from_bytes(ostore.raw_get(ostore.path("race", CLAIM_NAME)) or b"")
        assert claim is not None and claim.attempt == first.claim.attempt

    def test_stale_claim_is_replaced_and_its_leftovers_removed(
        self, ostore: StoreUnderTest, loop: LoopThread
    ) -> None:
        dead = dataclasses.replace(Claim.new(), pid=_dead_pid())
        ostore.raw_put(ostore.path("st", CLAIM_NAME), dead.to_bytes())
        ostore.raw_put(ostore.path("st", "old", "chunk"), b"stale")
        tmp = CommitMarkerPath.from_final(ostore.path("st"), ostore.backend)
        loop.run(tmp.create())
        assert _listing(ostore, loop, ostore.path("st")) == {CLAIM_NAME}

    def test_expired_claim_is_replaced(self, ostore: StoreUnderTest, loop: LoopThread) -> None:
        # Expiry is judged by the store's clock: the claim's stored mtime, not created_ns.
        old = dataclasses.replace(Claim.new(grace_s=0.05), created_ns=time.time_ns() + 10**13)
        loop.run(ostore.backend.put(ostore.path("ex", CLAIM_NAME), old.to_bytes()))
        time.sleep(1.2)
        loop.run(CommitMarkerPath.from_final(ostore.path("ex"), ostore.backend).create())

    def test_unclaimed_leftovers_do_not_survive(
        self, ostore: StoreUnderTest, loop: LoopThread
    ) -> None:
        ostore.raw_put(ostore.path("lo", "debris"), b"x")
        loop.run(CommitMarkerPath.from_final(ostore.path("lo"), ostore.backend).create())
        assert _listing(ostore, loop, ostore.path("lo")) == {CLAIM_NAME}

    def test_all_processes_agree_on_the_attempt(self, ostore: StoreUnderTest) -> None:
        a = CommitMarkerPath.from_final(ostore.path("m"), ostore.backend, attempt="abc")
        b = CommitMarkerPath.from_final(ostore.path("m"), ostore.backend, attempt="abc")
        assert a.claim.attempt == b.claim.attempt == "abc" and a.get() == b.get()


class TestAtomicRename:
    def test_writes_beside_then_renames(
        self, request: pytest.FixtureRequest, tmp_path, loop: LoopThread
    ) -> None:
        store = make_store("file", request, tmp_path)
        tmp = AtomicRenamePath.from_final(store.path("7"), store.backend)
        assert tmp.get() != tmp.get_final() and atomicity.is_temporary_name(tmp.get())
        loop.run(tmp.create())
        loop.run(store.backend.put(f"{tmp.get()}/x", b"1"))
        assert not (tmp_path / store.root / "7").exists()
        loop.run(tmp.finalize())
        assert atomicity.final_name_of(tmp.get()) == tmp.get_final()
        assert _listing(store, loop, store.path("7")) == {"x", CLAIM_NAME, MARKER_NAME}

    def test_loser_of_rename_race_gets_file_exists(
        self, request: pytest.FixtureRequest, tmp_path, loop: LoopThread
    ) -> None:
        store = make_store("file", request, tmp_path)
        a = AtomicRenamePath.from_final(store.path("8"), store.backend)
        b = AtomicRenamePath.from_final(store.path("8"), store.backend)
        for t, payload in ((a, b"a"), (b, b"b")):
            loop.run(t.create())
            loop.run(store.backend.put(f"{t.get()}/x", payload))
        loop.run(a.finalize())
        with pytest.raises(FileExistsError, match="already committed"):
            loop.run(b.finalize())
        assert store.raw_get(store.path("8", "x")) == b"a"

    @pytest.mark.parametrize("left", ["empty directories", "claim and data", "nothing"])
    def test_a_deletion_cut_short_after_its_rename_is_finished_by_clean_up(
        self, left: str, request: pytest.FixtureRequest, tmp_path, loop: LoopThread
    ) -> None:
        """Found by the crash campaign (a SIGKILL inside retention's delete).

        A deletion renames the step to ``<step>.cloudckpt-tmp-deleting-<id>``, then
        removes the tree. Killed part-way, the tree may hold only emptied
        directories: no claim and no object, which clean-up used to take for
        nothing to do, so the directory stayed, listed as uncommitted, for ever.
        A directory left wholly empty is not listed at all.
        """
        store = make_store("file", request, tmp_path)
        _save(store, loop, "9", {"state/a": b"1"})
        _save(store, loop, "10", {"state/a": b"2"})
        doomed = store.path("9" + atomicity.TMP_INFIX + "deleting-0123456789ab")
        loop.run(store.backend.rename(store.path("9"), doomed))
        on_disk = tmp_path / doomed
        if left != "claim and data":
            for f in sorted(on_disk.rglob("*"), reverse=True):  # what rmtree had removed
                if f.is_file():
                    f.unlink()
        if left == "nothing":  # an empty directory, the last rmdir not done
            for d in sorted(on_disk.rglob("*"), reverse=True):
                d.rmdir()
        assert on_disk.is_dir()
        deleted = loop.run(atomicity.cleanup_uncommitted(store.backend, store.root))
        if left == "nothing":
            # An empty directory holds no object: never listed (as on an object store).
            assert deleted == []
        else:
            assert deleted == [doomed]
            assert not on_disk.exists()
        assert [c.name for c in loop.run(atomicity.scan(store.backend, store.root))] == ["10"]

    def test_warns_on_store_without_rename(self, request: pytest.FixtureRequest, tmp_path) -> None:
        store = make_store("memory", request, tmp_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            AtomicRenamePath.from_final(store.path("w"), store.backend)
        assert any("no atomic rename" in str(w.message) for w in caught)


class TestDiscovery:
    def test_scan_classifies_children(self, store: StoreUnderTest, loop: LoopThread) -> None:
        _save(store, loop, "10", {"d": b"12"})
        _save(store, loop, "20", {"d": b"1"}, commit=False)
        store.raw_put(store.path("foreign", "file"), b"not ours")
        store.raw_put(store.path("top-level-object"), b"not a child")
        children = {c.name: c for c in loop.run(atomicity.scan(store.backend, store.root))}
        committed = [c.name for c in children.values() if c.committed]
        assert committed == ["10"]
        assert "foreign" not in children
        # Sizes only from a recursive listing; the default scan lists per child.
        assert children["10"].n_objects is None and children["10"].nbytes is None
        sized = {c.name: c for c in loop.run(atomicity.scan(store.backend, store.root, sizes=True))}
        assert sized.keys() == children.keys()
        assert [sized[n].committed for n in sized] == [children[n].committed for n in sized]
        assert sized["10"].n_objects == 3 and (sized["10"].nbytes or 0) > 2
        assert [c.path for c in loop.run(atomicity.list_committed(store.backend, store.root))] == [
            store.path("10")
        ]
        uncommitted = loop.run(atomicity.list_uncommitted(store.backend, store.root))
        assert [atomicity.final_name_of(c.path) for c in uncommitted] == [store.path("20")]

    def test_cleanup_spares_live_and_committed_and_foreign(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        _save(store, loop, "1", {"d": b"x"})
        live = _save(store, loop, "2", {"d": b"x"}, commit=False)  # this process is alive
        stale = dataclasses.replace(Claim.new(), pid=_dead_pid(), attempt="deadbeef" * 4)
        stale_tmp = _strategy(store)(store.path("3"), store.backend, stale)
        store.raw_put(f"{stale_tmp.get()}/{CLAIM_NAME}", stale.to_bytes())
        store.raw_put(f"{stale_tmp.get()}/d", b"partial")
        store.raw_put(store.path("foreign", "x"), b"keep me")
        deleted = loop.run(atomicity.cleanup_uncommitted(store.backend, store.root))
        assert deleted == [stale_tmp.get()]
        remaining = _listing(store, loop, store.root)
        assert store.raw_get(store.path("foreign", "x")) == b"keep me"
        assert not any(
            p.startswith(stale_tmp.get()[len(store.root) + 1 :] + "/") for p in remaining
        )
        assert loop.run(store.backend.exists(f"{live.get()}/d"))
        assert loop.run(atomicity.is_committed(store.backend, store.path("1")))
        everything = loop.run(
            atomicity.cleanup_uncommitted(store.backend, store.root, include_live=True)
        )
        assert everything == [live.get()]

    def test_delete_checkpoint_unlists_first(self, store: StoreUnderTest, loop: LoopThread) -> None:
        _save(store, loop, "5", {"a": b"1", "b/c": b"2"})
        loop.run(atomicity.delete_checkpoint(store.backend, store.path("5")))
        assert _listing(store, loop, store.root) == set()

    def test_interrupted_deletion_is_unlisted_and_cleaned(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        _save(store, loop, "6", {"a": b"1"})
        if store.backend.supports_atomic_rename:
            # The first step of a file deletion: a rename to a temporary name.
            loop.run(
                store.backend.rename(
                    store.path("6"), store.path("6" + atomicity.TMP_INFIX + "deleting-x")
                )
            )
        else:
            # A deletion first turns the claim into "deleting", then removes the marker.
            claim, current = loop.run(
                atomicity.read_versioned_claim(store.backend, store.path("6"))
            )
            assert claim is not None and current is not None
            tombstone = claim.next(atomicity.DELETING)
            assert loop.run(
                store.backend.put_versioned(
                    store.path("6", CLAIM_NAME), tombstone.to_bytes(), if_version=current.version
                )
            )
            loop.run(store.backend.delete(store.path("6", MARKER_NAME)))  # then interrupted
        assert loop.run(atomicity.list_committed(store.backend, store.root)) == []
        # The claim's owner (this process) is alive, so only an explicit sweep removes it.
        loop.run(atomicity.cleanup_uncommitted(store.backend, store.root, include_live=True))
        assert _listing(store, loop, store.root) == set()
