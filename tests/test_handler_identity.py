"""Handler identities on disk, and the handler ABC's checks (issue 13).

* A checkpoint written by an earlier version (tests/fixtures/cloudckpt_v1, see
  make_cloudckpt_fixtures.py) restores without args on the file system and,
  uploaded object by object, on S3 and GCS: the typestrs it records are the
  ones the handlers declare, whatever module the classes live in now.
* A handler that declares ``TYPESTR`` keeps restoring after its class moves
  to another module under another name.
* Two classes claiming one typestr, an empty typestr, and handler classes
  missing an abstract method are refused with a clear ``TypeError``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import cloudckpt as cc
from cloudckpt.handlers.registry import handler_class_by_typestr

from .backend_harness import make_store

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "cloudckpt_v1" / "run" / "1"
REPO = Path(__file__).resolve().parents[1]

PYTREE = "cloudckpt.handlers.pytree.StandardCheckpointHandler"
JSON = "cloudckpt.handlers.json.JsonCheckpointHandler"


# ------------------------------------------------------------------ the fixture
@pytest.mark.parametrize("kind", ["file", "s3", "gcs"])
def test_a_checkpoint_of_an_earlier_version_restores_without_args(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """No args: the handlers are found from the typestrs the step recorded."""
    store = make_store(kind, request, tmp_path)
    for file in sorted(FIXTURE.rglob("*")):
        if file.is_file():
            store.raw_put(store.path("1", file.relative_to(FIXTURE).as_posix()), file.read_bytes())
    with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ckptr:
        step = ckptr.metadata(store.url("1"))
        restored = ckptr.restore(store.url("1"))
    assert step.item_handlers == {"state": PYTREE, "meta": JSON}
    assert set(restored) == {"state", "meta"}
    expected = json.loads((FIXTURE.parents[1] / "expected.json").read_text())
    assert restored["meta"] == expected["meta"]["1"]
    assert isinstance(restored["state"], dict) and restored["state"]


def test_builtin_handlers_declare_the_names_checkpoints_carry() -> None:
    assert cc.StandardCheckpointHandler.TYPESTR == PYTREE
    assert cc.StandardCheckpointHandler.typestr() == PYTREE
    assert cc.JsonCheckpointHandler.TYPESTR == JSON
    assert handler_class_by_typestr(PYTREE) is cc.StandardCheckpointHandler
    assert handler_class_by_typestr(JSON) is cc.JsonCheckpointHandler
    # The composite records its items' names, never its own (kept as before the layout).
    assert (
        cc.CompositeCheckpointHandler.typestr() == "cloudckpt.composite.CompositeCheckpointHandler"
    )
    # Abstract bases have no identity.
    assert handler_class_by_typestr(cc.AsyncCheckpointHandler.typestr()) is None
    assert handler_class_by_typestr(cc.CheckpointHandler.typestr()) is None


# ------------------------------------------------------------- a moved handler
_HANDLER_SOURCE = """
import json, sys
from dataclasses import dataclass
import cloudckpt as cc

class {name}(cc.AsyncCheckpointHandler):
    TYPESTR = "tests.identity.TextHandler"

    def async_save(self, directory, args):
        async def write():
            await directory.backend.put((directory / "text").path, args.text.encode())
        return [write()]

    async def restore(self, directory, args=None):
        return (await directory.backend.get((directory / "text").path)).decode()

@cc.register_with_handler({name}, for_save=True, for_restore=True)
@dataclass(frozen=True)
class TextArgs(cc.CheckpointArgs):
    text: str = ""

{name}.default_restore_args = TextArgs
with cc.Checkpointer(cc.CompositeCheckpointHandler()) as ck:
    if sys.argv[1] == "save":
        ck.save(sys.argv[2], args=cc.args.Composite(t=TextArgs("moved safely")))
    print(json.dumps({{"out": dict(ck.restore(sys.argv[2])),
                       "handlers": ck.metadata(sys.argv[2]).item_handlers}}))
"""


def _run(source: str, *argv: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", source, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_handler_with_a_declared_typestr_survives_a_move(tmp_path: Path) -> None:
    url = str(tmp_path / "1")
    saved = _run(_HANDLER_SOURCE.format(name="TextHandler"), "save", url)
    assert saved["handlers"] == {"t": "tests.identity.TextHandler"}
    # Another process, where the class has another name (and module): restores without args.
    moved = _run(_HANDLER_SOURCE.format(name="RenamedTextHandler"), "restore", url)
    assert moved == {"out": {"t": "moved safely"}, "handlers": {"t": "tests.identity.TextHandler"}}


# ------------------------------------------------------------ identity checks
class _Base(cc.AsyncCheckpointHandler):
    def async_save(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs
    ) -> Sequence[Awaitable[None]]:
        return []

    async def restore(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs | None = None
    ) -> Any:
        return None


def test_two_handlers_cannot_share_a_typestr() -> None:
    class First(_Base):
        TYPESTR = "tests.identity.shared"

    with pytest.raises(TypeError) as info:

        class Second(_Base):
            TYPESTR = "tests.identity.shared"

    message = str(info.value)
    assert "'tests.identity.shared'" in message and "First" in message and "Second" in message
    assert handler_class_by_typestr("tests.identity.shared") is First


def test_a_class_defined_again_replaces_itself() -> None:
    def define() -> type[cc.CheckpointHandler]:
        class Again(_Base):
            TYPESTR = "tests.identity.again"

        return Again

    first, second = define(), define()  # same module and qualified name: the same handler
    assert first is not second
    assert handler_class_by_typestr("tests.identity.again") is second


def test_typestr_is_not_inherited_and_must_be_a_name() -> None:
    class Declared(_Base):
        TYPESTR = "tests.identity.declared"

    class Derived(Declared):
        pass

    assert Derived.typestr() == f"{__name__}.{Derived.__qualname__}"
    assert handler_class_by_typestr(Derived.typestr()) is Derived
    assert handler_class_by_typestr("tests.identity.declared") is Declared
    for bad in ("", "  ", 7):
        with pytest.raises(TypeError, match="TYPESTR must be a non-empty string"):
            type("Bad", (_Base,), {"TYPESTR": bad})


def test_without_a_typestr_a_handler_is_known_by_module_and_name() -> None:
    class Undeclared(_Base):
        pass

    assert Undeclared.typestr() == f"{__name__}.{Undeclared.__qualname__}"
    assert handler_class_by_typestr(Undeclared.typestr()) is Undeclared


# --------------------------------------------------------------- abstract checks
class _Incomplete(cc.AsyncCheckpointHandler):  # no restore
    def async_save(
        self, directory: cc.StoragePath, args: cc.CheckpointArgs
    ) -> Sequence[Awaitable[None]]:
        return []


@dataclass(frozen=True)
class _IncompleteArgs(cc.CheckpointArgs):
    pass


def test_a_handler_missing_an_abstract_method_is_refused() -> None:
    with pytest.raises(TypeError, match="restore"):
        _Incomplete()  # type: ignore[abstract]
    with pytest.raises(TypeError, match=r"_Incomplete is abstract; it does not implement restore"):
        cc.register_with_handler(_Incomplete, for_save=True)
    registry = cc.HandlerRegistry()
    with pytest.raises(TypeError, match=r"_Incomplete is abstract; it does not implement restore"):
        registry.add("x", _IncompleteArgs, _Incomplete)
    assert handler_class_by_typestr(_Incomplete.typestr()) is None
    with pytest.raises(TypeError, match="needs a CheckpointHandler subclass"):
        cc.register_with_handler(dict, for_save=True)  # type: ignore[arg-type]


def test_a_single_handler_records_its_own_typestr(tmp_path: Path) -> None:
    with cc.Checkpointer(cc.JsonCheckpointHandler()) as ckptr:
        ckptr.save(str(tmp_path / "1"), args=cc.args.JsonSave({"a": 1}))
        assert ckptr.metadata(str(tmp_path / "1")).item_handlers == JSON
        assert ckptr.restore(str(tmp_path / "1")) == {"a": 1}
