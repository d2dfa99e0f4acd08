"""The package's layers import only the layers below them (README "Layout of this repository").

Read from the source (AST), lazy imports inside functions included:

    storage  <  format  <  handlers  <  orbax  <  engine  <  the public face
    storage, format  <  tools  <  console, cli

``atomicity`` never imports ``cloudckpt``; ``cloudckpt.testing`` builds on
storage alone and the library never imports it. The few deliberate
exceptions are listed in ``EXCEPTIONS``, each with its reason, so a new one
is a decision someone writes down rather than drift. The same walk pins the
module size and forbids reaching into another package's private names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import atomicity
import cloudckpt

PACKAGE = Path(cloudckpt.__file__).parent
ATOMICITY = Path(atomicity.__file__).parent

_BASE = ("cloudckpt.errors", "atomicity")
_STORAGE = (*_BASE, "cloudckpt.storage")
_FORMAT = (*_STORAGE, "cloudckpt.format")
_HANDLERS = (*_FORMAT, "cloudckpt.handlers")
# cloudckpt.orbax reads Orbax's format and restores it through cloudckpt's handlers, so it
# sits above them; the engine calls it at its "Orbax hook"s, and the tools read Orbax steps
# through it (an exception below).
_ORBAX = (*_HANDLERS, "cloudckpt.orbax")
_ENGINE = (*_ORBAX, "cloudckpt.engine")
_TOOLS = (*_FORMAT, "cloudckpt.tools")
_CLI = (*_TOOLS, "cloudckpt.console", "cloudckpt.cli", "cloudckpt.engine.loop")

#: What each part may import (longest matching module prefix wins).
RULES: dict[str, tuple[str, ...]] = {
    "cloudckpt.errors": (),
    "cloudckpt.storage": _STORAGE,
    "cloudckpt.format": _FORMAT,
    "cloudckpt.handlers": _HANDLERS,
    "cloudckpt.orbax": _ORBAX,
    "cloudckpt.engine": _ENGINE,
    "cloudckpt.tools": _TOOLS,
    "cloudckpt.console": _CLI,
    "cloudckpt.cli": _CLI,
    "cloudckpt.__main__": ("cloudckpt.cli",),
    "cloudckpt.testing": (*_STORAGE, "cloudckpt.testing"),
    # The public face re-exports the engine, handlers and storage: everything but the
    # command line's parts and the test servers.
    "cloudckpt": (*_ENGINE, "cloudckpt.args"),
    "cloudckpt.args": _HANDLERS,
    "cloudckpt.demo": (*_ENGINE, "cloudckpt.args", "cloudckpt"),
    "atomicity": ("atomicity",),
}

#: (importing module, imported module prefix): why the layering allows it.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("cloudckpt.tools.inspect", "cloudckpt.orbax"): "ls/inspect show Orbax steps too",
    ("cloudckpt.tools.transfer", "cloudckpt.orbax"): "cp converts and deletes Orbax steps",
    ("cloudckpt.tools.orbax", "cloudckpt.orbax"): "the Orbax side of the tools",
    ("cloudckpt.tools.orbax", "cloudckpt.handlers.json"): "converting writes cloudckpt items",
    ("cloudckpt.tools.orbax", "cloudckpt.handlers.pytree"): "converting writes cloudckpt items",
    ("cloudckpt.tools.inspect", "cloudckpt.handlers.pytree.keys"): (
        "showing a PRNG key leaf asks jax for its implementation; format/ stays jax-free"
    ),
    ("cloudckpt.tools.inspect", "cloudckpt.handlers.pytree.budget"): (
        "ByteBudget moves below handlers once pytree/read.py and write.py are free to edit"
    ),
    ("cloudckpt.testing.conformance", "cloudckpt.engine.loop"): (
        "runs the backend under test on a LoopThread, as the engine does"
    ),
    ("cloudckpt.demo", "cloudckpt.testing.servers"): "the demo starts a local S3 server",
}

#: No module longer than this (the house rule says about 500 lines).
MAX_LINES = 520


def _modules() -> list[tuple[str, Path]]:
    found = []
    for root, name in ((PACKAGE, "cloudckpt"), (ATOMICITY, "atomicity")):
        for path in sorted(root.rglob("*.py")):
            parts = [name, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found.append((".".join(parts), path))
    return found


MODULES = _modules()
KNOWN = {name for name, _ in MODULES}


def _imports(module: str, path: Path) -> set[str]:
    """Every cloudckpt/atomicity module ``path`` imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            # ``from cloudckpt import storage`` imports the module cloudckpt.storage.
            subs = {f"{source}.{a.name}" for a in node.names} & KNOWN
            names.update(subs or {source})
    return {n for n in names if n.split(".")[0] in ("cloudckpt", "atomicity")}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one (``cloudckpt``: itself only)."""
    return any(name == p or (p != "cloudckpt" and name.startswith(p + ".")) for p in prefixes)


def _rule(module: str) -> tuple[str, ...]:
    matching = [p for p in RULES if _within(module, (p,))]
    assert matching, f"{module} belongs to no layer: give it a rule in tests/test_layering.py"
    return RULES[max(matching, key=len)]


def test_every_module_has_a_layer() -> None:
    assert {"cloudckpt.storage.base", "cloudckpt.format.step", "cloudckpt.tools.orbax"} <= KNOWN
    formats = {"jsonio", "step", "pytree", "layout", "json_item"}
    assert {f"cloudckpt.format.{name}" for name in formats} <= KNOWN
    for module, _ in MODULES:
        _rule(module)


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_only_layers_below(module: str, path: Path) -> None:
    allowed = _rule(module)
    wrong = sorted(
        name
        for name in _imports(module, path)
        if not _within(name, allowed)
        and not any(m == module and _within(name, (p,)) for m, p in EXCEPTIONS)
    )
    assert not wrong, f"{module} imports layers above it (see tests/test_layering.py): {wrong}"


def test_exceptions_are_still_needed() -> None:
    """An exception nobody uses any more is removed, so the list stays the truth."""
    imports = dict((module, _imports(module, path)) for module, path in MODULES)
    stale = [(m, p) for m, p in EXCEPTIONS if not any(_within(n, (p,)) for n in imports.get(m, ()))]
    assert not stale, f"layering exceptions no longer used: {stale}"


def test_format_and_storage_import_no_handlers_or_tools() -> None:
    """The load-bearing rule, spelled out: tools read the format through format/."""
    for module, path in MODULES:
        if _within(module, ("cloudckpt.format", "cloudckpt.storage")):
            above = [n for n in _imports(module, path) if not _within(n, _FORMAT)]
            assert not above, f"{module} imports {above}"


def test_library_never_imports_testing_and_atomicity_never_imports_cloudckpt() -> None:
    for module, path in MODULES:
        names = _imports(module, path)
        if module.startswith("atomicity"):
            assert not [n for n in names if n.startswith("cloudckpt")], module
        elif not _within(module, ("cloudckpt.testing", "cloudckpt.demo")):
            assert not [n for n in names if _within(n, ("cloudckpt.testing",))], module


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_module_size(module: str, path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it (limit {MAX_LINES})"


#: Documented public APIs whose names start with an underscore.
_PUBLIC_UNDERSCORED = frozenset({"os._exit"})


def _private_reach(module: str, path: Path) -> list[str]:
    """``obj._name`` on another object, and ``_name`` imported from another package."""
    own_package = module.split(".")[:2]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            receiver = node.value
            if node.attr.startswith("__") or (
                # self/cls, and ``other`` in a class's own comparisons
                isinstance(receiver, ast.Name) and receiver.id in ("self", "cls", "other")
            ):
                continue
            if isinstance(receiver, ast.Call) and ast.unparse(receiver.func) == "super":
                continue
            if ast.unparse(node) in _PUBLIC_UNDERSCORED:
                continue
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module.split(".")[:2] == own_package:
                continue
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            private = [n for n in names if any(p.startswith("_") for p in n.split(".")[1:])]
            if private and node.module.startswith("cloudckpt"):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
    return found


#: Storage adapts fsspec's async API, whose methods fsspec itself names ``_cat_file``,
#: ``_pipe_file``, ``_call``...; and the GCS settings probes live beside GCSBackend.
_PRIVATE_REACH_EXEMPT = ("cloudckpt.storage",)


@pytest.mark.parametrize(
    "module,path",
    [
        (m, p)
        for m, p in MODULES
        if m.startswith("cloudckpt") and not _within(m, _PRIVATE_REACH_EXEMPT)
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_no_private_reach(module: str, path: Path) -> None:
    found = _private_reach(module, path)
    assert not found, f"{module} reaches into others' private names: {found}"
