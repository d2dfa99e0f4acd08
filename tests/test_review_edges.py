"""Edges a review of the hostile-input and protocol work found: each test failed before its fix."""

from __future__ import annotations

from typing import Any

import pytest

import atomicity
from atomicity import CLAIM_NAME, MARKER_NAME
from cloudckpt._loop import LoopThread
from cloudckpt.errors import CorruptCheckpointError
from cloudckpt.orbax import _pytree as orbax_pytree
from cloudckpt.path import StoragePath

from .backend_harness import make_store


def test_a_key_with_an_empty_segment_never_makes_the_root_a_child(
    request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    """One stray object ``root//_CLAIM`` made clean-up fence and delete the whole root."""
    store = make_store("memory", request, tmp_path)
    backend, root = store.backend, store.root
    loop.run(backend.put(f"{root}/1/{MARKER_NAME}", b'{"committed_attempt": "a"}'))
    loop.run(backend.put(f"{root}/1/state/data", b"kept"))
    loop.run(backend.put(f"{root}//{CLAIM_NAME}", b"stray"))
    assert [c.name for c in loop.run(atomicity.scan(backend, root))] == ["1"]
    assert loop.run(atomicity.cleanup_uncommitted(backend, root)) == []
    assert loop.run(backend.get(f"{root}/1/state/data")) == b"kept"
    assert loop.run(atomicity.is_committed(backend, f"{root}/1"))


def test_deleting_a_claimless_checkpoint_fences_it_first(
    request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread
) -> None:
    """A committed step without a claim is claimed for deletion (create-only) before any
    object goes, so nothing of it is left visible and the deletion is not racing blind."""
    store = make_store("memory", request, tmp_path)
    backend, step = store.backend, f"{store.root}/7"
    loop.run(backend.put(f"{step}/{MARKER_NAME}", b'{"committed_attempt": "old"}'))
    loop.run(backend.put(f"{step}/state/data", b"x"))
    seen: list[str] = []
    original = backend.put_versioned

    async def spy(path: str, data: bytes, if_version: str | None = None) -> Any:
        seen.append(f"{path.rsplit('/', 1)[-1]} if_version={if_version}")
        return await original(path, data, if_version=if_version)

    backend.put_versioned = spy  # type: ignore[method-assign]
    try:
        loop.run(atomicity.delete_checkpoint(backend, step))
    finally:
        del backend.put_versioned
    assert seen[0] == f"{CLAIM_NAME} if_version=None"
    assert not loop.run(atomicity.is_committed(backend, step))
    assert _paths(backend, step, loop) == []


def _paths(backend: Any, prefix: str, loop: LoopThread) -> list[str]:
    async def collect() -> list[str]:
        return [i.path async for i in backend.list_prefix(prefix)]

    return loop.run(collect())


@pytest.mark.parametrize("index", ["²", "01", "-1", "1e3", ""])
def test_an_orbax_sequence_index_must_be_a_plain_number(index: str) -> None:
    where = StoragePath.from_url("memory://orbax-edges/item")
    keys = [{"key": "layers", "key_type": 2}, {"key": index, "key_type": 1}]
    with pytest.raises(CorruptCheckpointError, match="is not a plain number"):
        orbax_pytree._param_name(keys, where)
