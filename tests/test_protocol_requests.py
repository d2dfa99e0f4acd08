"""What the fenced commit protocol costs: requests per save and per delete (issue 12).

Before the protocol (198b6a8) a save of one JSON item made 7 requests
(exists, put_if_absent x4, list, get) and a delete 5 (delete x3, list x2).
The conditional commit replaces the claim re-read, so a save stays at 7; a
delete adds the fencing of the claim (read it, make it ``deleting``) and
deletes the claim conditionally: 7. Deleting the step's fixed-name documents
(step metadata, ``data.json``) on the version read, so that a later holder's
document of the same name is never taken (I5; steps with a pytree item did so
already), makes it 10.
"""

from __future__ import annotations

from typing import Any

import pytest

import atomicity
import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread

from .backend_harness import make_store


@pytest.mark.parametrize("kind", ["memory", "s3", "gcs"])
def test_requests_per_save_and_per_delete(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    store = make_store(kind, request, tmp_path)
    backend = store.backend
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ck:
        location = ck.location(store.url("1"))
        location.backend.stats.reset()
        ck.save(store.url("1"), args=cc.args.Composite(meta=cc.args.JsonSave({"a": 1})))
        save = dict(location.backend.stats.calls)
        location.backend.stats.reset()
        loop.run(atomicity.delete_checkpoint(location.backend, location.path))
        delete = dict(location.backend.stats.calls)
        loop.run(location.backend.aclose())  # its client on this loop is this test's to close
    print(
        f"\n[requests {kind}] save: {sum(save.values())} {save}; delete: {sum(delete.values())} {delete}"
    )
    # exists(_COMMITTED), create _CLAIM, list (leftovers), data.json, metadata, commit, marker
    assert save == {"exists": 1, "put_if_absent": 4, "list": 1, "put_if_match": 1}
    # read the claim, make it "deleting", delete the marker, list, read the two documents
    # with their versions, read the claim back, delete each document if still that
    # version, delete the claim if still ours
    assert delete == {
        "get": 4,
        "put_if_match": 1,
        "delete": 1,
        "list": 1,
        "delete_if_match": 3,
    }
    assert loop.run(atomicity.list_committed(backend, store.root)) == []
