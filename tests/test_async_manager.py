"""AsyncCheckpointer and CheckpointManager behaviour, on every backend."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import atomicity
import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread

from .backend_harness import ALL_KINDS, StoreUnderTest, make_store

GATES: dict[str, threading.Event] = {}
#: Set when a gated write starts waiting at its gate: its save has claimed the step by then.
WAITING: dict[str, threading.Event] = {}


class GatedHandler(cc.AsyncCheckpointHandler):
    """Writes one small object, optionally waiting for a gate or failing first."""

    async def _write(self, directory: cc.StoragePath, args: GatedSave) -> None:
        if args.gate:
            if args.gate in WAITING:
                WAITING[args.gate].set()
            await asyncio.to_thread(GATES[args.gate].wait, 30)
        if args.sleep_s:
            await asyncio.sleep(args.sleep_s)
        if args.fail:
            raise OSError(f"injected write failure {args.fail}")
        await directory.backend.put((directory / "v").path, str(args.value).encode())

    def async_save(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs
    ) -> list[Awaitable[None]]:
        assert isinstance(args, GatedSave)
        return [self._write(directory, args)]

    async def restore(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs | None = None
    ) -> Any:
        data = await directory.backend.get((directory / "v").path)
        return None if data is None else int(data)


@cc.register_with_handler(GatedHandler, for_save=True)
@dataclass(frozen=True)
class GatedSave(cc.CheckpointArgs):
    value: int
    gate: str | None = None
    sleep_s: float = 0.0
    fail: str | None = None


@cc.register_with_handler(GatedHandler, for_restore=True)
@dataclass(frozen=True)
class GatedRestore(cc.CheckpointArgs):
    pass


GatedHandler.default_restore_args = GatedRestore


@pytest.fixture(params=ALL_KINDS)
def store(request: pytest.FixtureRequest, tmp_path) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


def children(store: StoreUnderTest, loop: LoopThread) -> dict[str, bool]:
    """Every checkpoint-like child of the root: name -> committed."""
    return {c.name: c.committed for c in loop.run(atomicity.scan(store.backend, store.root))}


def objects(store: StoreUnderTest, loop: LoopThread, *parts: str) -> set[str]:
    prefix = store.path(*parts)

    async def collect() -> set[str]:
        return {i.path[len(prefix) + 1 :] async for i in store.backend.list_prefix(prefix)}

    return loop.run(collect())


def state(step: int) -> dict[str, Any]:
    return {"w": jnp.full((256, 64), step, jnp.float32), "step": step}


def composite(step: int, **extra: Any) -> cc.args.Composite:
    return cc.args.Composite(state=cc.args.StandardSave(state(step)), **extra)


# ------------------------------------------------------------------- AsyncCheckpointer
class TestAsyncCheckpointer:
    def test_save_returns_before_commit(self, store: StoreUnderTest, loop: LoopThread) -> None:
        GATES["a"] = threading.Event()
        with cc.AsyncCheckpointer(cc.CompositeCheckpointHandler()) as ck:
            ck.save(store.url("1"), args=cc.args.Composite(x=GatedSave(1, gate="a")))
            assert ck.is_saving_in_progress()
            assert children(store, loop) == {"1": False} or not children(store, loop).get(
                "1", False
            )
            GATES["a"].set()
            ck.wait_until_finished()
            assert not ck.is_saving_in_progress()
            assert children(store, loop) == {"1": True}
            assert ck.restore(store.url("1")).x == 1

    def test_caller_may_donate_or_mutate_after_save(self, store: StoreUnderTest) -> None:
        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
        x = jax.device_put(np.arange(1024 * 256, dtype=np.float32).reshape(1024, 256), sharding)
        expected = np.asarray(x).copy()
        host = np.arange(10.0)

        @functools.partial(jax.jit, donate_argnums=0)
        def train_step(a: jax.Array) -> jax.Array:
            return a * 2 + 1

        with cc.AsyncCheckpointer(cc.StandardCheckpointHandler()) as ck:
            ck.save(store.url("d"), args=cc.args.StandardSave({"x": x, "host": host}))
            y = train_step(x)  # donates x's buffers
            host[:] = -1
            y.block_until_ready()
            assert x.is_deleted()
            ck.wait_until_finished()
            out = ck.restore(store.url("d"))
        np.testing.assert_array_equal(out["x"], expected)
        np.testing.assert_array_equal(out["host"], np.arange(10.0))

    def test_second_save_waits_for_the_first(self, store: StoreUnderTest, loop: LoopThread) -> None:
        with cc.AsyncCheckpointer(cc.CompositeCheckpointHandler()) as ck:
            ck.save(store.url("1"), args=cc.args.Composite(x=GatedSave(1, sleep_s=0.6)))
            start = time.monotonic()
            ck.save(store.url("2"), args=cc.args.Composite(x=GatedSave(2)))
            waited = time.monotonic() - start
            assert children(store, loop)["1"] is True  # committed before the second save began
            ck.wait_until_finished()
        assert waited >= 0.3
        assert children(store, loop) == {"1": True, "2": True}

    def test_background_failure_is_raised_once_naming_the_path(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        with cc.AsyncCheckpointer(cc.CompositeCheckpointHandler()) as ck:
            ck.save(store.url("bad"), args=cc.args.Composite(x=GatedSave(1, fail="boom")))
            with pytest.raises(
                OSError, match=r"background save of .*bad failed: injected write failure boom"
            ) as info:
                ck.wait_until_finished()
            assert isinstance(info.value.__cause__, OSError)
            ck.wait_until_finished()  # reported once only
            ck.save(store.url("bad2"), args=cc.args.Composite(x=GatedSave(1, fail="again")))
            with pytest.raises(OSError, match="bad2"):
                ck.save(store.url("good"), args=cc.args.Composite(x=GatedSave(3)))
            ck.save(store.url("good"), args=cc.args.Composite(x=GatedSave(3)))
        found = children(store, loop)
        assert found.get("good") is True and "bad" not in found and "bad2" not in found

    def test_timeout_fails_instead_of_hanging(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        ck = cc.AsyncCheckpointer(cc.CompositeCheckpointHandler(), timeout_s=0.5)
        ck.save(store.url("slow"), args=cc.args.Composite(x=GatedSave(1, sleep_s=30)))
        start = time.monotonic()
        with pytest.raises(
            TimeoutError, match=r"slow did not finish within 0s|slow did not finish within 1s"
        ):
            ck.close()
        assert time.monotonic() - start < 10
        assert "slow" not in children(store, loop) or children(store, loop)["slow"] is False

    def test_close_raises_a_pending_failure(self, store: StoreUnderTest) -> None:
        ck = cc.AsyncCheckpointer(cc.CompositeCheckpointHandler())
        ck.save(store.url("x"), args=cc.args.Composite(x=GatedSave(1, fail="at close")))
        with pytest.raises(OSError, match="at close"):
            ck.close()
        with pytest.raises(RuntimeError, match="closed"):
            ck.save(store.url("y"), args=cc.args.Composite(x=GatedSave(1)))


# ------------------------------------------------------------------- CheckpointManager
def manager(store: StoreUnderTest, **options: Any) -> cc.CheckpointManager:
    return cc.CheckpointManager(store.url(), options=cc.CheckpointManagerOptions(**options))


class TestManagerSaving:
    def test_interval_force_and_listing(self, store: StoreUnderTest, loop: LoopThread) -> None:
        with manager(store, save_interval_steps=5) as mngr:
            saved = [s for s in range(12) if mngr.save(s, args=composite(s))]
            assert mngr.save(13, args=composite(13), force=True)
            mngr.wait_until_finished()
            assert saved == [0, 5, 10]
            assert mngr.all_steps() == [0, 5, 10, 13] and mngr.latest_step() == 13
            assert not mngr.should_save(10) and mngr.should_save(15) and not mngr.should_save(16)
            restored = mngr.restore(5).state
            assert restored["step"] == 5 and float(restored["w"][0, 0]) == 5.0
            assert mngr.restore().state["step"] == 13
        assert children(store, loop) == {"0": True, "5": True, "10": True, "13": True}

    def test_discovery_is_one_listing_and_a_check_per_child_and_ignores_foreign_names(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        with manager(store) as mngr:
            for s in (1, 2, 3):
                mngr.save(s, args=composite(s))
        store.raw_put(store.path("notes", "README"), b"someone else's")
        store.raw_put(store.path("1x", "_COMMITTED"), b"{}")  # not a step name
        root = cc.StoragePath.from_url(store.url())  # given to the manager, which uses its backend
        backend = root.backend
        backend.stats.reset()
        options = cc.CheckpointManagerOptions(cleanup_uncommitted_on_start=False)
        with cc.CheckpointManager(root, options=options) as mngr:
            assert mngr.all_steps() == [1, 2, 3]
            # One delimiter listing of the root, then an exact-key marker check per child
            # (1, 2, 3, 1x) and, for the child without one (notes), a claim check: the cost
            # grows with children, never with the objects inside them (issue 14).
            assert dict(backend.stats.calls) == {"list": 1, "exists": 6}
        assert store.raw_get(store.path("notes", "README")) == b"someone else's"

    def test_saving_a_committed_step_touches_nothing(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        with manager(store) as mngr:
            mngr.save(7, args=composite(7))
            mngr.wait_until_finished()
            before = objects(store, loop, "7")
            with pytest.raises(FileExistsError, match=r"step 7 is already committed at .*7"):
                mngr.save(7, args=composite(8), force=True)
            assert objects(store, loop, "7") == before
            assert mngr.restore(7).state["step"] == 7

    def test_step_naming_options(self, store: StoreUnderTest, loop: LoopThread) -> None:
        with manager(store, step_prefix="ckpt", step_format_fixed_length=6) as mngr:
            mngr.save(42, args=composite(42))
            mngr.wait_until_finished()
            assert mngr.all_steps() == [42]
        assert children(store, loop) == {"ckpt_000042": True}
        with pytest.raises(ValueError, match="step_prefix"):
            cc.CheckpointManagerOptions(step_prefix="../up")

    def test_metrics_and_metadata(self, store: StoreUnderTest) -> None:
        with manager(store, enable_async=False) as mngr:
            mngr.save(
                3,
                args=composite(3),
                metrics={"loss": np.float32(0.5), "acc": jnp.asarray(0.9)},
                custom={"git": "abc"},
            )
            meta = mngr.metadata(3)
        assert meta.metrics == {"loss": 0.5, "acc": pytest.approx(0.9)} and meta.custom == {
            "git": "abc"
        }
        assert set(meta.item_handlers) == {"state"}


class TestRetention:
    def test_max_to_keep_and_keep_period(self, store: StoreUnderTest, loop: LoopThread) -> None:
        with manager(store, max_to_keep=2, keep_period=4) as mngr:
            for s in range(10):
                mngr.save(s, args=composite(s))
            mngr.wait_until_finished()
            assert mngr.all_steps() == [0, 4, 8, 9]
        assert children(store, loop) == {"0": True, "4": True, "8": True, "9": True}
        with manager(store, max_to_keep=2, keep_period=4) as again:
            assert again.all_steps() == [0, 4, 8, 9]

    @pytest.mark.parametrize(("mode", "kept", "best"), [("min", [1, 3], 3), ("max", [2, 4], 2)])
    def test_best_k(
        self, store: StoreUnderTest, loop: LoopThread, mode: str, kept: list[int], best: int
    ) -> None:
        losses = [0.5, 0.2, 0.9, 0.1, 0.7]
        opts = {"max_to_keep": 2, "best_fn": lambda m: m["loss"], "best_mode": mode}
        with manager(store, **opts) as mngr:
            for s, loss in enumerate(losses):
                mngr.save(s, args=composite(s), metrics={"loss": loss})
            mngr.wait_until_finished()
            assert mngr.all_steps() == kept and mngr.best_step() == best
        with manager(store, **opts) as again:  # metrics come back from the step metadata
            assert again.all_steps() == kept and again.best_step() == best

    @pytest.mark.parametrize("keep_without", [True, False])
    def test_steps_without_metrics(self, store: StoreUnderTest, keep_without: bool) -> None:
        opts = {
            "max_to_keep": 1,
            "best_fn": lambda m: m["loss"],
            "best_mode": "min",
            "keep_checkpoints_without_metrics": keep_without,
        }
        with manager(store, **opts) as mngr:
            mngr.save(0, args=composite(0))
            mngr.save(1, args=composite(1), metrics={"loss": 0.3})
            mngr.save(2, args=composite(2), metrics={"loss": 0.1})
            mngr.wait_until_finished()
            assert mngr.all_steps() == ([0, 2] if keep_without else [2])

    def test_deletion_does_not_block_save(self, request: pytest.FixtureRequest, tmp_path) -> None:
        store = make_store("file", request, tmp_path)
        with manager(store, max_to_keep=1, enable_async=False) as mngr:
            big = {f"leaf{i}": np.zeros((256, 256), np.float32) for i in range(64)}
            mngr.save(0, args=cc.args.Composite(state=cc.args.StandardSave(big)))
            mngr.wait_until_finished()
            deleting = threading.Event()
            original = atomicity.delete_checkpoint

            async def slow_delete(backend: Any, path: str) -> None:
                deleting.set()
                await asyncio.sleep(1.0)
                await original(backend, path)

            atomicity_module = sys.modules["cloudckpt.engine.manager"].atomicity
            atomicity_module.delete_checkpoint = slow_delete
            try:
                mngr.save(1, args=composite(1))  # triggers the slow deletion of step 0
                assert deleting.wait(5)
                start = time.monotonic()
                mngr.save(2, args=composite(2))
                assert time.monotonic() - start < 0.9  # did not wait for the deletion
                listed = mngr.all_steps()
                assert 2 in listed and 0 not in listed  # step 0 is no longer listed while it goes
                mngr.wait_until_finished()
            finally:
                atomicity_module.delete_checkpoint = original
            assert mngr.all_steps() == [2]

    def test_interrupted_deletion_is_never_listed(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        with manager(store) as mngr:
            mngr.save(1, args=composite(1))
            mngr.save(2, args=composite(2))
        if store.backend.supports_atomic_rename:
            loop.run(
                store.backend.rename(
                    store.path("1"), store.path("1" + atomicity.TMP_INFIX + "deleting-x")
                )
            )
        else:
            loop.run(store.backend.delete(store.path("1", atomicity.MARKER_NAME)))
        with manager(store, cleanup_uncommitted_on_start=False) as mngr:
            assert mngr.all_steps() == [2]


class TestStartupCleanup:
    def _crashed_step(self, store: StoreUnderTest, loop: LoopThread, name: str) -> None:
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        dead = dataclasses.replace(atomicity.Claim.new(), pid=proc.pid)
        strategy = store.backend.default_temporary_path_class()
        tmp = strategy(store.path(name), store.backend, dead)
        store.raw_put(f"{tmp.get()}/{atomicity.CLAIM_NAME}", dead.to_bytes())
        store.raw_put(f"{tmp.get()}/state/arrays/0/c/0", b"partial")

    def test_crash_leftovers_are_removed_and_committed_kept(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        with manager(store) as mngr:
            mngr.save(1, args=composite(1))
        self._crashed_step(store, loop, "2")
        assert len(children(store, loop)) == 2
        with manager(store) as mngr:
            mngr.wait_until_finished()
            assert mngr.all_steps() == [1]
        assert children(store, loop) == {"1": True}

    def test_cleanup_can_be_disabled(self, store: StoreUnderTest, loop: LoopThread) -> None:
        self._crashed_step(store, loop, "5")
        with manager(store, cleanup_uncommitted_on_start=False) as mngr:
            mngr.wait_until_finished()
        assert list(children(store, loop).values()) == [False]


class TestRacingWriters:
    """A restarted job and its zombie writing the same step of the same root."""

    def test_the_zombie_keeps_its_claim(self, store: StoreUnderTest, loop: LoopThread) -> None:
        """Object stores: the second writer fails at its claim, before its first byte.

        On POSIX each attempt writes its own temporary directory and the first
        rename wins; the loser fails at its rename. Either way one commits,
        entirely.
        """
        GATES["zombie"], WAITING["zombie"] = threading.Event(), threading.Event()
        zombie = manager(store)
        fresh = manager(store)
        try:
            zombie.save(5, args=cc.args.Composite(x=GatedSave(111, gate="zombie")))
            # The zombie has claimed step 5 and is writing (a fixed sleep was not always enough
            # on a loaded machine: the fresh job then claimed first).
            assert WAITING["zombie"].wait(30)
            fresh.save(5, args=cc.args.Composite(x=GatedSave(222)))
            if store.backend.supports_atomic_rename:
                fresh.wait_until_finished()  # the fresh job renames first
                GATES["zombie"].set()
                with pytest.raises(FileExistsError, match="already committed"):
                    zombie.wait_until_finished()
                winner = 222
            else:
                with pytest.raises(FileExistsError, match="another save is in progress"):
                    fresh.wait_until_finished()
                assert objects(store, loop, "5") == {"_CLAIM"}  # nothing of the loser's
                GATES["zombie"].set()
                zombie.wait_until_finished()
                winner = 111
        finally:
            GATES["zombie"].set()
            zombie.close()
            fresh.close()
        with manager(store) as reader:
            assert reader.all_steps() == [5] and reader.restore(5).x == winner
        assert objects(store, loop, "5") == {"_CLAIM", "_COMMITTED", "_CHECKPOINT_METADATA", "x/v"}

    def test_concurrent_saves_have_one_winner(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        a, b = manager(store), manager(store)
        errors: list[BaseException] = []

        def run(m: cc.CheckpointManager, value: int) -> None:
            try:
                m.save(9, args=cc.args.Composite(x=GatedSave(value, sleep_s=0.05)))
                m.wait_until_finished()
            except FileExistsError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(m, v)) for m, v in ((a, 1), (b, 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        a.close()
        b.close()
        assert len(errors) == 1
        with manager(store) as reader:
            assert reader.restore(9).x in (1, 2)
            assert set(objects(store, loop, "9")) == {
                "_CLAIM",
                "_COMMITTED",
                "_CHECKPOINT_METADATA",
                "x/v",
            }

    def test_startup_cleanup_spares_a_live_writer(
        self, store: StoreUnderTest, loop: LoopThread
    ) -> None:
        GATES["live"] = threading.Event()
        writer = manager(store)
        try:
            writer.save(3, args=cc.args.Composite(x=GatedSave(3, gate="live")))
            time.sleep(0.3)
            with manager(store) as restarted:  # its start-up clean-up runs now
                restarted.wait_until_finished()
            GATES["live"].set()
            writer.wait_until_finished()
        finally:
            GATES["live"].set()
            writer.close()
        with manager(store) as reader:
            assert reader.all_steps() == [3] and reader.restore(3).x == 3


PREEMPTION_SCRIPT = """
import os, signal, sys
import jax
from cloudckpt.testing.servers import free_port
jax.distributed.initialize(f"127.0.0.1:{free_port()}", num_processes=1, process_id=0)
import cloudckpt as cc
mngr = cc.CheckpointManager(sys.argv[1], options=cc.CheckpointManagerOptions(save_interval_steps=1000))
os.kill(os.getpid(), signal.SIGTERM)  # what a cluster sends before preempting
saved = []
for step in range(1, 400):
    if mngr.save(step, args=cc.args.Composite(meta=cc.args.JsonSave({"step": step}))):
        saved.append(step)
        break
    import time; time.sleep(0.01)
mngr.close()
print("SAVED", saved)
jax.distributed.shutdown()
"""


def test_preemption_point_saves_an_undue_step(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PREEMPTION_SCRIPT, str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    saved = eval(out.stdout.split("SAVED", 1)[1])
    assert len(saved) == 1 and saved[0] % 1000 != 0
    assert (tmp_path / "run" / str(saved[0]) / "_COMMITTED").exists()
