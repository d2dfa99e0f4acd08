"""Issue 12's five reproductions, each paused exactly between a check and its act, on real stores.

:class:`PausingStore` sits in front of the backend under test (memory, file,
SeaweedFS S3, fake-gcs-server) and stops a named actor just before a chosen
request, until the test lets it go; everything else reaches the real server.
Issue 11 items 9 (hostile claims) and 15 (file commit durability, temporary
names) are tested here too.
"""

from __future__ import annotations

import ast
import asyncio
import contextvars
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

import atomicity
import cloudckpt as cc
from atomicity import (
    CLAIM_NAME,
    MARKER_NAME,
    AtomicRenamePath,
    Claim,
    ClaimLostError,
    CommitMarkerPath,
    ObjectInfo,
    Versioned,
)
from cloudckpt import cli
from cloudckpt.engine.loop import LoopThread
from cloudckpt.storage.gcs import tensorstore_environment
from cloudckpt.testing.faultproxy import FaultProxy
from cloudckpt.testing.servers import LocalServers

from .backend_harness import StoreUnderTest, make_store
from .helpers import BUCKET, unique

ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("actor", default="")


class PausingStore:
    """The backend under test, with gates that hold one actor just before one request."""

    def __init__(self, backend: Any) -> None:
        self.b = backend
        self._gates: dict[tuple[str, str], tuple[asyncio.Event, asyncio.Event]] = {}

    @property
    def supports_atomic_rename(self) -> bool:
        return self.b.supports_atomic_rename

    @property
    def supports_conditional_delete(self) -> bool:
        return self.b.supports_conditional_delete

    def gate(self, actor: str, op: str) -> tuple[asyncio.Event, asyncio.Event]:
        """(reached, release): ``actor`` stops before its next ``op`` until ``release`` is set."""
        events = (asyncio.Event(), asyncio.Event())
        self._gates[(actor, op)] = events
        return events

    async def _at(self, op: str) -> None:
        gate = self._gates.pop((ACTOR.get(), op), None)
        if gate is not None:
            gate[0].set()
            await gate[1].wait()

    async def get(self, path: str) -> bytes | None:
        await self._at("get")
        return await self.b.get(path)

    async def exists(self, path: str) -> bool:
        await self._at("exists")
        return await self.b.exists(path)

    async def put(self, path: str, data: bytes) -> None:
        await self._at("put")
        await self.b.put(path, data)

    async def put_if_absent(self, path: str, data: bytes) -> bool:
        await self._at("put_if_absent")
        return await self.b.put_if_absent(path, data)

    async def get_versioned(self, path: str) -> Versioned | None:
        await self._at("get_versioned")
        return await self.b.get_versioned(path)

    async def put_versioned(self, path: str, data: bytes, *, if_version: str | None) -> str | None:
        await self._at("create" if if_version is None else "replace_if")
        return await self.b.put_versioned(path, data, if_version=if_version)

    async def delete_versioned(self, path: str, version: str) -> bool:
        await self._at("delete_if")
        return await self.b.delete_versioned(path, version)

    async def now(self, path: str) -> float:
        await self._at("now")
        return await self.b.now(path)

    async def list_prefix(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        await self._at("list")
        async for info in self.b.list_prefix(prefix):
            yield info

    async def delete(self, path: str) -> None:
        await self._at("delete")
        await self.b.delete(path)

    async def delete_many(self, paths: Iterable[str]) -> None:
        await self._at("delete_many")
        await self.b.delete_many(paths)

    async def delete_prefix(self, prefix: str) -> None:
        await self._at("delete_prefix")
        await self.b.delete_prefix(prefix)

    async def rename(self, src: str, dst: str, *, claim_version: str | None = None) -> None:
        await self._at("rename")
        await self.b.rename(src, dst, claim_version=claim_version)


@pytest.fixture(params=["memory", "s3", "gcs"])
def ostore(request: pytest.FixtureRequest, tmp_path: Any) -> StoreUnderTest:
    return make_store(request.param, request, tmp_path)


def _listing(store: StoreUnderTest, loop: LoopThread, prefix: str) -> dict[str, bytes]:
    async def collect() -> dict[str, bytes]:
        out = {}
        async for info in store.backend.list_prefix(prefix):
            out[info.path[len(prefix) + 1 :]] = await store.backend.get(info.path) or b""
        return out

    return loop.run(collect())


def _put_claim(store: StoreUnderTest, loop: LoopThread, step: str, claim: Claim) -> None:
    loop.run(store.backend.put(f"{step}/{CLAIM_NAME}", claim.to_bytes()))


async def _as(actor: str, coro: Any) -> Any:
    ACTOR.set(actor)
    return await coro


async def _save(tmp: Any, store: Any, payload: bytes) -> None:
    """One writer: claim, two objects under its attempt's own names, commit."""
    await tmp.create()
    where = atomicity.attempt_dir(tmp.get(), tmp.claim.attempt)
    for key in ("a", "b"):
        await store.put(f"{where}/{key}", payload + key.encode())
    await tmp.finalize()


def _stale(grace_s: float = 0.5) -> Claim:
    return Claim.new(grace_s, "crashed-attempt")


def test_fenced_takeover_two_writers_one_winner_repro1(
    ostore: StoreUnderTest, loop: LoopThread
) -> None:
    """Both writers judge the same stale claim, pause, then take over: exactly one wins."""
    step = ostore.path("5")
    _put_claim(ostore, loop, step, _stale())
    loop.run(ostore.backend.put(f"{step}/@crashed-attempt/a", b"debris"))
    time.sleep(1.5)  # stale by the store's clock (S3 reports whole seconds)
    store = PausingStore(ostore.backend)

    async def race() -> list[BaseException | None]:
        gates = {name: store.gate(name, "replace_if") for name in ("A", "B")}
        writers = {
            name: CommitMarkerPath.from_final(step, store, attempt=f"{name}-attempt")  # type: ignore[arg-type]
            for name in ("A", "B")
        }
        tasks = {
            name: asyncio.ensure_future(_as(name, _save(writers[name], store, name.encode())))
            for name in ("A", "B")
        }
        for reached, _ in gates.values():  # both judged the claim stale and stopped
            await reached.wait()
        for _, release in gates.values():
            release.set()
        return list(await asyncio.gather(*tasks.values(), return_exceptions=True))

    results = loop.run(race())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], FileExistsError), results
    winner = "A" if results[0] is None else "B"
    objects = _listing(ostore, loop, step)
    assert objects.pop(f"@{winner}-attempt/a") == winner.encode() + b"a"
    assert objects.pop(f"@{winner}-attempt/b") == winner.encode() + b"b"
    assert set(objects) == {CLAIM_NAME, MARKER_NAME}, objects  # no loser bytes, no debris
    assert atomicity.marker_attempt(objects[MARKER_NAME]) == f"{winner}-attempt"


def test_cleanup_paused_after_judging_loses_to_new_writer_repro2(
    ostore: StoreUnderTest, loop: LoopThread
) -> None:
    """Clean-up judges a claim stale and pauses; a writer takes the step and commits."""
    step = ostore.path("5")
    _put_claim(ostore, loop, step, _stale())
    time.sleep(1.5)
    store = PausingStore(ostore.backend)

    async def race() -> list[str]:
        reached, release = store.gate("cleanup", "replace_if")
        cleaner = asyncio.ensure_future(
            _as("cleanup", atomicity.cleanup_uncommitted(store, ostore.root))  # type: ignore[arg-type]
        )
        await reached.wait()  # judged stale, not yet fenced
        tmp = CommitMarkerPath.from_final(step, store, attempt="new-writer")  # type: ignore[arg-type]
        await _as("writer", _save(tmp, store, b"W"))
        release.set()
        return await cleaner

    deleted = loop.run(race())
    assert deleted == []
    objects = _listing(ostore, loop, step)
    assert objects == {
        CLAIM_NAME: objects[CLAIM_NAME],
        MARKER_NAME: b'{"committed_attempt": "new-writer"}',
        "@new-writer/a": b"Wa",
        "@new-writer/b": b"Wb",
    }
    assert loop.run(atomicity.list_committed(ostore.backend, ostore.root))[0].name == "5"


@pytest.mark.parametrize("kind", ["memory", "file", "s3", "gcs"])
def test_writer_paused_past_grace_cannot_commit_repro3(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    """The writer checks, pauses past its grace, clean-up revokes it: the commit is refused."""
    under = make_store(kind, request, tmp_path)
    store = PausingStore(under.backend)
    strategy = under.backend.default_temporary_path_class()
    op = "rename" if kind == "file" else "replace_if"

    async def run() -> BaseException | None:
        tmp = strategy.from_final(under.path("9"), store, attempt="slow-writer", grace_s=1.0)  # type: ignore[arg-type]
        await _as("writer", tmp.create())
        await _as("writer", store.put(f"{tmp.get()}/data", b"d"))
        reached, release = store.gate("writer", op)
        writer = asyncio.ensure_future(_as("writer", tmp.finalize()))
        await reached.wait()  # about to make the commit request
        await asyncio.sleep(2.5)
        deleted = await atomicity.cleanup_uncommitted(under.backend, under.root)
        assert deleted == [tmp.get()]
        release.set()
        try:
            await writer
        except BaseException as exc:
            return exc
        return None

    error = loop.run(run())
    assert isinstance(error, ClaimLostError), error
    assert loop.run(atomicity.list_committed(under.backend, under.root)) == []
    assert not loop.run(under.backend.exists(under.path("9", MARKER_NAME)))


# ------------------------------------------------------------------------ repro 4
def _slow_commit(kind: str, delay_s: float, hits: list[str]) -> Any:
    """Delays the answer (not the effect) of the request that moves a claim to ``committed``."""

    def delay(method: str, path_qs: str, headers: Any, body: bytes) -> float:
        if kind == "s3":
            hit = (
                method == "PUT"
                and "If-Match" in headers
                and path_qs.split("?")[0].endswith(CLAIM_NAME)
            )
        else:
            hit = (
                method == "POST"
                and "ifGenerationMatch=" in path_qs
                and "ifGenerationMatch=0" not in path_qs
            )
        if hit and b'"committed"' in body:
            hits.append(path_qs)
            return delay_s
        return 0.0

    return delay


@pytest.mark.parametrize("adaptive", [False, True], ids=["static", "adaptive"])
@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_timeout_while_commit_in_flight_reports_the_truth_repro4(
    kind: str,
    adaptive: bool,
    servers: LocalServers,
    loop: LoopThread,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AsyncCheckpointer(timeout_s=4): the commit lands but its answer comes 8 s late.

    ``static``: one attempt may take longer than the timeout, so the timeout meets the
    commit in flight and must find out (read back) that it committed. ``adaptive``: the
    library's default deadlines may cut the held attempt and resend it; whatever the
    caller is told must be what storage holds (I4).
    """
    from cloudckpt.storage import Deadlines

    upstream = servers.s3.endpoint if kind == "s3" else servers.gcs.endpoint
    hits: list[str] = []
    slow = _slow_commit(kind, 8.0, hits)
    deadlines = Deadlines() if adaptive else Deadlines(cut_min_s=30, hedge_min_s=30)
    with FaultProxy(upstream, fault_rate=0.0, flavor=kind, delay=slow) as proxy:
        if kind == "gcs":
            # A save checks (before any I/O) that tensorstore would reach the same
            # endpoint as the backend: here, the proxy.
            for key, value in tensorstore_environment(proxy.endpoint).items():
                monkeypatch.setenv(key, value)
        scheme = "s3" if kind == "s3" else "gs"
        url = f"{scheme}://{BUCKET}/{unique('timeout')}/1"
        ck = cc.AsyncCheckpointer(
            cc.CompositeCheckpointHandler(),
            timeout_s=4.0,
            storage_options={"endpoint_url": proxy.endpoint, "deadlines": deadlines},
        )
        ck.save(url, args=cc.args.Composite(meta=cc.args.JsonSave({"step": 1})))
        start = time.monotonic()
        try:
            ck.wait_until_finished()
            reported = True
        except TimeoutError:
            reported = False
        ck.close()
    assert hits and set(hits) == {hits[0]}, hits  # only the commit request was held
    assert time.monotonic() - start < 60
    if not adaptive:
        # The one commit request landed; its answer came after the timeout.
        assert reported and len(hits) == 1, hits
    root = url.rsplit("/", 1)[0]
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as reader:
        committed = [c.name for c in reader.run_on_loop(_committed(reader, root), 60)]
        assert committed == (["1"] if reported else []), (reported, committed)
        if reported:
            assert reader.restore(url).meta == {"step": 1}


async def _committed(reader: Any, root: str) -> list[Any]:
    location = reader.location(root)
    return await atomicity.list_committed(location.backend, location.path)


def test_timeout_before_commit_never_commits_later_repro4(
    request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    """The commit request is held; the timeout revokes the claim, so it can never land."""
    under = make_store("memory", request, tmp_path)
    store = PausingStore(under.backend)

    async def run() -> bool:
        tmp = CommitMarkerPath.from_final(under.path("1"), store, attempt="timed-out")  # type: ignore[arg-type]
        await _as("writer", tmp.create())
        reached, release = store.gate("writer", "replace_if")
        writer = asyncio.ensure_future(_as("writer", tmp.finalize()))
        await reached.wait()
        writer.cancel()  # the timeout
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await writer
        committed = await tmp.abort()
        # A late duplicate of the commit request: refused, the claim is revoked.
        late = await tmp._put_claim(tmp.claim.next(atomicity.COMMITTED), tmp._version)
        return committed or late is not None

    assert loop.run(run()) is False
    assert loop.run(atomicity.list_committed(under.backend, under.root)) == []
    assert _listing(under, loop, under.path("1")) == {}


# ------------------------------------------------------------------------ repro 5
def _gc(url: str, *extra: str) -> dict[str, Any]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["gc", url, "--json", *extra], stdout=out, stderr=err)
    assert status == 0, err.getvalue()
    return json.loads(out.getvalue())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_liveness_hints_are_not_proof_repro5(ostore: StoreUnderTest, loop: LoopThread) -> None:
    """Same hostname but another PID namespace, and a writer clock 61 minutes behind: spared."""
    other_container = dataclasses.replace(
        Claim.new(3600, "other-container"), pid=_dead_pid(), pidns="4026531836:999999"
    )
    skewed = dataclasses.replace(
        Claim.new(3600, "skewed-clock"), created_ns=time.time_ns() - 61 * 60 * 10**9
    )
    gone = dataclasses.replace(Claim.new(3600, "really-gone"), pid=_dead_pid())
    for name, claim in (("1", other_container), ("2", skewed), ("3", gone)):
        _put_claim(ostore, loop, ostore.path(name), claim)
        loop.run(ostore.backend.put(ostore.path(name, "data"), b"x"))
    assert other_container.host == socket.gethostname()
    report = _gc(ostore.url(), "--yes")
    actions = {e["name"]: e["action"] for e in report["entries"]}
    assert actions == {"1": "spare", "2": "spare", "3": "deleted"}, report
    assert loop.run(ostore.backend.exists(ostore.path("1", "data")))
    assert loop.run(ostore.backend.exists(ostore.path("2", "data")))
    assert not loop.run(ostore.backend.exists(ostore.path("3", "data")))


# ------------------------------------------------------------------ issue 11 item 9
@pytest.mark.parametrize("pid", [2**40, -5, "12", 1.5, None, True])
def test_hostile_claim_pid_never_crashes(
    pid: Any, request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    under = make_store("memory", request, tmp_path)
    hostile = json.loads(Claim.new(3600, "hostile").to_bytes())
    hostile["claim"]["pid"] = pid
    loop.run(under.backend.put(under.path("7", CLAIM_NAME), json.dumps(hostile).encode()))
    loop.run(under.backend.put(under.path("7", "x"), b"x"))
    report = _gc(under.url())
    assert [e["action"] for e in report["entries"]] == ["spare"]  # fresh: its owner may be alive
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["ls", "-a", under.url(), "--json"], stdout=out, stderr=err) == 0, (
        err.getvalue()
    )
    assert "7" in out.getvalue()
    with (
        cc.Checkpointer(cc.CompositeCheckpointHandler()) as ck,
        pytest.raises(FileExistsError, match="another save is in progress"),
    ):
        ck.save(under.url("7"), args=cc.args.Composite(meta=cc.args.JsonSave(1)))


@pytest.mark.parametrize(
    "text",
    [b"", b"{", b"[]", b'{"claim": []}', b'{"claim": {"attempt": 5}}', b"\xff" * 10, b"[" * 5000],
)
def test_unreadable_claims_are_judged_by_age_never_crash(text: bytes) -> None:
    assert Claim.from_bytes(text) is None
    fresh = Versioned(text, "v1", time.time())
    assert atomicity.judge(None, fresh, time.time()) == (
        False,
        "unreadable claim, recently written: left alone for now",
    )
    assert atomicity.judge(None, fresh, time.time() + 2 * atomicity.DEFAULT_GRACE_S)[0]


# ----------------------------------------------------------------- issue 11 item 15
def test_each_attempt_gets_its_own_temporary_directory(
    request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    """Attempt ids share their first 16 characters for a checkpointer's first 99 saves."""
    under = make_store("file", request, tmp_path)
    first, second = (
        AtomicRenamePath.from_final(under.path("3"), under.backend, attempt=f"0123456789ab{n:06d}")
        for n in (1, 2)
    )
    assert first.get() != second.get()
    loop.run(first.create())
    loop.run(second.create())  # the second attempt is not refused, nor mixed with the first
    loop.run(under.backend.put(f"{second.get()}/x", b"2"))
    loop.run(second.finalize())
    assert under.raw_get(under.path("3", "x")) == b"2"


def test_file_commit_fsyncs_the_parent_after_the_rename(tmp_path: Any) -> None:
    """The rename that commits a step is followed by an fsync of the parent directory."""
    script = f"""
import asyncio, os, sys
sys.path.insert(0, {os.getcwd()!r})
from cloudckpt.storage.file import FileBackend
from atomicity import AtomicRenamePath
events = []
root = {str(tmp_path / "root")!r}
def hook(event, args):
    if event == "os.rename" and root in str(args[0]):
        events.append(("rename", str(args[1])))
    elif event == "open" and events and events[-1][0] == "rename" and args[0] == root:
        events.append(("open-parent", args[0]))
sys.addaudithook(hook)
backend = FileBackend()
async def main():
    tmp = AtomicRenamePath.from_final(root + "/5", backend)
    await tmp.create()
    await backend.put(tmp.get() + "/x", b"1")
    await tmp.finalize()
asyncio.run(main())
print(events)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    events = ast.literal_eval(out.strip().splitlines()[-1])
    renames = [i for i, e in enumerate(events) if e == ("rename", str(tmp_path / "root" / "5"))]
    assert renames, events
    assert ("open-parent", str(tmp_path / "root")) in events[renames[-1] :], events


# -------------------------------------------------------------------- end to end
@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_fenced_end_to_end_two_async_checkpointers_one_step(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    """Two AsyncCheckpointers save the same step over a crashed job's stale claim."""
    import numpy as np

    under = make_store(kind, request, tmp_path)
    stale = dataclasses.replace(Claim.new(3600, "crashed"), pid=_dead_pid())
    _put_claim(under, loop, under.path("5"), stale)
    loop.run(under.backend.put(under.path("5", "meta", "data.json"), b"debris"))
    states = {name: np.arange(1000, dtype=np.float32) * (i + 2) for i, name in enumerate("AB")}
    checkpointers = [cc.AsyncCheckpointer(cc.CompositeCheckpointHandler()) for _ in states]
    errors: dict[str, BaseException | None] = {}
    for ck, (name, state) in zip(checkpointers, states.items(), strict=True):
        ck.save(
            under.url("5"),
            args=cc.args.Composite(
                state=cc.args.StandardSave({"w": state}), meta=cc.args.JsonSave(name)
            ),
        )
    for ck, name in zip(checkpointers, states, strict=True):
        try:
            ck.wait_until_finished()
            errors[name] = None
        except Exception as exc:
            errors[name] = exc
        ck.close()
    winners = [name for name, error in errors.items() if error is None]
    assert len(winners) == 1, errors
    loser = next(name for name in errors if name not in winners)
    assert isinstance(errors[loser], FileExistsError), errors[loser]
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as reader:
        restored = reader.restore(under.url("5"))
    assert restored.meta == winners[0]
    np.testing.assert_array_equal(restored.state["w"], states[winners[0]])
