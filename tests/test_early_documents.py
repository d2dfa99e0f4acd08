"""A restore's documents are fetched beside its commit check, and used only if the marker commits
them (issue 18: round trips before the data; cloudckpt.format.early).

A restore used to wait for the commit marker, then the step metadata, then each item's
``pytree.json``, one round trip after another. Now their GETs go out together. A proxy in front of
the real server holds the marker's GET until the documents' answers have come back from the
server: a restore that asks for its documents only after the check would leave the proxy waiting
out its hold. The same proxy can pause exactly there while the step is replaced by another save:
the documents already read are then the replaced save's, and the restore must notice (they name
another attempt than the new marker) and read them again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest

import cloudckpt as cc
from cloudckpt.storage.deadline import Deadlines
from cloudckpt.testing.faultproxy import LoopbackProxy
from cloudckpt.testing.servers import LocalServers

from .helpers import BUCKET, unique

MARKER = "_COMMITTED"


class MarkerHoldingProxy(LoopbackProxy):
    """Holds each commit-marker request until ``documents`` have been answered, at most ``hold_s``.

    ``held`` records, per marker request, ``"documents"`` when the documents' answers came
    first and ``"timeout"`` when the hold ran out. ``meanwhile`` (if set) runs once, on a
    worker thread, after the hold and before the marker request goes to the server.
    """

    def __init__(
        self, upstream: str, flavor: str, documents: tuple[str, ...], hold_s: float = 5.0
    ) -> None:
        super().__init__(upstream, flavor)
        self.documents = frozenset(documents)
        self.hold_s = hold_s
        self.held: list[str] = []
        self.gets: collections.Counter[str] = collections.Counter()  # GETs by object name
        self.meanwhile: Callable[[], None] | None = None
        self._answered: set[str] = set()
        self._all_answered: asyncio.Event | None = None

    async def _handle(self, request: Any) -> Any:
        body = await request.read()
        name = unquote(request.path).rstrip("/").rsplit("/", 1)[-1]
        if self._all_answered is None:
            self._all_answered = asyncio.Event()
        if request.method == "GET":
            self.gets[name] += 1
        if name == MARKER and request.method in ("GET", "HEAD"):
            try:
                await asyncio.wait_for(self._all_answered.wait(), self.hold_s)
                self.held.append("documents")
            except TimeoutError:
                self.held.append("timeout")
            action, self.meanwhile = self.meanwhile, None
            if action is not None:
                await asyncio.to_thread(action)
        answer = await self._pass_through(request, body)
        if name in self.documents and request.method == "GET":
            self._answered.add(name)
            if self._answered >= self.documents:
                self._all_answered.set()
        return self._respond(request.method, *answer)

    def reset(self) -> None:
        """Forgets what was answered and held (between restores)."""

        async def clear() -> None:  # on the proxy's loop, where the handler uses them
            self._answered.clear()
            self._all_answered = None
            self.held.clear()
            self.gets.clear()

        asyncio.run_coroutine_threadsafe(clear(), self._loop).result(10)


def _tree(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((256, 64), value, np.float32), "b": np.full((8,), value, np.int32)}


def _endpoint(servers: LocalServers, flavor: str) -> str:
    return servers.s3.endpoint if flavor == "s3" else servers.gcs.endpoint


def _options(endpoint: str) -> dict[str, Any]:
    # The held request is not cut and resent, however loaded the machine.
    return {"endpoint_url": endpoint, "deadlines": Deadlines(hedge=False, cut_min_s=60)}


@contextlib.contextmanager
def _checkpointers(
    servers: LocalServers, flavor: str, documents: tuple[str, ...], composite: bool
) -> Any:
    """(proxy, a checkpointer through it, one straight to the server, the step's url)."""

    def handler() -> cc.CheckpointHandler:
        # Nothing packed on GCS: packs go through tensorstore, which reads its endpoint from
        # the environment (the server's, not the proxy's). On S3 the composite makes its item's
        # handler itself, as in a fresh process; on GCS it takes it from a registry.
        pytree = cc.StandardCheckpointHandler(pack_below_bytes=1)
        if not composite:
            return pytree
        if flavor == "s3":
            return cc.CompositeCheckpointHandler()
        registry = cc.HandlerRegistry()
        registry.add("state", cc.args.StandardSave, pytree)
        registry.add("state", cc.args.StandardRestore, pytree)
        return cc.CompositeCheckpointHandler(handler_registry=registry)

    scheme = "s3" if flavor == "s3" else "gs"
    url = f"{scheme}://{BUCKET}/{unique('early')}"
    with (
        MarkerHoldingProxy(_endpoint(servers, flavor), flavor, documents) as proxy,
        cc.Checkpointer(handler(), storage_options=_options(proxy.endpoint)) as held,
        cc.Checkpointer(handler(), storage_options=_options(_endpoint(servers, flavor))) as direct,
    ):
        yield proxy, held, direct, url


def _save_args(value: float, composite: bool) -> cc.args.CheckpointArgs:
    state = cc.args.StandardSave(_tree(value))
    return cc.args.Composite(state=state) if composite else state


def _restore_args(composite: bool) -> cc.args.CheckpointArgs:
    state = cc.args.StandardRestore(_tree(0))
    return cc.args.Composite(state=state) if composite else state


def _check(out: Any, value: float, composite: bool) -> None:
    tree = out["state"] if composite else out
    for key, expected in _tree(value).items():
        np.testing.assert_array_equal(np.asarray(tree[key]), expected)


FLAVORS = ["s3", "gcs"]
SHAPES = {
    # (composite?, documents the restore reads before its data)
    "pytree": (False, ("pytree.json",)),
    "composite": (True, ("_CHECKPOINT_METADATA", "pytree.json")),
}


@pytest.mark.parametrize("resaved", [False, True], ids=["plain", "resaved-meanwhile"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("flavor", FLAVORS)
def test_documents_are_read_beside_the_commit_check(
    flavor: str, shape: str, resaved: bool, servers: LocalServers
) -> None:
    """Asked for before the marker's answer, and used only if the marker commits them.

    ``resaved``: between the documents' answers and the marker's, the step is deleted (its
    data with it) and saved again by another attempt, which commits it. The documents read
    beside the check are then the replaced save's, and must be read again.
    """
    composite, documents = SHAPES[shape]
    with _checkpointers(servers, flavor, documents, composite) as (proxy, held, direct, url):
        direct.save(url, args=_save_args(1.0, composite))
        if resaved:
            proxy.meanwhile = lambda: direct.save(url, args=_save_args(2.0, composite), force=True)
        out = held.restore(url, args=_restore_args(composite))
        _check(out, 2.0 if resaved else 1.0, composite)
        # The hold ended when the documents were answered (and the re-save ran).
        assert proxy.held == ["documents"] and proxy.meanwhile is None
        # Each document read once (the early read was used), or twice (read again).
        reads = dict.fromkeys(documents, 2 if resaved else 1)
        assert {name: proxy.gets[name] for name in documents} == reads


@pytest.mark.parametrize("flavor", FLAVORS)
def test_step_metadata_read_during_a_resave_is_the_new_save(
    flavor: str, servers: LocalServers
) -> None:
    # Without args the items are not known before the step metadata names them.
    documents = ("_CHECKPOINT_METADATA",)
    with _checkpointers(servers, flavor, documents, True) as (proxy, held, direct, url):
        direct.save(url, args=_save_args(1.0, True), custom={"run": "first"})
        assert held.metadata(url).custom == {"run": "first"}
        assert proxy.held == ["documents"]
        # The checkpointer and the composite both read it: one GET serves both.
        assert proxy.gets["_CHECKPOINT_METADATA"] == 1
        proxy.reset()
        proxy.meanwhile = lambda: direct.save(
            url, args=_save_args(2.0, True), custom={"run": "second"}, force=True
        )
        step = held.metadata(url)
        assert proxy.held == ["documents"]
        assert step.custom == {"run": "second"}
        # The stale early answer is dropped at once: each reader then reads the new one.
        assert proxy.gets["_CHECKPOINT_METADATA"] == 3
        assert step.item_metadata["state"]["w"].shape == (256, 64)


def test_a_marker_naming_no_attempt_still_restores(servers: LocalServers) -> None:
    """An older or rolled-forward marker without a readable attempt: documents are read again."""
    documents = ("pytree.json",)
    with _checkpointers(servers, "s3", documents, False) as (proxy, held, direct, url):
        direct.save(url, args=_save_args(3.0, False))
        location = direct.location(url)
        marker = f"{location.path}/{MARKER}"

        async def replace_marker() -> None:
            await location.backend.delete(marker)
            await location.backend.put(marker, b"")

        direct.run_on_loop(replace_marker())
        out = held.restore(url, args=_restore_args(False))
        _check(out, 3.0, False)
        assert proxy.gets["pytree.json"] == 2  # the early read could not be vouched for
