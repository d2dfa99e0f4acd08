"""The core API of issue 3 through ``import cloudckpt as cc``, on memory, file, S3 and GCS.

Args, the handler registry, the composite handler, JSON items and the
checkpointers. Custom handlers defined here stand in for array items; they
record what the checkpointer asks of them (``EVENTS``) so that the tests can
check who was called, how often and where, while every stored byte is checked
by listing the bucket or directory itself.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

import cloudckpt as cc
from cloudckpt.engine.loop import LoopThread

from .backend_harness import ALL_KINDS, StoreUnderTest, make_store

JSON_TYPESTR = "cloudckpt.handlers.json.JsonCheckpointHandler"
CLAIM = "_CLAIM"
MARKER = "_COMMITTED"
STEP_METADATA = "_CHECKPOINT_METADATA"
STEP_OBJECTS = {CLAIM, MARKER, STEP_METADATA}
TMP_INFIX = ".cloudckpt-tmp-"

# ----------------------------------------------------------------------------- handlers
#: What handlers were asked to do: dicts with "event", "handler" (id) and "dir".
EVENTS: list[dict[str, Any]] = []
#: Gates a save's background write waits for (threading, set by the test thread).
GATES: dict[str, threading.Event] = {}
#: Rendezvous counters: writes sharing a key wait until all have started.
MEETINGS: dict[str, int] = {}


def _record(event: str, handler: object, directory: cc.StoragePath | None = None) -> None:
    EVENTS.append(
        {"event": event, "handler": id(handler), "dir": None if directory is None else directory}
    )


def _events(event: str) -> list[dict[str, Any]]:
    return [e for e in EVENTS if e["event"] == event]


class RecordingHandler(cc.AsyncCheckpointHandler):
    """Saves an int as one object; records every call made to it."""

    async def _write(self, directory: cc.StoragePath, args: RecordSave, data: bytes) -> None:
        step_root = directory.path.rstrip("/").rsplit("/", 1)[0]
        marker_there = await directory.backend.exists(f"{step_root}/{MARKER}")
        EVENTS.append(
            {
                "event": "write",
                "handler": id(self),
                "dir": directory,
                "marker_when_writing": marker_there,
            }
        )
        if args.gate is not None and not await asyncio.to_thread(GATES[args.gate].wait, 20):
            raise TimeoutError(f"gate {args.gate} never opened")
        if args.meet is not None:
            key, expected = args.meet
            MEETINGS[key] = MEETINGS.get(key, 0) + 1
            deadline = time.monotonic() + 10
            while MEETINGS[key] < expected:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {MEETINGS[key]} of {expected} items were writing")
                await asyncio.sleep(0.01)
        await directory.backend.put((directory / "value").path, data)

    def async_save(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs
    ) -> list[Awaitable[None]]:
        if not isinstance(args, RecordSave):
            raise TypeError(f"RecordingHandler saves RecordSave, got {type(args).__name__}")
        _record("copy", self, directory)
        return [self._write(directory, args, json.dumps(args.value).encode())]

    async def restore(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs | None = None
    ) -> Any:
        _record("restore", self, directory)
        data = await directory.backend.get((directory / "value").path)
        if data is None:
            raise FileNotFoundError(f"no value at {directory}")
        value = json.loads(data)
        return value * args.scale if isinstance(args, ScaledRestore) else value

    async def metadata(self, directory: cc.StoragePath) -> Any:
        return {"bytes": await directory.backend.size((directory / "value").path)}

    async def finalize(self, directory: cc.StoragePath) -> None:
        _record("finalize", self, directory)

    def close(self) -> None:
        _record("close", self)


@cc.register_with_handler(RecordingHandler, for_save=True)
@dataclass(frozen=True)
class RecordSave(cc.CheckpointArgs):
    value: int
    gate: str | None = None  # wait for GATES[gate] before writing
    meet: tuple[str, int] | None = None  # wait until this many writes share the key


@cc.register_with_handler(RecordingHandler, for_restore=True)
@dataclass(frozen=True)
class RecordRestore(cc.CheckpointArgs):
    pass


RecordingHandler.default_restore_args = RecordRestore


class SpecialHandler(RecordingHandler):
    """A second handler type taking the same args, for explicit registries."""


class BlindHandler(RecordingHandler):
    """Cannot describe what it saved."""

    async def metadata(self, directory: cc.StoragePath) -> Any:
        raise RuntimeError("this handler cannot describe its items")


@cc.register_with_handler(BlindHandler, for_save=True)
@dataclass(frozen=True)
class BlindSave(RecordSave):
    pass


class ScaledHandler(RecordingHandler):
    """Its restore args have a required field, so it has no default restore."""


@cc.register_with_handler(ScaledHandler, for_save=True)
@dataclass(frozen=True)
class ScaledSave(RecordSave):
    pass


@cc.register_with_handler(ScaledHandler, for_restore=True)
@dataclass(frozen=True)
class ScaledRestore(cc.CheckpointArgs):
    scale: int


ScaledHandler.default_restore_args = ScaledRestore


class ExplicitOnlyHandler(RecordingHandler):
    """Declares no default restore args at all."""

    default_restore_args = None


@cc.register_with_handler(ExplicitOnlyHandler, for_save=True)
@dataclass(frozen=True)
class ExplicitOnlySave(RecordSave):
    pass


class FailingHandler(cc.CheckpointHandler):
    """A plain (non-async) handler that writes part of its item, then fails."""

    async def save(self, directory: cc.StoragePath, args: cc.CheckpointArgs) -> None:
        await directory.backend.put((directory / "partial").path, b"half an item")
        raise RuntimeError(f"boom while writing {directory.name}")

    async def restore(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs | None = None
    ) -> Any:
        raise AssertionError("a failed item is never restored")


@cc.register_with_handler(FailingHandler, for_save=True)
@dataclass(frozen=True)
class FailSave(cc.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Where:
    """A fresh, empty root on one backend, and a view of what is stored there."""

    store: StoreUnderTest
    loop: LoopThread

    @property
    def kind(self) -> str:
        return self.store.name

    def url(self, *parts: str) -> str:
        if self.kind == "file":
            return "file://" + self.store.path(*parts)
        return self.store.url(*parts)

    def path(self, *parts: str) -> str:
        return self.store.path(*parts)

    def listing(self, *parts: str) -> set[str]:
        """Keys stored under ``parts``, relative to it."""
        prefix = self.store.path(*parts)

        async def collect() -> set[str]:
            return {
                info.path[len(prefix) + 1 :]
                async for info in self.store.backend.list_prefix(prefix)
            }

        return self.loop.run(collect())

    def raw(self, *parts: str) -> bytes | None:
        return self.store.raw_get(self.store.path(*parts))


@pytest.fixture(autouse=True)
def _clear_events() -> Iterator[None]:
    EVENTS.clear()
    yield
    EVENTS.clear()


@pytest.fixture(params=ALL_KINDS)
def where(request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread) -> Where:
    return Where(make_store(request.param, request, tmp_path), loop)


@pytest.fixture(params=["file", "s3", "gcs"])
def shared_where(request: pytest.FixtureRequest, tmp_path: Any, loop: LoopThread) -> Where:
    """Backends another process can see (memory:// is process-local)."""
    return Where(make_store(request.param, request, tmp_path), loop)


@pytest.fixture
def ckptr() -> Iterator[cc.Checkpointer]:
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as checkpointer:
        yield checkpointer


def _committed_listing(*items: str) -> set[str]:
    return STEP_OBJECTS | set(items)


def _craft_uncommitted(where: Where, name: str) -> str:
    """A save that claimed its path and wrote data, but never committed; returns its URL."""
    backend = where.store.backend
    tmp = backend.default_temporary_path_class().from_final(where.path(name), backend)

    async def run() -> None:
        path = await tmp.create()
        await backend.put(f"{path}/meta/data.json", b'{"crc32c":"00000000","data":1}')
        await backend.put(f"{path}/{STEP_METADATA}", b"{}")

    where.loop.run(run())
    return backend.url(tmp.get())


def _run_python(code: str, *argv: str) -> str:
    """Runs ``code`` in a brand-new interpreter (same environment) and returns its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ----------------------------------------------------------------------------- args
class TestCompositeArgs:
    def test_items_by_key_and_attribute(self) -> None:
        meta = cc.args.JsonSave({"lr": 3e-4})
        c = cc.args.Composite(meta=meta, n=RecordSave(1))
        assert c["meta"] is c.meta is meta
        assert isinstance(c, cc.CheckpointArgs) and isinstance(c, Mapping)
        assert list(c) == ["meta", "n"] and len(c) == 2 and "n" in c and "x" not in c
        assert dict(c.items()) == {"meta": meta, "n": RecordSave(1)}
        assert c == cc.args.Composite(meta=cc.args.JsonSave({"lr": 3e-4}), n=RecordSave(1))

    def test_is_immutable(self) -> None:
        c = cc.args.Composite(meta=cc.args.JsonSave(1))
        with pytest.raises(AttributeError, match="immutable"):
            c.meta = cc.args.JsonSave(2)  # type: ignore[misc]
        with pytest.raises(AttributeError, match="immutable"):
            c.other = cc.args.JsonSave(2)  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match="immutable"):
            c["meta"] = cc.args.JsonSave(2)  # type: ignore[index]
        with pytest.raises(AttributeError, match="immutable"):
            del c.meta
        assert c.meta == cc.args.JsonSave(1) and list(c) == ["meta"]

    def test_unknown_key_lists_available_keys(self) -> None:
        c = cc.args.Composite(state=RecordSave(1), meta=cc.args.JsonSave(2))
        for lookup in (lambda: c["nope"], lambda: c.nope):
            with pytest.raises(KeyError) as info:
                lookup()
            assert "'nope'" in info.value.args[0]
            assert "['meta', 'state']" in info.value.args[0]

    def test_a_missing_item_is_also_a_missing_attribute(self) -> None:
        # hasattr/getattr and libraries probing attributes (jax.block_until_ready on a
        # restored Composite) must see "no such attribute", not a KeyError.
        c = cc.args.Composite(state={"w": [1.0, 2.0]})
        assert not hasattr(c, "nope") and getattr(c, "nope", 5) == 5
        with pytest.raises(AttributeError, match="available: \\['state'\\]"):
            _ = c.nope
        import jax

        assert jax.block_until_ready(c) is c


class TestRegistration:
    def test_decorating_a_non_args_class_is_a_type_error(self) -> None:
        with pytest.raises(TypeError, match="CheckpointArgs"):

            @cc.register_with_handler(RecordingHandler, for_save=True)
            class NotArgs:
                pass

        with pytest.raises(TypeError, match="CheckpointArgs"):
            cc.register_with_handler(RecordingHandler, for_restore=True)(len)

    def test_neither_save_nor_restore_is_a_value_error(self) -> None:
        with pytest.raises(ValueError, match="for_save=True and/or for_restore=True"):
            cc.register_with_handler(RecordingHandler)

    def test_typestr_is_stable_and_names_the_class(self) -> None:
        assert cc.JsonCheckpointHandler.typestr() == JSON_TYPESTR
        assert RecordingHandler.typestr() == f"{__name__}.RecordingHandler"
        assert RecordingHandler().typestr() == RecordingHandler.typestr()


class TestHandlerRegistry:
    def test_add_and_get_by_class_or_instance(self) -> None:
        registry = cc.HandlerRegistry()
        handler = RecordingHandler()
        registry.add("n", RecordSave, handler)
        assert registry.get("n", RecordSave) is handler
        assert registry.get("n", RecordSave(3)) is handler

    def test_duplicate_pair_already_exists(self) -> None:
        registry = cc.HandlerRegistry()
        registry.add("n", RecordSave, RecordingHandler())
        registry.add(None, RecordSave, RecordingHandler())  # another pair: fine
        with pytest.raises(ValueError, match="already exists"):
            registry.add("n", RecordSave, RecordingHandler())
        with pytest.raises(ValueError, match="already exists"):
            registry.add(None, RecordSave, SpecialHandler())

    def test_missing_pair_no_entry(self) -> None:
        registry = cc.HandlerRegistry()
        registry.add("n", RecordSave, RecordingHandler())
        with pytest.raises(KeyError, match="no entry"):
            registry.get("n", RecordRestore)
        with pytest.raises(KeyError, match="no entry"):
            registry.get("other", RecordSave(0))
        with pytest.raises(KeyError, match="no entry"):
            cc.HandlerRegistry().get(None, cc.args.JsonSave)

    def test_item_entry_beats_item_independent_entry(self) -> None:
        registry = cc.HandlerRegistry()
        general, special = RecordingHandler(), SpecialHandler()
        registry.add(None, RecordSave, general)
        registry.add("n", RecordSave, special)
        assert registry.get("n", RecordSave(1)) is special
        assert registry.get("m", RecordSave(1)) is general
        assert registry.get(None, RecordSave) is general

    def test_handler_class_is_instantiated_once(self) -> None:
        registry = cc.HandlerRegistry()
        registry.add("n", RecordSave, SpecialHandler)
        registry.add("n", RecordRestore, RecordingHandler)
        got = registry.get("n", RecordSave)
        assert type(got) is SpecialHandler and registry.get("n", RecordSave(2)) is got
        assert type(registry.get("n", RecordRestore)) is RecordingHandler

    def test_args_type_must_be_checkpoint_args(self) -> None:
        with pytest.raises(TypeError, match="CheckpointArgs"):
            cc.HandlerRegistry().add("n", dict, RecordingHandler())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- round trips
class TestRoundTrip:
    def test_save_restore_json_items(self, where: Where, ckptr: cc.Checkpointer) -> None:
        meta = {"lr": 3e-4, "data_seed": 7, "tags": ["a", "b"], "nested": {"x": None}}
        ckptr.save(
            where.url("exp1"),
            args=cc.args.Composite(
                meta=cc.args.JsonSave(meta), config=cc.args.JsonSave([1, 2.5, "z"])
            ),
        )
        out = ckptr.restore(
            where.url("exp1"),
            args=cc.args.Composite(meta=cc.args.JsonRestore(), config=cc.args.JsonRestore()),
        )
        assert isinstance(out, cc.args.Composite)
        assert out.meta == meta and out["meta"] is out.meta
        assert out.config == [1, 2.5, "z"]
        # One object per item, under a sub-prefix named exactly after the item.
        assert where.listing("exp1") == _committed_listing("meta/data.json", "config/data.json")
        stored = json.loads(where.raw("exp1", "meta", "data.json") or b"")
        assert stored["data"] == meta and re.fullmatch(r"[0-9a-f]{8}", stored["crc32c"])
        # Nothing else anywhere under the root: no temporary siblings left behind.
        assert where.listing() == {f"exp1/{k}" for k in where.listing("exp1")}

    def test_custom_async_and_plain_items_together(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(
            where.url("s"),
            args=cc.args.Composite(n=RecordSave(41), meta=cc.args.JsonSave("hi")),
        )
        out = ckptr.restore(where.url("s"))
        assert dict(out) == {"n": 41, "meta": "hi"}
        assert where.listing("s") == _committed_listing("n/value", "meta/data.json")
        assert where.raw("s", "n", "value") == b"41"

    def test_plain_path_is_the_file_system(self, tmp_path: Any, ckptr: cc.Checkpointer) -> None:
        plain = str(tmp_path / "plain")
        ckptr.save(plain, args=cc.args.Composite(meta=cc.args.JsonSave(1)))
        assert ckptr.restore("file://" + plain) == cc.args.Composite(meta=1)
        assert sorted(os.listdir(plain)) == sorted(STEP_OBJECTS | {"meta"})

    def test_single_handler_checkpointer(self, where: Where) -> None:
        with cc.Checkpointer(cc.JsonCheckpointHandler()) as single:
            single.save(where.url("j"), args=cc.args.JsonSave({"a": 1}))
            assert single.restore(where.url("j"), args=cc.args.JsonRestore()) == {"a": 1}
            assert single.metadata(where.url("j")).item_handlers == JSON_TYPESTR
        assert where.listing("j") == _committed_listing("data.json")
        with (
            cc.Checkpointer(cc.CompositeCheckpointHandler()) as composite,
            pytest.raises(ValueError, match="not a CompositeCheckpointHandler"),
        ):
            composite.restore(where.url("j"))


class TestJsonItems:
    def test_save_copies_the_object_when_called(self, where: Where) -> None:
        obj = {"step": 1, "history": [1]}
        with cc.AsyncCheckpointer(cc.CompositeCheckpointHandler()) as ack:
            ack.save(where.url("c"), args=cc.args.Composite(meta=cc.args.JsonSave(obj)))
            obj["step"] = 2
            obj["history"].append(2)
            ack.wait_until_finished()
            assert ack.restore(where.url("c")).meta == {"step": 1, "history": [1]}

    @pytest.mark.parametrize("bad", [object(), float("nan"), {"k": {1, 2}}])
    def test_not_json_fails_before_any_io(
        self, where: Where, ckptr: cc.Checkpointer, bad: Any
    ) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises((TypeError, ValueError), match="not JSON-serialisable"):
                ckptr.save(
                    where.url("bad"),
                    args=cc.args.Composite(ok=cc.args.JsonSave(1), meta=cc.args.JsonSave(bad)),
                )
            gc.collect()
        assert where.listing() == set()
        # The valid item's write was discarded cleanly, not left as a dangling coroutine.
        assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []

    def test_objects_are_create_only_where_the_strategy_writes_in_place(self, where: Where) -> None:
        handler = cc.JsonCheckpointHandler()
        directory = cc.StoragePath.from_url(where.url("item"))

        async def save(value: Any) -> None:
            await asyncio.gather(*handler.async_save(directory, cc.args.JsonSave(value)))

        where.loop.run(save("first"))
        if where.store.backend.supports_atomic_rename:
            # POSIX writes into a private temporary directory: a plain put is safe there.
            where.loop.run(save("second"))
            assert where.loop.run(handler.restore(directory)) == "second"
        else:
            with pytest.raises(FileExistsError, match="already exists"):
                where.loop.run(save("second"))
            assert where.loop.run(handler.restore(directory)) == "first"
        assert where.listing("item") == {"data.json"}

    def test_async_save_does_no_io_until_awaited(self, where: Where) -> None:
        handler = cc.JsonCheckpointHandler()
        directory = cc.StoragePath.from_url(where.url("lazy"))
        writes = list(handler.async_save(directory, cc.args.JsonSave([1])))
        assert where.listing() == set()

        async def run() -> None:
            await asyncio.gather(*writes)

        where.loop.run(run())
        assert where.listing() == {"lazy/data.json"}


# ----------------------------------------------------------------------------- composite
class TestCompositeSave:
    def test_items_are_written_concurrently(self, where: Where, ckptr: cc.Checkpointer) -> None:
        key = f"meet-{where.kind}-{time.monotonic_ns()}"
        ckptr.save(
            where.url("c"),
            args=cc.args.Composite(
                a=RecordSave(1, meet=(key, 3)),
                b=RecordSave(2, meet=(key, 3)),
                c=RecordSave(3, meet=(key, 3)),
            ),
        )
        assert MEETINGS[key] == 3
        assert dict(ckptr.restore(where.url("c"))) == {"a": 1, "b": 2, "c": 3}

    def test_uses_the_backends_temporary_path_strategy(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(where.url("t"), args=cc.args.Composite(n=RecordSave(1)))
        (write,) = _events("write")
        written_to: cc.StoragePath = write["dir"]
        assert written_to.name == "n"
        step_dir = written_to.path.rsplit("/", 1)[0]
        if where.kind == "file":
            # Atomic rename: written in a temporary sibling, renamed onto the final name.
            assert step_dir.startswith(where.path("t") + TMP_INFIX)
            assert not os.path.exists(step_dir)
        else:
            # Commit marker: written in place, before the marker existed.
            assert step_dir == where.path("t")
            assert write["marker_when_writing"] is False
        (finalize,) = _events("finalize")
        assert finalize["dir"] == written_to
        assert where.listing("t") == _committed_listing("n/value")

    def test_failed_item_leaves_nothing(self, where: Where, ckptr: cc.Checkpointer) -> None:
        with pytest.raises(RuntimeError, match="boom while writing bad"):
            ckptr.save(
                where.url("f"),
                args=cc.args.Composite(ok=cc.args.JsonSave({"fine": True}), bad=FailSave()),
            )
        assert where.listing() == set()  # no marker, no data, no claim, no temporary sibling
        if where.kind == "file":
            assert not os.path.exists(where.path("f"))
            assert not os.path.exists(where.path()) or os.listdir(where.path()) == []
        with pytest.raises(FileNotFoundError):
            ckptr.restore(where.url("f"))
        # The step can be saved again afterwards.
        ckptr.save(where.url("f"), args=cc.args.Composite(ok=cc.args.JsonSave(2)))
        assert ckptr.restore(where.url("f")) == cc.args.Composite(ok=2)

    def test_failure_is_the_handlers_own_error(self, where: Where, ckptr: cc.Checkpointer) -> None:
        with pytest.raises(RuntimeError) as info:
            ckptr.save(where.url("f"), args=cc.args.Composite(bad=FailSave()))
        assert type(info.value) is RuntimeError
        assert "boom while writing bad" in str(info.value)

    def test_subset_writes_only_its_sub_prefixes(self, where: Where) -> None:
        registry = cc.HandlerRegistry()
        for item in ("a", "b", "c"):
            registry.add(item, RecordSave, RecordingHandler())
            registry.add(item, RecordRestore, registry.get(item, RecordSave))
        with cc.Checkpointer(cc.CompositeCheckpointHandler(handler_registry=registry)) as ck:
            ck.save(where.url("1"), args=cc.args.Composite(a=RecordSave(1), c=RecordSave(3)))
            assert where.listing("1") == _committed_listing("a/value", "c/value")
            out = ck.restore(where.url("1"))
            assert dict(out) == {"a": 1, "c": 3}
            assert ck.metadata(where.url("1")).item_handlers == {
                "a": RecordingHandler.typestr(),
                "c": RecordingHandler.typestr(),
            }
            assert ck.restore(where.url("1"), args=cc.args.Composite()) == out

    def test_subset_after_a_full_save_with_deferred_registration(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(
            where.url("1"),
            args=cc.args.Composite(a=RecordSave(1), b=cc.args.JsonSave("b"), c=RecordSave(3)),
        )
        ckptr.save(where.url("2"), args=cc.args.Composite(b=cc.args.JsonSave("b2")))
        assert where.listing("2") == _committed_listing("b/data.json")
        assert dict(ckptr.restore(where.url("2"))) == {"b": "b2"}
        assert dict(ckptr.restore(where.url("1"))) == {"a": 1, "b": "b", "c": 3}

    def test_empty_or_non_composite_args_write_nothing(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        with pytest.raises(ValueError, match="no items"):
            ckptr.save(where.url("e"), args=cc.args.Composite())
        with pytest.raises(TypeError, match="Composite"):
            ckptr.save(where.url("e"), args=cc.args.JsonSave(1))
        with pytest.raises(ValueError, match="needs args"):
            ckptr.save(where.url("e"))
        with pytest.raises(ValueError, match="not registered with any handler"):
            ckptr.save(where.url("e"), args=cc.args.Composite(x=cc.CheckpointArgs()))
        assert where.listing() == set()


BAD_NAMES = [
    "",
    "a/b",
    "/a",
    "a\\b",
    "..",
    "a..b",
    "__init",
    "__",
    ".hidden",
    ".",
    STEP_METADATA,
    MARKER,
    CLAIM,
]


class TestItemNames:
    def test_invalid_names_fail_before_any_io(self, where: Where, ckptr: cc.Checkpointer) -> None:
        for name in BAD_NAMES:
            args = cc.args.Composite(**{"good": cc.args.JsonSave(1), name: cc.args.JsonSave(2)})
            with pytest.raises(ValueError, match=r"invalid item name|non-empty"):
                ckptr.save(where.url("step"), args=args)
        assert where.listing() == set()
        if where.kind == "file":
            assert not os.path.exists(where.path())

    def test_invalid_names_are_refused_on_restore(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(where.url("s"), args=cc.args.Composite(ok=cc.args.JsonSave(1)))
        for name in BAD_NAMES:
            with pytest.raises(ValueError, match=r"invalid item name|non-empty"):
                ckptr.restore(
                    where.url("s"), args=cc.args.Composite(**{name: cc.args.JsonRestore()})
                )

    def test_plain_names_are_accepted(self, where: Where, ckptr: cc.Checkpointer) -> None:
        names = ["state", "a.b", "_private", "x-1", "Ünïcode", "a b"]
        ckptr.save(
            where.url("s"),
            args=cc.args.Composite(**{n: cc.args.JsonSave(i) for i, n in enumerate(names)}),
        )
        assert dict(ckptr.restore(where.url("s"))) == {n: i for i, n in enumerate(names)}
        assert where.listing("s") == _committed_listing(*(f"{n}/data.json" for n in names))


class TestHandlerResolution:
    def test_deferred_registration_binds_item_to_one_handler(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(where.url("1"), args=cc.args.Composite(n=RecordSave(1), m=RecordSave(2)))
        ckptr.save(where.url("2"), args=cc.args.Composite(n=RecordSave(3)))
        ckptr.restore(where.url("2"), args=cc.args.Composite(n=RecordRestore()))
        copies = _events("copy")
        by_item: dict[str, set[int]] = {}
        for e in copies + _events("restore"):
            by_item.setdefault(e["dir"].name, set()).add(e["handler"])
        # One instance per item, reused by later saves and restores; items do not share.
        assert len(by_item["n"]) == 1 and len(by_item["m"]) == 1
        assert by_item["n"] != by_item["m"]

    def test_bound_item_refuses_another_handlers_args(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(where.url("1"), args=cc.args.Composite(x=cc.args.JsonSave(1)))
        with pytest.raises(ValueError) as info:
            ckptr.save(where.url("2"), args=cc.args.Composite(x=RecordSave(1)))
        message = str(info.value)
        assert "'x'" in message and "RecordSave" in message
        assert "JsonSave" in message and "JsonRestore" in message
        assert where.listing() == _prefixed("1", _committed_listing("x/data.json"))
        with pytest.raises(ValueError, match=r"'x'.*RecordRestore"):
            ckptr.restore(where.url("1"), args=cc.args.Composite(x=RecordRestore()))
        assert ckptr.restore(where.url("1")).x == 1

    def test_explicit_registry_comes_first(self, where: Where) -> None:
        special = SpecialHandler()
        registry = cc.HandlerRegistry()
        registry.add("n", RecordSave, special)
        registry.add("n", RecordRestore, special)
        registry.add(None, cc.args.JsonSave, cc.JsonCheckpointHandler())
        with cc.Checkpointer(cc.CompositeCheckpointHandler(handler_registry=registry)) as ck:
            ck.save(where.url("1"), args=cc.args.Composite(n=RecordSave(5), j=cc.args.JsonSave(6)))
            assert {e["handler"] for e in _events("copy")} == {id(special)}
            assert ck.metadata(where.url("1")).item_handlers == {
                "n": SpecialHandler.typestr(),
                "j": JSON_TYPESTR,
            }
            assert ck.restore(where.url("1"), args=cc.args.Composite(n=RecordRestore())).n == 5
            # Registered args types only: the global registration does not apply.
            with pytest.raises(ValueError) as info:
                ck.save(where.url("2"), args=cc.args.Composite(n=RecordSave(1), k=RecordSave(2)))
            assert "'k'" in str(info.value) and "RecordSave" in str(info.value)
            with pytest.raises(ValueError, match=r"'n'.*BlindSave"):
                ck.save(where.url("2"), args=cc.args.Composite(n=BlindSave(1)))
            # An item-independent entry serves every item.
            ck.save(where.url("3"), args=cc.args.Composite(n=cc.args.JsonSave(7)))
            assert ck.metadata(where.url("3")).item_handlers == {"n": JSON_TYPESTR}
        assert where.listing("2") == set()

    def test_registry_restore_all_picks_the_recorded_handler(self, where: Where) -> None:
        json_handler, recording = cc.JsonCheckpointHandler(), RecordingHandler()
        registry = cc.HandlerRegistry()
        registry.add(None, cc.args.JsonSave, json_handler)
        registry.add(None, cc.args.JsonRestore, json_handler)
        registry.add(None, RecordSave, recording)
        registry.add(None, RecordRestore, recording)
        with cc.Checkpointer(cc.CompositeCheckpointHandler(handler_registry=registry)) as ck:
            ck.save(
                where.url("1"), args=cc.args.Composite(j=cc.args.JsonSave("j"), n=RecordSave(9))
            )
            assert dict(ck.restore(where.url("1"))) == {"j": "j", "n": 9}
            assert ck.metadata(where.url("1")).item_metadata == {"j": None, "n": {"bytes": 1}}
        assert {e["handler"] for e in _events("restore")} == {id(recording)}

    def test_fresh_handler_restores_everything_by_recorded_type(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(
            where.url("1"),
            args=cc.args.Composite(n=RecordSave(7), b=BlindSave(8), meta=cc.args.JsonSave([1])),
        )
        for args in (None, cc.args.Composite()):
            with cc.Checkpointer(cc.CompositeCheckpointHandler()) as fresh:
                out = fresh.restore(where.url("1"), args=args)
            assert isinstance(out, cc.args.Composite)
            assert dict(out) == {"n": 7, "b": 8, "meta": [1]}

    def test_explicit_args_restore_exactly_those_items(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(
            where.url("1"),
            args=cc.args.Composite(a=RecordSave(1), b=RecordSave(2), meta=cc.args.JsonSave(3)),
        )
        with cc.Checkpointer(cc.CompositeCheckpointHandler()) as fresh:
            out = fresh.restore(where.url("1"), args=cc.args.Composite(b=RecordRestore()))
        assert dict(out) == {"b": 2}
        assert [e["dir"].name for e in _events("restore")] == ["b"]

    def test_missing_item_is_a_key_error_listing_the_items(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(where.url("1"), args=cc.args.Composite(a=RecordSave(1), b=cc.args.JsonSave(2)))
        with pytest.raises(KeyError) as info:
            ckptr.restore(
                where.url("1"),
                args=cc.args.Composite(a=RecordRestore(), nope=cc.args.JsonRestore()),
            )
        message = info.value.args[0]
        assert "'nope'" in message and "['a', 'b']" in message
        assert _events("restore") == []

    def test_args_that_cannot_be_default_constructed(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(
            where.url("1"),
            args=cc.args.Composite(scaled=ScaledSave(4), meta=cc.args.JsonSave(1)),
        )
        for checkpointer in (ckptr, cc.Checkpointer(cc.CompositeCheckpointHandler())):
            with checkpointer:
                with pytest.raises(ValueError) as info:
                    checkpointer.restore(where.url("1"))
                assert "'scaled'" in str(info.value) and "ScaledRestore" in str(info.value)
        with cc.Checkpointer(cc.CompositeCheckpointHandler()) as fresh:
            out = fresh.restore(
                where.url("1"),
                args=cc.args.Composite(scaled=ScaledRestore(scale=10), meta=cc.args.JsonRestore()),
            )
        assert dict(out) == {"scaled": 40, "meta": 1}

    def test_handler_without_default_restore_args(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(where.url("1"), args=cc.args.Composite(only=ExplicitOnlySave(2)))
        with (
            cc.Checkpointer(cc.CompositeCheckpointHandler()) as fresh,
            pytest.raises(ValueError, match=r"'only'.*args=Composite\(only="),
        ):
            fresh.restore(where.url("1"))


def _prefixed(prefix: str, keys: set[str]) -> set[str]:
    return {f"{prefix}/{k}" for k in keys}


class TestFreshProcess:
    def test_restore_all_with_no_registrations(
        self, shared_where: Where, ckptr: cc.Checkpointer
    ) -> None:
        ckptr.save(
            shared_where.url("1"),
            args=cc.args.Composite(
                meta=cc.args.JsonSave({"lr": 3e-4, "data_seed": 7}), cfg=cc.args.JsonSave([1])
            ),
        )
        code = (
            "import json, sys\n"
            "import cloudckpt as cc\n"
            "assert 'tests.test_core_api' not in sys.modules\n"
            "with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ck:\n"
            "    out = ck.restore(sys.argv[1])\n"
            "print(json.dumps({'type': type(out).__name__, 'items': dict(out)}))\n"
        )
        printed = json.loads(_run_python(code, shared_where.url("1")))
        assert printed == {
            "type": "Composite",
            "items": {"meta": {"lr": 3e-4, "data_seed": 7}, "cfg": [1]},
        }

    def test_unknown_handler_type_names_the_item(self, shared_where: Where) -> None:
        code = (
            "import sys\n"
            "from dataclasses import dataclass\n"
            "import cloudckpt as cc\n"
            "class GhostHandler(cc.CheckpointHandler):\n"
            "    async def save(self, directory, args):\n"
            "        await directory.backend.put((directory / 'ghost.bin').path, b'boo')\n"
            "    async def restore(self, directory, args=None):\n"
            "        return 'boo'\n"
            "    async def metadata(self, directory):\n"
            "        return {'ghostly': True}\n"
            "@cc.register_with_handler(GhostHandler, for_save=True, for_restore=True)\n"
            "@dataclass(frozen=True)\n"
            "class GhostArgs(cc.CheckpointArgs):\n"
            "    pass\n"
            "with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ck:\n"
            "    ck.save(sys.argv[1], args=cc.args.Composite(\n"
            "        ghost=GhostArgs(), meta=cc.args.JsonSave({'k': 1})))\n"
        )
        _run_python(code, shared_where.url("g"))
        assert shared_where.listing("g") == _committed_listing("ghost/ghost.bin", "meta/data.json")
        with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ck:
            with pytest.raises(ValueError) as info:
                ck.restore(shared_where.url("g"))
            message = str(info.value)
            assert "item 'ghost' could not be restored" in message
            assert "__main__.GhostHandler" in message and "args=Composite(ghost=" in message
            out = ck.restore(
                shared_where.url("g"), args=cc.args.Composite(meta=cc.args.JsonRestore())
            )
            assert dict(out) == {"meta": {"k": 1}}
            step = ck.metadata(shared_where.url("g"))
        assert step.item_handlers == {"ghost": "__main__.GhostHandler", "meta": JSON_TYPESTR}
        assert step.item_metadata == {"ghost": None, "meta": None}


# ----------------------------------------------------------------------------- metadata
class TestMetadata:
    def test_step_metadata(self, where: Where, ckptr: cc.Checkpointer) -> None:
        before = time.time_ns()
        ckptr.save(
            where.url("m"),
            args=cc.args.Composite(n=RecordSave(123), b=BlindSave(1), meta=cc.args.JsonSave({})),
            metrics={"loss": 0.25, "step": 10},
            custom={"run": "exp1"},
        )
        after = time.time_ns()
        for checkpointer in (ckptr, cc.Checkpointer(cc.CompositeCheckpointHandler())):
            with checkpointer:
                step = checkpointer.metadata(where.url("m"))
            assert isinstance(step, cc.StepMetadata)
            assert step.item_handlers == {
                "n": RecordingHandler.typestr(),
                "b": BlindHandler.typestr(),
                "meta": JSON_TYPESTR,
            }
            assert step.item_metadata == {"n": {"bytes": 3}, "b": None, "meta": None}
            assert step.metrics == {"loss": 0.25, "step": 10}
            assert step.custom == {"run": "exp1"}
            assert step.init_timestamp_nsecs is not None and step.commit_timestamp_nsecs is not None
            assert before <= step.init_timestamp_nsecs <= step.commit_timestamp_nsecs <= after
        assert _events("restore") == []  # metadata reads no item data

    def test_metadata_object_is_versioned_json(self, where: Where, ckptr: cc.Checkpointer) -> None:
        ckptr.save(
            where.url("m"),
            args=cc.args.Composite(meta=cc.args.JsonSave(1)),
            metrics={"acc": 1.0},
        )
        stored = json.loads(where.raw("m", STEP_METADATA) or b"")["data"]
        assert stored["format_version"] == 3
        assert stored["item_handlers"] == {"meta": JSON_TYPESTR}
        assert stored["metrics"] == {"acc": 1.0} and stored["custom"] == {}
        assert "item_metadata" not in stored
        assert isinstance(stored["init_timestamp_nsecs"], int)
        assert isinstance(stored["commit_timestamp_nsecs"], int)

    def test_missing_path(self, where: Where, ckptr: cc.Checkpointer) -> None:
        with pytest.raises(FileNotFoundError, match=re.escape(where.path("nothing"))):
            ckptr.metadata(where.url("nothing"))
        with pytest.raises(FileNotFoundError):
            ckptr.restore(where.url("nothing"))

    def test_uncommitted_path_says_finalize_first(
        self, where: Where, ckptr: cc.Checkpointer
    ) -> None:
        url = _craft_uncommitted(where, "u")
        with pytest.raises(ValueError, match="Finalize the save first"):
            ckptr.metadata(url)


# ----------------------------------------------------------------------------- lifecycle
class TestFinalizeAndClose:
    def test_finalize_before_any_save(self, where: Where) -> None:
        handler = cc.CompositeCheckpointHandler()
        with pytest.raises(ValueError, match="finalize called before any save"):
            where.loop.run(handler.finalize(cc.StoragePath.from_url(where.url("x"))))
        assert where.listing() == set()

    def test_finalize_once_per_saved_item_only(self, where: Where) -> None:
        handlers = {item: RecordingHandler() for item in ("a", "b", "c")}
        registry = cc.HandlerRegistry()
        for item, handler in handlers.items():
            registry.add(item, RecordSave, handler)
        composite = cc.CompositeCheckpointHandler(handler_registry=registry)
        with cc.Checkpointer(composite) as ck:
            ck.save(where.url("1"), args=cc.args.Composite(a=RecordSave(1), c=RecordSave(3)))
            ck.save(where.url("2"), args=cc.args.Composite(b=RecordSave(2)))
            finalized = [(e["handler"], e["dir"].name) for e in _events("finalize")]
            assert finalized == [
                (id(handlers["a"]), "a"),
                (id(handlers["c"]), "c"),
                (id(handlers["b"]), "b"),
            ]
            # Each finalize happened before its step was committed, inside the step.
            for event in _events("finalize"):
                assert event["dir"].path.startswith((where.path("1"), where.path("2")))
            # The checkpointer already finalized the last save: a second time is refused.
            with pytest.raises(ValueError, match="finalize called before any save"):
                where.loop.run(composite.finalize(cc.StoragePath.from_url(where.url("2"))))
        assert len(_events("finalize")) == 3

    def test_shared_handler_finalizes_each_item_once(self, where: Where) -> None:
        shared = RecordingHandler()
        registry = cc.HandlerRegistry()
        registry.add(None, RecordSave, shared)
        with cc.Checkpointer(cc.CompositeCheckpointHandler(handler_registry=registry)) as ck:
            ck.save(where.url("1"), args=cc.args.Composite(a=RecordSave(1), b=RecordSave(2)))
        assert sorted(e["dir"].name for e in _events("finalize")) == ["a", "b"]
        assert {e["handler"] for e in _events("finalize")} == {id(shared)}

    def test_close_closes_every_registry_handler_once(self, where: Where) -> None:
        shared, own = RecordingHandler(), SpecialHandler()
        registry = cc.HandlerRegistry()
        registry.add("a", RecordSave, shared)
        registry.add("b", RecordSave, shared)
        registry.add("b", RecordRestore, own)
        registry.add(None, RecordRestore, own)
        ck = cc.Checkpointer(cc.CompositeCheckpointHandler(handler_registry=registry))
        ck.save(where.url("1"), args=cc.args.Composite(a=RecordSave(1)))
        ck.close()
        ck.close()
        closed = [e["handler"] for e in _events("close")]
        assert sorted(closed) == sorted([id(shared), id(own)])
        with pytest.raises(RuntimeError, match="closed"):
            ck.save(where.url("2"), args=cc.args.Composite(a=RecordSave(1)))

    def test_close_closes_every_bound_handler_once(self, where: Where) -> None:
        saver = cc.Checkpointer(cc.CompositeCheckpointHandler())
        saver.save(
            where.url("1"),
            args=cc.args.Composite(a=RecordSave(1), b=RecordSave(2), meta=cc.args.JsonSave(0)),
        )
        saver.save(where.url("2"), args=cc.args.Composite(a=RecordSave(3)))
        saver.close()
        saver.close()
        used = {e["handler"] for e in _events("copy")}
        closed = [e["handler"] for e in _events("close")]
        assert len(used) == 2 and sorted(closed) == sorted(used)

    def test_close_closes_handlers_made_for_restore(self, where: Where) -> None:
        with cc.Checkpointer(cc.CompositeCheckpointHandler()) as saver:
            saver.save(where.url("1"), args=cc.args.Composite(a=RecordSave(1), b=RecordSave(2)))
        EVENTS.clear()
        restorer = cc.Checkpointer(cc.CompositeCheckpointHandler())
        assert restorer.restore(where.url("1"), args=cc.args.Composite(a=RecordRestore())).a == 1
        assert restorer.restore(where.url("1")).b == 2
        restorer.close()
        used = {e["handler"] for e in _events("restore")}
        closed = [e["handler"] for e in _events("close")]
        assert len(used) == 2 and sorted(closed) == sorted(used)


# ----------------------------------------------------------------------------- checkpointer
class TestCheckpointer:
    def test_existing_checkpoint_needs_force(self, where: Where, ckptr: cc.Checkpointer) -> None:
        ckptr.save(
            where.url("s"),
            args=cc.args.Composite(a=RecordSave(1), meta=cc.args.JsonSave("old")),
        )
        before = where.listing("s")
        old_marker = where.raw("s", MARKER)
        with pytest.raises(FileExistsError, match="already exists"):
            ckptr.save(where.url("s"), args=cc.args.Composite(z=cc.args.JsonSave("new")))
        assert where.listing("s") == before and where.raw("s", MARKER) == old_marker
        assert dict(ckptr.restore(where.url("s"))) == {"a": 1, "meta": "old"}
        assert where.listing() == _prefixed("s", before)

        ckptr.save(where.url("s"), args=cc.args.Composite(z=cc.args.JsonSave("new")), force=True)
        assert where.listing("s") == _committed_listing("z/data.json")
        assert where.raw("s", MARKER) != old_marker
        assert dict(ckptr.restore(where.url("s"))) == {"z": "new"}
        assert ckptr.metadata(where.url("s")).item_handlers == {"z": JSON_TYPESTR}
        assert where.listing() == _prefixed("s", _committed_listing("z/data.json"))

    def test_force_on_a_new_path_just_saves(self, where: Where, ckptr: cc.Checkpointer) -> None:
        ckptr.save(where.url("s"), args=cc.args.Composite(a=cc.args.JsonSave(1)), force=True)
        assert where.listing("s") == _committed_listing("a/data.json")

    def test_restoring_an_uncommitted_path(self, where: Where, ckptr: cc.Checkpointer) -> None:
        url = _craft_uncommitted(where, "u")
        with pytest.raises(ValueError, match="incomplete checkpoint at") as info:
            ckptr.restore(url)
        assert where.path("u") in str(info.value)
        with pytest.raises(ValueError, match="incomplete checkpoint at"):
            ckptr.restore(url, args=cc.args.Composite(meta=cc.args.JsonRestore()))
        assert _events("restore") == []

    def test_restoring_data_without_a_marker(self, where: Where, ckptr: cc.Checkpointer) -> None:
        ckptr.save(where.url("s"), args=cc.args.Composite(a=RecordSave(1)))
        where.loop.run(where.store.backend.delete(where.path("s", MARKER)))
        with pytest.raises(
            ValueError, match=f"incomplete checkpoint at {re.escape(where.path('s'))}"
        ):
            ckptr.restore(where.url("s"))
        with pytest.raises(ValueError, match="Finalize the save first"):
            ckptr.metadata(where.url("s"))


class TestAsyncCheckpointer:
    def test_save_returns_before_the_commit(self, where: Where) -> None:
        token = f"gate-{where.kind}-{time.monotonic_ns()}"
        GATES[token] = threading.Event()
        meta = {"epoch": 1}
        try:
            with cc.AsyncCheckpointer(cc.CompositeCheckpointHandler()) as ack:
                ack.save(
                    where.url("a"),
                    args=cc.args.Composite(
                        n=RecordSave(5, gate=token), meta=cc.args.JsonSave(meta)
                    ),
                )
                meta["epoch"] = 2
                assert ack.is_saving_in_progress()
                assert MARKER not in where.listing("a")
                with pytest.raises((ValueError, FileNotFoundError)):
                    ack.restore(where.url("a"))
                GATES[token].set()
                ack.wait_until_finished()
                assert not ack.is_saving_in_progress()
                assert where.listing("a") == _committed_listing("n/value", "meta/data.json")
                assert dict(ack.restore(where.url("a"))) == {"n": 5, "meta": {"epoch": 1}}
        finally:
            GATES[token].set()

    def test_background_failure_is_raised_once_naming_the_path(self, where: Where) -> None:
        ack = cc.AsyncCheckpointer(cc.CompositeCheckpointHandler())
        ack.save(where.url("bad"), args=cc.args.Composite(ok=cc.args.JsonSave(1), x=FailSave()))
        with pytest.raises(RuntimeError, match="boom while writing x") as info:
            ack.wait_until_finished()
        assert where.path("bad") in str(info.value)
        ack.wait_until_finished()  # reported once only
        assert where.listing() == set()
        ack.save(where.url("good"), args=cc.args.Composite(ok=cc.args.JsonSave(2)))
        ack.close()
        with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ck:
            assert ck.restore(where.url("good")) == cc.args.Composite(ok=2)

    def test_background_failure_surfaces_at_the_next_save(self, where: Where) -> None:
        ack = cc.AsyncCheckpointer(cc.CompositeCheckpointHandler())
        try:
            ack.save(where.url("bad"), args=cc.args.Composite(x=FailSave()))
            with pytest.raises(RuntimeError, match=re.escape(where.path("bad"))):
                ack.save(where.url("next"), args=cc.args.Composite(ok=cc.args.JsonSave(1)))
            assert where.listing() == set()
            ack.save(where.url("next"), args=cc.args.Composite(ok=cc.args.JsonSave(1)))
        finally:
            ack.close()
        assert where.listing("next") == _committed_listing("ok/data.json")

    def test_background_failure_surfaces_at_close(self, where: Where) -> None:
        ack = cc.AsyncCheckpointer(cc.CompositeCheckpointHandler())
        ack.save(where.url("bad"), args=cc.args.Composite(x=FailSave()))
        with pytest.raises(RuntimeError, match="boom while writing x"):
            ack.close()
        ack.close()
        assert where.listing() == set()

    def test_existing_checkpoint_error_is_reported(self, where: Where) -> None:
        with cc.AsyncCheckpointer(cc.CompositeCheckpointHandler()) as ack:
            ack.save(where.url("s"), args=cc.args.Composite(a=cc.args.JsonSave(1)))
            ack.save(where.url("s"), args=cc.args.Composite(a=cc.args.JsonSave(2)))
            with pytest.raises(FileExistsError, match=re.escape(where.path("s"))):
                ack.wait_until_finished()
            ack.save(where.url("s"), args=cc.args.Composite(a=cc.args.JsonSave(3)), force=True)
            ack.wait_until_finished()
            assert ack.restore(where.url("s")).a == 3


# Keep the public-API surface used here honest.
def test_public_names() -> None:
    for name in (
        "AsyncCheckpointHandler",
        "AsyncCheckpointer",
        "CheckpointArgs",
        "CheckpointHandler",
        "Checkpointer",
        "CompositeCheckpointHandler",
        "HandlerRegistry",
        "JsonCheckpointHandler",
        "StepMetadata",
        "register_with_handler",
    ):
        assert name in cc.__all__ and hasattr(cc, name)
    assert cc.args.CheckpointArgs is cc.CheckpointArgs
    assert issubclass(cc.AsyncCheckpointHandler, cc.CheckpointHandler)
    assert issubclass(cc.args.JsonSave, cc.CheckpointArgs)
    assert issubclass(cc.args.Composite, cc.CheckpointArgs)
