"""Name-hostility matrix: names that are legal keys but look like patterns or escapes.

``[ ] * ? { } ! # % + = @ , ;``, spaces, unicode, ``%2F`` and trailing dots
are legal in S3 and GCS keys and in POSIX file names. For each character
class, one hostile name is used at once as a root, a step name, an item
name and a leaf key, on every backend (memory, file, S3 on SeaweedFS, GCS on
fake-gcs-server), through save, restore, listing (``all_steps``,
``cloudckpt ls``), retention (``max_to_keep``), ``gc``, ``rm``, ``cp`` and
``verify``. Beside it lives a sibling run whose names differ by exactly
those characters (``exp[1]`` vs ``exp1``: what a glob or a URL decoder would
confuse it with); after every operation the sibling must hold the same
objects with the same bytes.

Both servers store keys verbatim, as S3 and GCS do, so these tests stand
for the real clouds' behaviour.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import atomicity
import cloudckpt as cc
from cloudckpt.cli import main
from cloudckpt.engine.loop import LoopThread

from .backend_harness import ALL_KINDS, StoreUnderTest, make_store

#: (class, hostile name, sibling that a glob / decoder / normaliser would confuse it with)
NAMES = [
    ("brackets", "exp[1]", "exp1"),
    ("star-question", "run*?", "runXY"),
    ("punctuation", "p{q}!#+=@,;", "pq"),
    ("space-unicode", "ünï côdé 1", "ünïcôdé1"),
    ("percent-2F", "a%2Fb", "a/b"),
    ("trailing-dot", "run.", "run"),
]


def _registry() -> cc.HandlerRegistry:
    # Small thresholds: a small tree gets both zarr arrays and packed leaves.
    pytree = cc.StandardCheckpointHandler(pack_below_bytes=1024, inner_chunk_bytes=1024)
    registry = cc.HandlerRegistry()
    registry.add(None, cc.args.StandardSave, pytree)
    registry.add(None, cc.args.StandardRestore, pytree)
    registry.add(None, cc.args.JsonSave, cc.JsonCheckpointHandler)
    registry.add(None, cc.args.JsonRestore, registry.get(None, cc.args.JsonSave))
    return registry


def _item_name(name: str) -> str:
    return name.replace("/", "")  # item names are one path component


def _tree(name: str, sibling: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            name: rng.standard_normal((64, 16)).astype(np.float32),  # zarr array
            sibling: rng.standard_normal(8).astype(np.float32),  # packed leaf
        },
        "tag": f"{name}-{seed}",
    }


def _args(name: str, sibling: str, seed: int) -> cc.args.Composite:
    items: dict[str, Any] = {
        "state": cc.args.StandardSave(_tree(name, sibling, seed)),
        _item_name(name): cc.args.JsonSave({"who": name, "seed": seed}),
        _item_name(sibling): cc.args.JsonSave({"who": sibling, "seed": seed}),
    }
    return cc.args.Composite(**items)


def _check_restored(restored: Any, name: str, sibling: str, seed: int) -> None:
    want = _tree(name, sibling, seed)
    got = restored["state"]
    for key in (name, sibling):
        assert np.asarray(got["params"][key]).tobytes() == want["params"][key].tobytes(), key
    assert got["tag"] == want["tag"]
    assert restored[_item_name(name)] == {"who": name, "seed": seed}
    assert restored[_item_name(sibling)] == {"who": sibling, "seed": seed}


class Snapshot:
    """Every object under a directory: its size after each operation, its bytes at the end.

    Bytes are read around the backend (raw clients, plain files).
    """

    def __init__(self, store: StoreUnderTest, loop: LoopThread, path: str) -> None:
        self.store, self.loop, self.path = store, loop, path
        self.sizes = self._sizes()
        assert self.sizes, f"nothing stored under {path}"
        self.data = {key: store.raw_get(key) for key in self.sizes}

    def _sizes(self) -> dict[str, int]:
        async def listing() -> dict[str, int]:
            return {
                info.path: info.size async for info in self.store.backend.list_prefix(self.path)
            }

        return self.loop.run(listing())

    def assert_untouched(self, after: str, *, read_bytes: bool = False) -> None:
        now = self._sizes()
        lost = sorted(set(self.sizes) - set(now))
        added = sorted(set(now) - set(self.sizes))
        changed = sorted(k for k in self.sizes if k in now and now[k] != self.sizes[k])
        if read_bytes:
            changed += sorted(k for k in self.data if self.store.raw_get(k) != self.data[k])
        assert not (lost or added or changed), (
            f"{after} touched the sibling {self.path}: lost {lost[:3]}, added {added[:3]}, "
            f"changed {changed[:3]}"
        )


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _manager(url: str, max_to_keep: int | None) -> cc.CheckpointManager:
    return cc.CheckpointManager(
        url,
        cc.CompositeCheckpointHandler(handler_registry=_registry()),
        options=cc.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async=False),
    )


def _save_step(url: str, name: str, sibling: str, seed: int) -> None:
    handler = cc.CompositeCheckpointHandler(handler_registry=_registry())
    with cc.Checkpointer(handler) as ckptr:
        ckptr.save(url, args=_args(name, sibling, seed))


def _restore(url: str) -> Any:
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(url)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize(("cls", "name", "sibling"), NAMES, ids=[n[0] for n in NAMES])
def test_hostile_names_address_only_themselves(
    kind: str,
    cls: str,
    name: str,
    sibling: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    loop: LoopThread,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = make_store(kind, request, tmp_path)
    hostile_root, sibling_root = store.path(name), store.path(sibling)
    h_url, s_url = store.url(name), store.url(sibling)

    # The sibling run: steps 1 and 2 (nothing deleted) and a step named after it.
    with _manager(s_url, max_to_keep=None) as mngr:
        for step in (1, 2):
            mngr.save(step, args=_args(sibling, name, step))
    _save_step(f"{s_url}/{sibling}", sibling, name, 10)
    sib = Snapshot(store, loop, sibling_root)

    # Save and retention: max_to_keep=1 deletes hostile step 1, not the sibling's.
    with _manager(h_url, max_to_keep=1) as mngr:
        for step in (1, 2):
            mngr.save(step, args=_args(name, sibling, step))
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2]
        _check_restored(mngr.restore(2), name, sibling, 2)
    sib.assert_untouched("save and retention")

    # An abandoned save of step 1 of the hostile run, which retention just deleted; made
    # now so that its zero-grace claim has aged past its grace by the time gc runs.
    backend = store.backend
    attempt = backend.default_temporary_path_class().from_final(
        f"{hostile_root}/1", backend, grace_s=0
    )
    debris = f"{loop.run(attempt.create())}/state/pytree.json"
    loop.run(backend.put(debris, b"half-written"))
    abandoned_at = time.monotonic()
    _save_step(f"{h_url}/{name}", name, sibling, 20)
    _check_restored(_restore(f"{h_url}/{name}"), name, sibling, 20)
    sib.assert_untouched("save of a hostile step name")

    # ls and verify.
    code, out, err = _cli(capsys, "ls", "--json", h_url)
    assert code == 0, err
    assert sorted(r["name"] for r in json.loads(out)) == sorted(["2", name])
    for step in ("2", name):
        code, out, err = _cli(capsys, "verify", "--json", f"{h_url}/{step}")
        assert code == 0 and json.loads(out)["ok"] is True, (out, err)
    sib.assert_untouched("ls and verify")

    # cp: to a directory already holding a copy of the sibling's step.
    copies = store.url("copies")
    code, _, err = _cli(capsys, "cp", f"{s_url}/{sibling}", f"{copies}/{sibling}")
    assert code == 0, err
    sib_copy = Snapshot(store, loop, store.path("copies", sibling))
    code, _, err = _cli(capsys, "cp", f"{h_url}/{name}", f"{copies}/{name}")
    assert code == 0, err
    _check_restored(_restore(f"{copies}/{name}"), name, sibling, 20)
    sib_copy.assert_untouched("cp")
    sib.assert_untouched("cp")

    # gc: the abandoned save of step 1 made after retention (the sibling has a step 1).
    if not backend.supports_atomic_rename:
        # Staleness is judged by the store's clock (whole seconds on S3 and GCS):
        # the zero-grace claim must be visibly older than its grace.
        time.sleep(max(0.0, abandoned_at + 1.1 - time.monotonic()))
    code, out, err = _cli(capsys, "gc", "--yes", h_url)
    assert code == 0 and "deleted 1 uncommitted step" in out, (out, err)
    assert loop.run(backend.exists(debris)) is False
    sib.assert_untouched("gc")
    code, out, _ = _cli(capsys, "ls", "--json", "--all", h_url)
    assert sorted(r["name"] for r in json.loads(out)) == sorted(["2", name])

    # rm: a hostile step name, then a manager step of the hostile root.
    for step in (name, "2"):
        code, _, err = _cli(capsys, "rm", "--yes", f"{h_url}/{step}")
        assert code == 0, err
        assert loop.run(atomicity.is_committed(store.backend, f"{hostile_root}/{step}")) is False
        sib.assert_untouched(f"rm of step {step!r}")
    sib_copy.assert_untouched("rm", read_bytes=True)
    sib.assert_untouched("everything", read_bytes=True)
    with _manager(s_url, max_to_keep=None) as mngr:
        assert mngr.all_steps() == [1, 2]
        _check_restored(mngr.restore(1), sibling, name, 1)


#: Keys that a glob, a version-id parser or a URL decoder would read as something else,
#: each with the innocent key it could be confused with.
CONFUSABLE = [
    ("exp[1]/a", "exp1/a"),
    ("run*/a", "runX/a"),
    ("a?b/c", "aXb/c"),
    ("x{a,b}/c", "xa/c"),
    ("v?versionId=1/c", "v/c"),
    ("g#1/c", "g/c"),
    ("a%2Fb/c", "a/b/c"),
    ("dot./c", "dot/c"),
    ("sp ace/c", "sp+ace/c"),
]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_backend_calls_address_exactly_the_keys_given(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, loop: LoopThread
) -> None:
    store = make_store(kind, request, tmp_path)
    backend = store.backend
    everything = [k for pair in CONFUSABLE for k in pair]
    for key in everything:
        loop.run(backend.put(store.path(key), key.encode()))

    async def listing(prefix: str) -> list[str]:
        return sorted([i.path async for i in backend.list_prefix(prefix)])

    raw_get = _exact_raw_get(store)
    for hostile, _ in CONFUSABLE:
        assert loop.run(backend.get(store.path(hostile))) == hostile.encode()
        assert raw_get(store.path(hostile)) == hostile.encode()
        top = hostile.rsplit("/", 1)[0]
        assert loop.run(listing(store.path(top))) == [store.path(hostile)], top
    assert loop.run(listing(store.root)) == sorted(store.path(k) for k in everything)

    # Delete every hostile key (one batch) and one hostile prefix: the innocent keys stay.
    hostile_keys = [store.path(h) for h, _ in CONFUSABLE[1:]]
    loop.run(backend.delete_many(hostile_keys))
    loop.run(backend.delete_prefix(store.path("exp[1]")))
    innocent = sorted(store.path(i) for _, i in CONFUSABLE)
    assert loop.run(listing(store.root)) == innocent
    for _, key in CONFUSABLE:
        assert raw_get(store.path(key)) == key.encode()


def _exact_raw_get(store: StoreUnderTest) -> Callable[[str], bytes | None]:
    """The harness's raw reader, except on S3: s3fs itself cuts keys at ``?versionId=``."""
    if store.name != "s3":
        return store.raw_get
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=os.environ["AWS_ENDPOINT_URL"],
        region_name=os.environ["AWS_REGION"],
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    )

    def get(path: str) -> bytes | None:
        bucket, _, key = path.partition("/")
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    return get
