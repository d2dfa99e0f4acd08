"""cloudckpt.format sits below the handlers and the tools: it never imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import cloudckpt.format

FORMAT_DIR = Path(cloudckpt.format.__file__).parent
#: What the format may build on: storage paths, errors, atomicity, and itself.
ALLOWED = ("cloudckpt.format", "cloudckpt.storage", "cloudckpt.errors", "atomicity")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_format_imports_nothing_above_it() -> None:
    modules = sorted(FORMAT_DIR.glob("*.py"))
    assert {p.stem for p in modules} >= {"jsonio", "step", "pytree", "layout", "json_item"}
    wrong = {
        f"{path.name}: {name}"
        for path in modules
        for name in imported_modules(path)
        if (name == "cloudckpt" or name.startswith(("cloudckpt.", "atomicity")))
        and not name.startswith(ALLOWED)
    }
    assert not wrong, f"cloudckpt.format imports layers above it: {sorted(wrong)}"
