"""Clean-up finds attempt tags through a delimiter scan (per item, never per object).

Issue 14 made discovery O(steps): a delimiter listing and exact-key checks,
no recursive listing. Clean-up after issue 12's per-attempt names needs the
attempt tags under a step (``<step>/<item>/@<attempt>/...``): to sweep a
fenced attempt's late writes out of a committed step, and to recognise a
step that holds nothing but such late writes (landed after an explicit
delete). ``atomicity.scan(tags=True)`` finds them with delimiter listings;
these tests put the objects with a raw client and check what clean-up leaves,
on the memory backend and the real S3 and GCS servers.
"""

from __future__ import annotations

from typing import Any

import pytest

import atomicity
from cloudckpt.engine.loop import LoopThread

from .backend_harness import make_store

ATTEMPT = "0123456789abcdef01234567"


def _listing(store: Any, loop: LoopThread) -> set[str]:
    async def collect() -> set[str]:
        start = len(store.root) + 1
        return {i.path[start:] async for i in store.backend.list_prefix(store.root)}

    return loop.run(collect())


@pytest.mark.parametrize("kind", ["memory", "s3", "gcs"])
def test_cleanup_removes_a_step_of_late_writes_only_and_leaves_foreign_names(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    store = make_store(kind, request, tmp_path)
    # Late writes of a fenced attempt, after the step was deleted: no claim, no marker.
    store.raw_put(store.path("9", "state", f"@{ATTEMPT}", "arrays", "0", "c", "0"), b"late")
    store.raw_put(store.path("9", "state", f"@{ATTEMPT}", "packs", "0.0"), b"late")
    # Not cloudckpt's: an ``@`` name that is no attempt id, and plain objects.
    store.raw_put(store.path("other", "x", "@me", "y"), b"theirs")
    store.raw_put(store.path("plain", "a", "b"), b"theirs")

    found = {c.name: c for c in loop.run(atomicity.scan(store.backend, store.root, tags=True))}
    assert set(found) == {"9"} and found["9"].attempts == {ATTEMPT}
    # Without tags (manager listing), the delimiter scan stays one check per child.
    assert [c.name for c in loop.run(atomicity.scan(store.backend, store.root))] == []

    deleted = loop.run(atomicity.cleanup_uncommitted(store.backend, store.root))
    assert deleted == [store.path("9")]
    assert _listing(store, loop) == {"other/x/@me/y", "plain/a/b"}
